"""Checkpoint files outside the log: where states go, which files live, what open, load and
verify check, and a state that cannot be stored (`flowactors.checkpointing`)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs
from helpers import TOOLS, QUERIES, open_runtime, run_twin_jobs, wait_until

import flowactors as fa
from flowactors import checkpointing
from flowactors.cli import main
from flowactors.events import CheckpointSaved, IterationCompleted, JobCompleted, JobRecovered
from flowactors.filestore import FileCheckpoints
from flowactors.liveness import live_states
from flowactors.store import EventStore

sys.path.insert(0, str(TOOLS))  # bulky_task: a task with a state of any size
BIG = 300_000  # above the inline threshold
assert BIG > checkpointing.INLINE_MAX_BYTES


def bulky_spec(state_bytes: int = BIG, **config) -> fa.JobSpec:
    defaults = dict(n_iterations=4, batch_size=2, n_trajectories_per_query=2,
                    checkpoint_interval=1, seed=3)
    return fa.JobSpec(agent_id="a", training_data=QUERIES, task="bulky_task:Bulky",
                      task_options={"state_bytes": state_bytes},
                      config=fa.GRPOConfig(**{**defaults, **config}))


def final_digests(db: Path) -> list[str]:
    with EventStore(db, mode="readonly") as store:
        return [r.event.final_state_digest for r in store.read_all()
                if isinstance(r.event, JobCompleted)]


def saved(db: Path) -> list[CheckpointSaved]:
    with EventStore(db, mode="readonly") as store:
        return [r.event for r in store.read_all() if isinstance(r.event, CheckpointSaved)]


def files_of(db: Path) -> set[str]:
    return set(FileCheckpoints(str(db) + ".checkpoints", create=False).files())


def test_large_states_go_to_files_beside_the_log_and_small_ones_stay_in_it(tmp_path):
    """A state above the threshold is a content-addressed file beside the log, named with its
    size and location by its event and absent from the log; a small one stays in the log;
    both load back after a reopen."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        big = rt.submit(bulky_spec(n_iterations=2))
        small = rt.submit(bulky_spec(1000, n_iterations=2))
        assert rt.wait(big, timeout=60).status is fa.JobStatus.COMPLETED
        assert rt.wait(small, timeout=60).status is fa.JobStatus.COMPLETED
    events = saved(db)
    large = [e for e in events if e.state_size > BIG]
    tiny = [e for e in events if e.state_size < 2000]
    assert len(large) == 2 and len(tiny) == 2
    location = str(db) + ".checkpoints"
    assert all(e.state_location == location for e in large)
    assert all(e.state_location is None for e in tiny)
    assert {e.state_ref for e in large} <= files_of(db)
    with EventStore(db, mode="readonly") as store:
        assert not any(store.has_blob(e.state_ref) for e in large)
        assert all(store.has_blob(e.state_ref) for e in tiny)
    with open_runtime(db) as rt:
        assert len(rt.load_checkpoint(big, 2).weights) == BIG
        assert len(rt.load_checkpoint(small, 2).weights) == 1000


def test_an_fsspec_url_holds_the_files(tmp_path):
    """`checkpoint_store` may be any fsspec URL: with `memory://` the files are there, not
    beside the log, and a reopen loads from them."""
    url = f"memory://flowactors-{uuid.uuid4().hex}"
    db = tmp_path / "flow.db"
    with open_runtime(db, checkpoint_store=url) as rt:
        job = rt.submit(bulky_spec(n_iterations=2))
        assert rt.wait(job, timeout=60).status is fa.JobStatus.COMPLETED
    refs = {e.state_ref for e in saved(db)}
    assert {e.state_location for e in saved(db)} == {url}
    fs = fsspec.filesystem("memory")
    assert refs <= {p.rsplit("/", 1)[-1] for p in fs.ls(url[len("memory://"):], detail=False)}
    assert not (tmp_path / "flow.db.checkpoints").exists() or not files_of(db)
    with open_runtime(db, checkpoint_store=url) as rt:
        assert rt.load_checkpoint(job, 2).weights


def test_pruning_deletes_the_files_no_job_needs_and_keeps_a_file_another_job_names(tmp_path):
    """Job B (run first) and job A train identical states; A keeps one checkpoint and prunes
    the rest: the files of A's pruned checkpoints that B still names stay, the others go, and
    what is left on disk is exactly what the jobs' folded states name."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        a, b = run_twin_jobs(rt, bulky_spec)
        states = {j: rt._states[j] for j in (a, b)}
        pruned = {c.info.state_ref for c in states[a].checkpoints if c.info.pruned}
        assert pruned, "job A must have pruned checkpoints"
        needed_by_b = live_states([states[b]])
        assert pruned & needed_by_b, "B must name a state A pruned"
        on_disk = files_of(db)
        assert on_disk == live_states(states.values())
        assert needed_by_b <= on_disk
        assert not (pruned - needed_by_b) & on_disk


def test_orphans_and_unfinished_writes_are_swept_on_open(tmp_path):
    """A file no event names (a crash between its write and its event), a temporary file
    of an unfinished write and a discarded file not yet removed are deleted when the log
    opens; the files jobs need stay."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        job = rt.submit(bulky_spec(n_iterations=2))
        rt.wait(job, timeout=60)
    needed = files_of(db)
    directory = Path(str(db) + ".checkpoints")
    files = FileCheckpoints(directory)
    orphan = files.put(os.urandom(BIG))
    (directory / f".{orphan}.1234abcd.partial").write_bytes(b"half a state")
    discarded = files.discard(files.put(os.urandom(BIG)))  # a crash before its removal
    assert (directory / discarded).exists()
    assert orphan in files_of(db)
    with open_runtime(db):
        pass
    assert files_of(db) == needed
    assert sorted(p.name for p in directory.iterdir()) == sorted(needed)


def test_a_missing_or_resized_file_stops_open_naming_its_checkpoint(tmp_path):
    """An open checks each needed file's presence and size (not its content): a missing file
    and a truncated one are each a LogCorrupted naming the job and iteration."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        job = rt.submit(bulky_spec(n_iterations=2))
        rt.wait(job, timeout=60)
    directory = Path(str(db) + ".checkpoints")
    first = saved(db)[0].state_ref
    backup = tmp_path / "backup"
    shutil.copy(directory / first, backup)
    (directory / first).unlink()
    with pytest.raises(fa.LogCorrupted, match=f"iteration 1 of job '{job}'.*missing"):
        open_runtime(db)
    (directory / first).write_bytes(backup.read_bytes()[:-1])
    with pytest.raises(fa.LogCorrupted, match=f"iteration 1 of job '{job}'.*bytes"):
        open_runtime(db)


def test_verify_and_load_catch_a_tampered_file_and_verify_a_missing_one(tmp_path):
    """A file whose content changed (same size) opens (open checks no content) but fails its
    load and `flowactors verify`, which names the checkpoint; a missing file fails verify too;
    an intact log with files verifies."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        job = rt.submit(bulky_spec(n_iterations=2))
        rt.wait(job, timeout=60)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    directory = Path(str(db) + ".checkpoints")
    first = saved(db)[0].state_ref
    original = (directory / first).read_bytes()
    (directory / first).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with open_runtime(db) as rt:
        with pytest.raises(fa.LogCorrupted, match="does not match its address"):
            rt.load_checkpoint(job, 1)
    bad = runner.invoke(main, ["verify", "--db", str(db)])
    assert bad.exit_code == 1
    assert f"iteration 1 of job '{job}'" in bad.output and "does not match" in bad.output
    (directory / first).unlink()
    gone = runner.invoke(main, ["verify", "--db", str(db)])
    assert gone.exit_code == 1 and "missing" in gone.output and "iteration 1" in gone.output


class FullDisk(FileCheckpoints):
    """A checkpoint store whose disk is full."""

    puts = 0

    def put(self, data, **options):  # noqa: ANN001, ANN003
        FullDisk.puts += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_state_that_cannot_be_stored_fails_the_job_once_not_at_every_reopen(
        tmp_path, monkeypatch):
    """A store that refuses every put (disk full) is tried a bounded number of times, then
    the job is failed with reason `checkpoint_unstorable` and the error; a reopen neither
    retrains nor retries it."""
    monkeypatch.setattr(checkpointing, "PUT_BACKOFF_SECONDS", 0.0)
    db = tmp_path / "flow.db"
    FullDisk.puts = 0
    with open_runtime(db, checkpoint_store=FullDisk(tmp_path / "full")) as rt:
        job = rt.submit(bulky_spec(n_iterations=3))
        view = rt.wait(job, timeout=60)
    assert view.status is fa.JobStatus.FAILED
    assert view.error.reason == "checkpoint_unstorable"
    assert "No space left on device" in view.error.message
    assert FullDisk.puts == checkpointing.PUT_ATTEMPTS
    with EventStore(db, mode="readonly") as store:
        version = store.stream_version(job)
    with open_runtime(db, checkpoint_store=FullDisk(tmp_path / "full")) as rt:
        assert rt.status(job).status is fa.JobStatus.FAILED
    with EventStore(db, mode="readonly") as store:
        assert store.stream_version(job) == version
    assert FullDisk.puts == checkpointing.PUT_ATTEMPTS


class HeldFiles(FileCheckpoints):
    """A checkpoint store whose puts wait until the test lets them through (all at once with
    `release`, or the nth with `gates[n]`), counting how many run at once."""

    def __init__(self, url) -> None:  # noqa: ANN001
        super().__init__(url)
        self.release = threading.Event()
        self.gates = [threading.Event() for _ in range(16)]
        self.entered = self.active = self.most = 0
        self.lock = threading.Lock()

    def put(self, data, **options):  # noqa: ANN001, ANN003
        with self.lock:
            gate = self.gates[self.entered]
            self.entered += 1
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            while not (self.release.wait(0.01) or gate.is_set()):
                pass
            return super().put(data, **options)
        finally:
            with self.lock:
                self.active -= 1


def final_digest(rt, job) -> str:  # noqa: ANN001
    return [r.event for r in rt.history(job) if isinstance(r.event, JobCompleted)][0] \
        .final_state_digest


def recorded(rt, job, kind, iteration) -> bool:  # noqa: ANN001
    return any(isinstance(r.event, kind) and r.event.iteration == iteration
               for r in rt.history(job))


@pytest.mark.timeout(60)
def test_a_job_trains_on_while_its_checkpoint_is_written_and_records_it_once_durable(tmp_path):
    """While a large checkpoint's file is still being written, the job records its next
    iteration; the `CheckpointSaved` comes once the file is durable, after it, and the job
    ends with the checkpoints and final state of a run whose writes never waited; the log
    replays to its recorded digests."""
    with open_runtime(tmp_path / "plain.db") as rt:
        plain = rt.submit(bulky_spec(n_iterations=4, checkpoint_interval=2))
        rt.wait(plain, timeout=30)
        want = final_digest(rt, plain)
    db = tmp_path / "flow.db"
    held = HeldFiles(tmp_path / "held")
    with open_runtime(db, checkpoint_store=held) as rt:
        job = rt.submit(bulky_spec(n_iterations=4, checkpoint_interval=2))
        wait_until(lambda: recorded(rt, job, IterationCompleted, 3), timeout=20,
                   message="iteration 3 recorded while checkpoint 2 is being written")
        assert held.entered == 1 and not recorded(rt, job, CheckpointSaved, 2)
        held.release.set()
        view = rt.wait(job, timeout=30)
        assert view.status is fa.JobStatus.COMPLETED
        assert sorted(c.iteration for c in rt.checkpoints(job)) == [2, 4]
        types = [(r.type, getattr(r.event, "iteration", None)) for r in rt.history(job)]
        assert types.index(("job.iteration_completed", 3)) \
            < types.index(("job.checkpoint_saved", 2))
        assert final_digest(rt, job) == want
        assert rt.load_checkpoint(job, 2) is not None
    result = CliRunner().invoke(main, ["replay", "--check", "--db", str(db)])
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(60)
def test_a_job_has_at_most_one_checkpoint_in_flight(tmp_path):
    """With a checkpoint every iteration and writes slower than iterations, the next
    checkpoint waits for the one in flight (and says so in the log): never two writes of one
    job at once."""
    held = HeldFiles(tmp_path / "held")
    with capture_logs() as logs, open_runtime(tmp_path / "flow.db", checkpoint_store=held) as rt:
        job = rt.submit(bulky_spec(n_iterations=4, checkpoint_interval=1))
        try:
            for n in range(1, 4):  # the last iteration's state is written on the job's thread
                wait_until(lambda: held.entered >= n, timeout=20,
                           message=f"checkpoint {n}'s write to start")
                wait_until(lambda: held.entered > n or any(
                    e["event"] == "checkpoint_awaited" and e["iteration"] == n
                    for e in list(logs)),
                    timeout=20, message=f"checkpoint {n + 1} to wait for checkpoint {n}")
                assert held.entered == n, "a second checkpoint was written while one was in flight"
                held.gates[n - 1].set()
        finally:
            held.release.set()  # a failure must not leave close() waiting for a held write
        assert rt.wait(job, timeout=30).status is fa.JobStatus.COMPLETED
        assert sorted(c.iteration for c in rt.checkpoints(job)) == [1, 2, 3, 4]
    assert held.most == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop", ["pause", "cancel"])
def test_a_pause_or_cancel_with_a_checkpoint_in_flight_records_it_first(tmp_path, stop):
    """A pause or cancel that arrives while a checkpoint is being written waits for it and
    records it before the job stops: a paused job resumes from it, to the final state of an
    uninterrupted run."""
    spec = bulky_spec(n_iterations=8, checkpoint_interval=2)
    with open_runtime(tmp_path / "plain.db") as rt:
        plain = rt.submit(spec)
        rt.wait(plain, timeout=30)
        want = final_digest(rt, plain)
    held = HeldFiles(tmp_path / "held")
    with open_runtime(tmp_path / "flow.db", checkpoint_store=held) as rt:
        job = rt.submit(spec)
        wait_until(lambda: recorded(rt, job, IterationCompleted, 3), timeout=20,
                   message="iteration 3 while checkpoint 2 is written")
        # the job now waits for checkpoint 2 before recording iteration 4, its next one
        stopper = threading.Thread(target=getattr(rt, stop), args=(job,))
        stopper.start()
        inbox = rt._actors[job].actor_inbox
        wait_until(lambda: not inbox.empty(), message=f"the {stop} request in the job's inbox")
        held.gates[0].set()  # checkpoint 2 is written; checkpoint 4 starts and is held
        wait_until(lambda: held.entered == 2, message="checkpoint 4 in flight")
        held.release.set()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
        view = rt.status(job)
        assert view.status is (fa.JobStatus.PAUSED if stop == "pause"
                               else fa.JobStatus.CANCELLED)
        assert view.progress.current_iteration == 4
        assert sorted(c.iteration for c in rt.checkpoints(job)) == [2, 4], \
            f"the {stop} lost the checkpoint in flight"
        if stop == "pause":
            rt.resume(job)
            assert rt.wait(job, timeout=30).status is fa.JobStatus.COMPLETED
            assert final_digest(rt, job) == want


CHILD = textwrap.dedent("""
    import json
    import sys
    import flowactors as fa
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint_files import bulky_spec
    with fa.Runtime(sys.argv[1], synchronous="off", handle_signals=False) as rt:
        rt.submit(bulky_spec(**json.loads(sys.argv[3])), job_id="job")
        view = rt.wait("job", timeout=120)
        print(view.status.value, flush=True)
""")


def run_child(db: Path, env: dict[str, str],
              config: str = '{"n_iterations": 5, "keep_checkpoints": 2}') -> subprocess.Popen:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join([str(tests), str(TOOLS),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(tests), config], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.timeout(120)
def test_sigkill_after_a_file_is_durable_before_its_event_resumes_bit_identically(tmp_path):
    """SIGKILLed once a checkpoint's file is durable but before its event is appended, the
    restarted runtime sweeps that orphan, resumes from the last recorded checkpoint, and ends
    with the final state of an uninterrupted run; the log and its files verify."""
    reference = tmp_path / "reference.db"
    child = run_child(reference, {})
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    want = final_digests(reference)
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child = run_child(db, {"FLOWACTORS_FAULTS": "checkpoint.stored@3",
                           "FLOWACTORS_FAULT_FILE": str(fault_file)})
    wait_until(lambda: "checkpoint.stored" in fault_file.read_text()
               or child.poll() is not None, timeout=60, message="the fault point")
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    recorded = {e.state_ref for e in saved(db)}
    orphans = files_of(db) - recorded
    assert len(orphans) == 1, "the third checkpoint's file is durable, its event is not"
    child = run_child(db, {})
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    got = final_digests(db)
    assert got == want
    result = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(120)
def test_sigkill_with_a_checkpoint_in_flight_resumes_from_the_last_durable_one(tmp_path):
    """SIGKILLed while checkpoint 4 is being written and iteration 5 is already recorded, the
    restarted runtime resumes from checkpoint 2, the last durable one, and ends with the
    final state of an uninterrupted run; the log and its files verify."""
    config = '{"n_iterations": 6, "checkpoint_interval": 2, "keep_checkpoints": 1}'
    reference = tmp_path / "reference.db"
    child = run_child(reference, {}, config)
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    want = final_digests(reference)
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child = run_child(db, {"FLOWACTORS_FAULTS": "checkpoint.writing@2",
                           "FLOWACTORS_FAULT_FILE": str(fault_file)}, config)

    def iterations() -> list[int]:
        with EventStore(db, mode="readonly") as store:
            return [r.event.iteration for r in store.read_all()
                    if isinstance(r.event, IterationCompleted)]

    wait_until(lambda: "checkpoint.writing" in fault_file.read_text()
               or child.poll() is not None, timeout=60, message="the fault point")
    wait_until(lambda: 5 in iterations() or child.poll() is not None, timeout=60,
               message="iteration 5 recorded while checkpoint 4 is in flight")
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert [e.iteration for e in saved(db)] == [2]
    child = run_child(db, {}, config)
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    with EventStore(db, mode="readonly") as store:
        events = [r.event for r in store.read_all()]
    assert [e.final_state_digest for e in events if isinstance(e, JobCompleted)] == want
    assert [e.from_checkpoint for e in events if isinstance(e, JobRecovered)] == [2]
    result = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert result.exit_code == 0, result.output


def test_an_in_memory_runtime_writes_no_file_keeps_large_states_in_memory_and_clears_them(
        tmp_path, monkeypatch):
    """`Runtime(":memory:")`: a job with states above the inline threshold trains, its large
    checkpoints load back from the runtime's own `memory://` store, a fork starts from one,
    no file appears in the working directory, no inbox thread runs, and closing removes the
    stored states."""
    monkeypatch.chdir(tmp_path)
    with open_runtime(":memory:") as rt:
        job_id = rt.submit(bulky_spec(n_iterations=5, keep_checkpoints=2))
        assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        files = rt.state_store.files
        assert files.url.startswith("memory://")
        stored = files.files()
        kept = {c.state_ref for c in rt.checkpoints(job_id) if not c.pruned}
        assert kept and kept <= stored.keys() and all(s > checkpointing.INLINE_MAX_BYTES
                                                     for s in stored.values())
        assert len(rt.load_checkpoint(job_id, 5).weights) == BIG
        child = rt.fork(job_id, at_iteration=rt.status(job_id).best_checkpoint or 5)
        assert rt.wait(child, timeout=60).status is fa.JobStatus.COMPLETED
        assert "flowactors-inbox" not in {t.name for t in threading.enumerate()}
    assert list(tmp_path.iterdir()) == []
    assert not files.fs.exists(files.root)


def test_a_fork_from_a_checkpoint_file_shares_the_file_in_a_runtime_and_from_the_cli(tmp_path):
    """A checkpoint above the inline threshold lives as a file: `Runtime.fork` and `flowactors
    fork` (no runtime owning the log) start children from it without copying it, the children
    train, and the log verifies, its files included."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        parent = rt.submit(bulky_spec(n_iterations=5), job_id="parent")
        assert rt.wait(parent, timeout=60).status is fa.JobStatus.COMPLETED
        child = rt.fork(parent, at_iteration=4, job_id="child")
        assert rt.wait(child, timeout=60).status is fa.JobStatus.COMPLETED
    forked = CliRunner().invoke(main, ["fork", "parent", "--at", "4", "--db", str(db)])
    assert forked.exit_code == 0, forked.output
    with open_runtime(db) as rt:
        cli_child = forked.stdout.split()[-1]
        assert rt.wait(cli_child, timeout=60).status is fa.JobStatus.COMPLETED
        assert rt.state_store.files.files().keys() >= {
            c.state_ref for c in rt.checkpoints("parent") if c.iteration == 4}
    verified = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert verified.exit_code == 0, verified.output


def test_a_discarded_file_leaves_the_store_at_once_and_the_same_bytes_are_written_anew(
        tmp_path):
    """`discard` takes a file out of the store by a rename (its removal comes later): from
    then on it is not there, and a put of the same bytes writes it again."""
    files = FileCheckpoints(tmp_path / "files")
    data = os.urandom(BIG)
    address = files.put(data)
    name = files.discard(address)
    assert name is not None and name in files.leftovers()
    assert not files.has(address) and address not in files.files()
    assert files.discard(address) is None
    assert files.put(data) == address and files.get(address) == data
    files.remove_leftover(name)
    assert files.leftovers() == [] and files.get(address) == data



class Listing(list):
    """What `os.scandir` returns: entries to iterate, in a `with` or not."""

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_file_removed_while_the_directory_is_listed_does_not_hide_the_others(
        tmp_path, monkeypatch):
    """Discarded files are removed by another thread: one vanishing between the directory
    read and its stat is left out of the listing, and every other file is still listed
    (an open would otherwise call the files after it missing)."""
    files = FileCheckpoints(tmp_path / "files")
    kept = {files.put(os.urandom(BIG)) for _ in range(3)}
    vanishing = files.discard(files.put(os.urandom(BIG)))
    real_scandir = os.scandir

    def scandir_then_remove(path):  # noqa: ANN001, ANN202
        entries = sorted(real_scandir(path), key=lambda e: e.name != vanishing)  # it first
        (tmp_path / "files" / vanishing).unlink()
        return Listing(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_remove)
    assert set(files.files()) == kept
