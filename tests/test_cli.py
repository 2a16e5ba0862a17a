"""The `flowactors` command through its public face: click's CliRunner and real processes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pty
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec, wait_until

import flowactors as fa
from flowactors import job as core
from flowactors import schemas as schema_files
from flowactors import testing
from flowactors.cli import main
from flowactors.console import ORPHANED, LogStatus
from flowactors.events import (
    IterationCompleted,
    JobCompleted,
    JobPaused,
    JobRecovered,
    JobStarted,
    JobSubmitted,
)
from flowactors.store import EventStore

ROOT = Path(__file__).resolve().parents[1]
CRASH_CHILD = ROOT / "tools" / "crash_child.py"
README = ROOT / "README.md"
READ_ONLY = [["status"], ["status", "done"], ["history", "done"], ["replay"],
             ["replay", "--check"], ["verify"], ["export"], ["checkpoints", "done"]]


def run(*args: str, db: Path | None = None):
    """Invoke the command in-process; stdout and stderr stay separate."""
    argv = [*args, *(["--db", str(db)] if db is not None else [])]
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def one_error_line(result) -> str:
    """The single `error: ...` line a failed command printed (and nothing else)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A real log: a completed job (one checkpoint pruned), a failed one, a budget-stopped
    one; with the runtime's own final views."""
    path = tmp_path_factory.mktemp("cli") / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec("a", n_iterations=6, keep_checkpoints=1), job_id="done")
        rt.submit(sim_spec("b", task_options={"fail_at_iteration": 3}), job_id="failed")
        rt.submit(sim_spec("c", n_iterations=10, max_budget_usd=3.5,
                           task_options={"cost_per_trajectory_usd": 0.25}), job_id="budget")
        views = [rt.wait(j, timeout=30) for j in ("done", "failed", "budget")]
    return path, views


@pytest.fixture
def db(log) -> Path:
    return log[0]


def copy_log(source: Path, target: Path) -> Path:
    """A consistent copy through SQLite's backup API (the source may have a WAL)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return target


def file_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (path, Path(f"{path}-wal")) if p.exists()}


# --- status, history -------------------------------------------------------------------


def test_status_lists_every_job_as_the_runtime_saw_it(log):
    """The table has one row per job with status, iteration/total, cost and best
    checkpoint; --json gives the runtime's own final views."""
    path, views = log
    result = run("status", db=path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "AGENT", "STATUS", "ITERATION", "AVG", "REWARD",
                                "COST", "BEST"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["done"][2:4] == ["completed", "6/6"]
    assert lines[-1] == f"no runtime owns {path} now"  # no job waits: no hint about `*`
    assert rows["failed"][2:4] == ["failed", "2/5"]
    assert rows["budget"][2:4] == ["failed", "4/10"] and rows["budget"][5] == "$4.0000"
    as_json = msgspec.json.decode(run("status", "--json", db=path).stdout, type=LogStatus)
    assert as_json.jobs == views and as_json.owner is None


def test_status_of_one_job_shows_its_detail(log):
    """`status JOB` shows progress, cost, budget, the error; --json is its JobView."""
    path, views = log
    text = run("status", "budget", db=path).stdout
    assert re.search(r"^status\s+failed$", text, re.M)
    assert re.search(r"^progress\s+4/10 iterations \(40%\)$", text, re.M)
    assert "$4.0000 of $3.5000" in text and "budget_exhausted: BudgetExhausted" in text
    view = msgspec.json.decode(run("status", "done", "--json", db=path).stdout,
                               type=fa.JobView)
    assert view == views[0]


def test_history_prints_one_line_per_event_and_json_gives_the_events(db):
    """The timeline shows position, version, time, type and a summary per event; --json
    lines read back as the recorded events."""
    with EventStore(db, mode="readonly") as store:
        events = list(store.read_stream("failed"))
    text = run("history", "failed", db=db).stdout.splitlines()
    assert text[0].split()[:3] == ["POSITION", "VERSION", "TIME"]
    assert len(text) == len(events) + 1
    for line, recorded in zip(text[1:], events):
        fields = line.split()
        assert int(fields[0]) == recorded.position and int(fields[1]) == recorded.version
        assert fields[4] == recorded.type
    assert "failed (task_error) after iteration 2: RuntimeError" in text[-1]
    lines = run("history", "failed", "--json", db=db).stdout.splitlines()
    parsed = [testing.parse_history_line(line) for line in lines]
    assert parsed == [msgspec.structs.replace(r, hash="") for r in events]


# --- replay ------------------------------------------------------------------------------


def test_replay_rebuilds_the_state_at_any_position(db):
    """--until gives the state after that position: the fold of the events up to it."""
    with EventStore(db, mode="readonly") as store:
        events = list(store.read_all())
    budget = [r for r in events if r.stream == "budget"]  # its jobs ran at once, interleaved
    until = budget[len(budget) // 2].position
    expected = core.fold([r for r in budget if r.position <= until])
    result = run("replay", "--job", "budget", "--until", str(until), "--json", db=db)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["jobs"]
    assert entry["state_digest"] == core.state_digest(expected)
    assert entry["view"]["progress"]["current_iteration"] == expected.iteration
    text = run("replay", "--job", "budget", "--until", str(until), db=db).stdout
    assert text.startswith("state after position ") and core.state_digest(expected) in text
    table = run("replay", db=db).stdout
    assert "done" in table and "budget" in table and "STATE DIGEST" in table


def test_replay_check_passes_on_a_real_log(db):
    """Every digest recorded by checkpoint and terminal events is reproduced."""
    result = run("replay", "--check", db=db)
    assert result.exit_code == 0, result.output
    assert re.match(r"ok: \d+ recorded state digests match the replay \(\d+ events, 3 jobs\)",
                    result.stdout)


def test_replay_check_fails_naming_the_position_when_evolve_changed(db, monkeypatch):
    """A change to evolve that alters old histories (here: it counts every iteration's tokens
    twice) makes --check exit 1, naming the first event whose recorded digest differs."""
    original = core.evolve

    def drifted(state, recorded):
        state = original(state, recorded)
        if isinstance(recorded.event, IterationCompleted):
            state = msgspec.structs.replace(state, tokens=state.tokens + recorded.event.tokens)
        return state

    with EventStore(db, mode="readonly") as store:
        victim = next(r for r in store.read_all() if core.recorded_digest(r.event))
    monkeypatch.setattr(core, "evolve", drifted)
    result = run("replay", "--check", db=db)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert f"replay check failed at position {victim.position} (job {victim.stream!r}" in line
    assert victim.event.state_digest in line


# --- verify ------------------------------------------------------------------------------


def test_verify_passes_and_prints_the_head_hash(db):
    """A good log verifies; the printed head hash is the store's; --expect-head accepts it."""
    with EventStore(db, mode="readonly") as store:
        position, head = store.head()
    result = run("verify", db=db)
    assert result.exit_code == 0, result.output
    assert f"head: position {position}, hash {head}" in result.stdout
    assert run("verify", "--expect-head", head, db=db).exit_code == 0


def tamper(source: Path, target: Path, *statements, params=()) -> Path:
    """A copy of the log changed behind the store's back (its append-only triggers dropped)."""
    copy_log(source, target)
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        for name in ("events_no_update", "events_no_delete", "blobs_no_update"):
            conn.execute(f"DROP TRIGGER {name}")
        for statement, values in zip(statements, params or [()] * len(statements)):
            conn.execute(statement, values)
    finally:
        conn.close()
    return target


def test_verify_detects_an_edited_payload(db, tmp_path):
    """An event whose data was rewritten (a believable event, still decodable) fails at its
    position."""
    with EventStore(db, mode="readonly") as store:
        victim = next(r for r in store.read_all() if r.type == "job.iteration_completed")
    forged = msgspec.msgpack.encode(msgspec.structs.replace(victim.event, avg_reward=0.99))
    copy = tamper(db, tmp_path / "edited.db", "UPDATE events SET data = ? WHERE position = ?",
                  params=[(forged, victim.position)])
    result = run("verify", db=copy)
    assert result.exit_code == 1
    assert f"verification failed at position {victim.position}" in one_error_line(result)
    assert "head: position" in result.stdout


def test_verify_detects_a_removed_row(db, tmp_path):
    """A deleted event leaves a gap: verify names the missing position."""
    copy = tamper(db, tmp_path / "removed.db", "DELETE FROM events WHERE position = 7")
    result = run("verify", db=copy)
    assert result.exit_code == 1
    assert "at position 7: position 7 is missing" in one_error_line(result)


def test_verify_detects_a_reordered_pair(db, tmp_path):
    """Two events swapped (each keeps its own hash) break the chain at the first of them."""
    copy = copy_log(db, tmp_path / "source.db")
    conn = sqlite3.connect(copy)
    rows = {r[0]: r for r in conn.execute(
        "SELECT * FROM events WHERE position IN (8, 9)").fetchall()}
    conn.close()
    swapped = tamper(
        copy, tmp_path / "swapped.db",
        "DELETE FROM events WHERE position IN (8, 9)",
        "INSERT INTO events VALUES (8, ?, ?, ?, ?, ?, ?, ?)",
        "INSERT INTO events VALUES (9, ?, ?, ?, ?, ?, ?, ?)",
        params=[(), rows[9][1:], rows[8][1:]])
    result = run("verify", db=swapped)
    assert result.exit_code == 1
    assert "verification failed at position 8" in one_error_line(result)


def test_verify_detects_an_edited_blob_and_a_cut_off_tail(db, tmp_path):
    """An edited checkpoint blob fails its content address; a log cut after the head hash
    printed earlier fails --expect-head (and only then: alone it looks whole)."""
    edited = tamper(db, tmp_path / "blob.db",
                    "UPDATE blobs SET data = CAST(x'00' || data AS BLOB) WHERE rowid = "
                    "(SELECT min(rowid) FROM blobs)")
    result = run("verify", db=edited)
    assert result.exit_code == 1 and "does not match its address" in one_error_line(result)
    with EventStore(db, mode="readonly") as store:
        position, head = store.head()
    cut = tamper(db, tmp_path / "cut.db", f"DELETE FROM events WHERE position = {position}")
    assert run("verify", db=cut).exit_code == 0
    result = run("verify", "--expect-head", head, db=cut)
    assert result.exit_code == 1
    assert f"at position {position}: the expected head hash" in one_error_line(result)


# --- export ----------------------------------------------------------------------------


def test_export_writes_every_event_as_a_history_line(db, tmp_path):
    """JSONL in log order, one recorded event per line, exactly the HistoryLine shape;
    load_history reads it back; --job and --from select."""
    result = run("export", db=db)
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    decoded = [msgspec.json.decode(line, type=testing.HistoryLine) for line in lines]
    with EventStore(db, mode="readonly") as store:
        events = list(store.read_all())
    assert [d.position for d in decoded] == [r.position for r in events]
    out = tmp_path / "all.jsonl"
    out.write_text(result.stdout)
    assert testing.load_history(out) == [msgspec.structs.replace(r, hash="") for r in events]
    some = run("export", "--job", "budget", "--from", "10", db=db).stdout.splitlines()
    assert [json.loads(line)["position"] for line in some] == \
        [r.position for r in events if r.stream == "budget" and r.position >= 10]


def test_verbose_logs_go_to_stderr_and_never_into_the_exported_lines(db):
    """-v logs what the store does, on stderr: stdout stays pure JSON lines."""
    result = run("-v", "export", db=db)
    assert result.exit_code == 0
    assert "store_opened" in result.stderr
    assert all(line.startswith('{"position":') for line in result.stdout.splitlines())


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoints_lists_them_and_saves_one_state(db, tmp_path):
    """The list has every checkpoint (pruned ones marked); --save writes the stored state,
    which decodes as the task's trainer state."""
    with EventStore(db, mode="readonly") as store:
        state = core.fold(store.read_stream("done"))
        infos = core.checkpoint_infos(state)
        kept = next(i for i in infos if not i.pruned)
        blob = store.get_blob(kept.state_ref)
    text = run("checkpoints", "done", db=db).stdout.splitlines()
    assert [line.split()[0] for line in text[1:]] == [str(i.iteration) for i in infos]
    assert any("pruned" in line for line in text) and "kept, best" in "\n".join(text)
    out = tmp_path / "state.msgpack"
    result = run("checkpoints", "done", "--save", str(kept.iteration), "--out", str(out),
                 db=db)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == blob
    from flowactors.tasks.simulated import SimulatedState
    assert msgspec.msgpack.decode(blob, type=SimulatedState).optimizer.step == kept.iteration
    listed = msgspec.json.decode(run("checkpoints", "done", "--json", db=db).stdout,
                                 type=list[fa.CheckpointInfo])
    assert listed == infos


def test_checkpoints_refuses_a_pruned_or_unknown_one(db, tmp_path):
    """A pruned checkpoint's state is gone; an iteration without a checkpoint is named."""
    with EventStore(db, mode="readonly") as store:
        infos = core.checkpoint_infos(core.fold(store.read_stream("done")))
    pruned = next(i for i in infos if i.pruned)
    out = tmp_path / "x"
    result = run("checkpoints", "done", "--save", str(pruned.iteration), "--out", str(out),
                 db=db)
    assert result.exit_code == 1 and "was pruned" in one_error_line(result)
    result = run("checkpoints", "done", "--save", "3", "--out", str(out), db=db)
    assert result.exit_code == 1 and "no checkpoint at iteration 3" in one_error_line(result)
    assert not out.exists()
    assert run("checkpoints", "done", "--save", "2", db=db).exit_code == 2


# --- user mistakes -----------------------------------------------------------------------


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_a_missing_log_is_one_clear_line_and_is_not_created(tmp_path, args):
    """Every read-only command on a missing file: one line, exit 1, nothing created."""
    missing = tmp_path / "missing.db"
    result = run(*args, db=missing)
    assert result.exit_code == 1 and result.stdout == ""
    assert one_error_line(result) == f"error: no flowactors log at {missing}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_a_foreign_file_is_one_clear_line_and_is_left_alone(tmp_path, args):
    """A text file and another application's SQLite database are refused, unchanged."""
    text = tmp_path / "notes.txt"
    text.write_text("not a log\n" * 20)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for path in (text, other):
        result = run(*args, db=path)
        assert result.exit_code == 1
        assert "is not a flowactors log" in one_error_line(result)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("args", [["status", "nope"], ["history", "nope"],
                                  ["replay", "--job", "nope"], ["export", "--job", "nope"],
                                  ["checkpoints", "nope"], ["pause", "nope"]], ids=" ".join)
def test_an_unknown_job_is_named(db, args):
    """An unknown job id: exit 1, one line naming the job and the log."""
    result = run(*args, db=db)
    assert result.exit_code == 1
    assert one_error_line(result) == f"error: job 'nope' not found in {db}"


@pytest.mark.parametrize("args", [["replay", "--until", "-1"], ["export", "--from", "0"],
                                  ["verify", "--expect-head", "xyz"], ["status", "--bogus"],
                                  ["history"], ["pause", "done", "--timeout", "-1"]],
                         ids=" ".join)
def test_a_bad_option_is_a_usage_error(db, args):
    """Bad options are click usage errors (exit 2), never a traceback."""
    result = run(*args, db=db)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Error:" in result.stderr


def test_a_real_process_reports_errors_without_traceback_nor_waiting_for_stdin(tmp_path):
    """As a real process, with stdin left open: one line on stderr, exit 1, no traceback."""
    missing = tmp_path / "missing.db"
    child = subprocess.Popen([sys.executable, "-m", "flowactors.cli", "status", "--db",
                              str(missing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.wait(timeout=30) == 1  # stdin is never closed: it must not be read
    finally:
        child.stdin.close()
    assert child.stdout.read() == b""
    assert child.stderr.read().decode().splitlines() == [f"error: no flowactors log at {missing}"]
    assert not missing.exists()


def test_read_only_commands_never_change_the_log(killed, tmp_path):
    """status, history, replay, verify, export and checkpoints leave a log — here a copy of
    one whose writer was killed, with committed events still in its WAL — byte for byte as
    it was (SQLite may only add an empty side file)."""
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "flow.db"
    for suffix in ("", "-wal"):
        shutil.copy(f"{killed}{suffix}", f"{copy}{suffix}")
    before = file_digests(copy)
    assert Path(f"{copy}-wal").stat().st_size > 0
    for args in READ_ONLY:
        args = [a.replace("done", "job-0") for a in args]
        assert run(*args, db=copy).exit_code == 0, args
    assert file_digests(copy) == before


# --- a log being written -----------------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    """A runtime writing a long job's events to its log while the test reads it."""
    path = tmp_path / "flow.db"
    rt = open_runtime(path)
    rt.submit(sim_spec(n_iterations=100_000, checkpoint_interval=3,
                       task_options={"rollout_seconds": 0.002}), job_id="job")
    wait_until(lambda: rt.status("job").progress.current_iteration >= 4, 30,
               "a few iterations")
    try:
        yield path, rt
    finally:
        rt.close()


def test_read_only_commands_work_while_a_runtime_writes(live):
    """status, verify, export and replay --check succeed on a log being appended to; the
    export is a consistent prefix (contiguous positions and versions)."""
    path, rt = live
    start = rt.status("job").version
    for _ in range(3):
        assert run("status", "job", db=path).exit_code == 0
        verified = run("verify", db=path)
        assert verified.exit_code == 0, verified.output
        checked = run("replay", "--check", db=path)
        assert checked.exit_code == 0, checked.output
        exported = run("export", db=path)
        lines = [json.loads(line) for line in exported.stdout.splitlines()]
        assert [ln["position"] for ln in lines] == list(range(1, len(lines) + 1))
        assert [ln["version"] for ln in lines] == list(range(1, len(lines) + 1))
    assert rt.status("job").version > start  # it was writing all along
    assert rt.status("job").status is fa.JobStatus.RUNNING


def follow(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flowactors.cli", "history", "job", "--follow", "--interval",
         "0.02", "--db", str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(child: subprocess.Popen, word: str) -> list[str]:
    lines = []
    for line in child.stdout:
        lines.append(line)
        if word in line:
            return lines
    raise AssertionError(f"output ended before {word!r}: {lines}")


def read_rest(child: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    """The rest of stdout and all of stderr, through the same buffered files that read_until
    used (communicate() would skip what they buffered); the child is killed after `timeout`."""
    guard = threading.Timer(timeout, child.kill)
    guard.start()
    try:
        out, err = child.stdout.read(), child.stderr.read()
        child.wait()
    finally:
        guard.cancel()
    return out, err


def test_history_follow_tails_a_live_log_until_the_job_ends(live):
    """--follow (a real process) prints events as the runtime records them and exits 0 once
    the job is terminal."""
    path, rt = live
    child = follow(path)
    try:
        seen = read_until(child, "job.iteration_completed")
        version = rt.status("job").version
        wait_until(lambda: rt.status("job").version > version + 3, 30, "more events")
        rt.cancel("job")
        rest, _ = read_rest(child)
    finally:
        child.kill()
    assert child.returncode == 0
    lines = seen[1:] + rest.splitlines()
    versions = [int(line.split()[1]) for line in lines]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == rt.status("job").version > version + 3
    assert "job.cancelled" in lines[-1]


def test_history_follow_stops_cleanly_on_ctrl_c(live):
    """SIGINT (Ctrl-C) ends --follow with exit 0 and no traceback."""
    path, _ = live
    child = follow(path)
    try:
        read_until(child, "job.iteration_completed")
        child.send_signal(signal.SIGINT)
        _, err = read_rest(child)
    finally:
        child.kill()
    assert child.returncode == 0 and "Traceback" not in err


def test_long_reads_show_progress_on_a_terminal_only(tmp_path):
    """Progress goes to stderr when it is a terminal, never to stdout; none otherwise."""
    path = tmp_path / "big.db"
    spec = sim_spec()
    iterations = [IterationCompleted(iteration=i, avg_reward=0.5, std_reward=0.1, loss=0.1)
                  for i in range(1, 2500)]
    with EventStore(path, mode="owner", synchronous="off") as store:
        store.append("big", [JobSubmitted(spec=spec), JobStarted(), *iterations], 0)
    primary, secondary = pty.openpty()
    try:
        child = subprocess.run([sys.executable, "-m", "flowactors.cli", "export", "--db",
                                str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=secondary, timeout=60)
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert child.returncode == 0
    assert b"exporting: 1000/2501 events" in shown
    assert len(child.stdout.splitlines()) == 2501 and b"exporting" not in child.stdout
    plain = run("export", db=path)
    assert plain.stderr == ""


# --- a log whose writer was killed, then resumed -------------------------------------------


def crash_child_spec() -> fa.JobSpec:
    spec_ = importlib.util.spec_from_file_location("crash_child", CRASH_CHILD)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.job_specs(1, 7, 2)["job-0"]


def start_child(db: Path, faults: str | None, fault_file: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWACTORS_FAULT")}
    if faults:
        env.update(FLOWACTORS_FAULTS=faults, FLOWACTORS_FAULT_FILE=str(fault_file))
    return subprocess.Popen([sys.executable, str(CRASH_CHILD), str(db), "1", "7", "2"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.fixture
def killed(tmp_path) -> Path:
    """A log whose runtime process was SIGKILLed mid-run: job-0 has recorded iteration 5, its
    last checkpoint is iteration 4, and the file still has the killed writer's WAL."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child = start_child(db, "actor.checkpoint@3", fault_file)  # freezes before checkpoint 6
    wait_until(lambda: fault_file.read_text() or child.poll() is not None, 60,
               "the fault point")
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    child.stderr.close()
    return db


def test_status_says_who_owns_the_log_and_marks_the_jobs_of_a_killed_runtime(tmp_path):
    """While a runtime process owns the log, `status` names its pid and host and its running
    job is plain `running`; once it is SIGKILLed, the same job is marked as waiting for the
    next open, in the table, in `status JOB` and in --json (owner null)."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child = start_child(db, "actor.checkpoint@3", fault_file)  # freezes, owning the log
    try:
        wait_until(lambda: fault_file.read_text() or child.poll() is not None, 60,
                   "the fault point")
        assert child.poll() is None, child.stderr.read().decode()
        owned = run("status", db=db).stdout.splitlines()
        assert owned[-1].startswith(f"{db} is owned by pid {child.pid} on "), owned
        assert owned[1].split()[2] == "running"
        as_json = msgspec.json.decode(run("status", "--json", db=db).stdout)
        assert as_json["owner"]["pid"] == child.pid and as_json["jobs"][0]["waiting"] is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stderr.close()
    orphaned = run("status", db=db).stdout.splitlines()
    assert orphaned[1].split()[2] == "running*", orphaned
    assert orphaned[-1].startswith(f"no runtime owns {db} now: jobs marked * resume when the "
                                   "log is opened"), orphaned
    as_json = msgspec.json.decode(run("status", "--json", db=db).stdout)
    assert as_json["owner"] is None and as_json["log"] == str(db)
    assert as_json["jobs"][0]["waiting"] == ORPHANED
    one = msgspec.json.decode(run("status", "job-0", "--json", db=db).stdout, type=fa.JobView)
    assert one.status is fa.JobStatus.RUNNING and one.waiting == ORPHANED
    assert "running (waiting: no runtime owns its log now" in run("status", "job-0", db=db).stdout


def test_a_killed_writers_log_and_its_copy_can_be_inspected_then_resume(killed, tmp_path):
    """On a copy of the killed runtime's files: status shows the job running, verify and
    replay --check pass. After a restart resumes and completes it, the crashed-and-resumed
    log passes replay --check and verify too."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{killed}{suffix}").exists():
            shutil.copy(f"{killed}{suffix}", copy / f"flow.db{suffix}")
    status = run("status", "job-0", "--json", db=copy / "flow.db")
    view = msgspec.json.decode(status.stdout, type=fa.JobView)
    assert view.status is fa.JobStatus.RUNNING and view.progress.current_iteration == 5
    assert run("verify", db=copy / "flow.db").exit_code == 0
    assert run("replay", "--check", db=copy / "flow.db").exit_code == 0
    child = start_child(killed, None, tmp_path / "unused")
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    child.stderr.close()
    checked = run("replay", "--check", db=killed)
    assert checked.exit_code == 0, checked.output
    assert run("verify", db=killed).exit_code == 0
    resumed = msgspec.json.decode(run("status", "job-0", "--json", db=killed).stdout,
                                  type=fa.JobView)
    assert resumed.status is fa.JobStatus.COMPLETED and resumed.attempts == 1


def test_pausing_a_killed_runtimes_job_then_resuming_it_trains_the_same_policy(killed,
                                                                              tmp_path):
    """With no runtime running, `pause` decides directly (the recovery, then the pause); a
    new runtime resumes the job and it completes with the final state of an uninterrupted
    run, bit for bit."""
    result = run("pause", "job-0", db=killed)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("paused job job-0: it is paused (no runtime owns the "
                                     "log: decided directly)")
    with EventStore(killed, mode="readonly") as store:
        tail = [r.event for r in store.read_stream("job-0")][-2:]
    assert tail == [JobRecovered(from_checkpoint=4, attempt=1, cause="crash"),
                    JobPaused(iteration=4, state_ref=None)]
    with open_runtime(killed) as rt:
        assert rt.status("job-0").status is fa.JobStatus.PAUSED  # not resumed on open
        rt.resume("job-0")
        rt.wait("job-0", timeout=60)
        final = [r.event for r in rt.history("job-0")][-1]
    with open_runtime(tmp_path / "reference.db") as rt:
        rt.submit(crash_child_spec(), job_id="job-0")
        rt.wait("job-0", timeout=60)
        reference = [r.event for r in rt.history("job-0")][-1]
    assert isinstance(final, JobCompleted) and isinstance(reference, JobCompleted)
    assert final.final_state_digest == reference.final_state_digest
    assert run("replay", "--check", db=killed).exit_code == 0


# --- control through the inbox -------------------------------------------------------------


def test_pause_resume_cancel_through_a_live_runtimes_inbox(live):
    """While a runtime owns the log, the commands leave requests it applies: exit 0 once
    applied; a rejected one exits 1 with the owner's reason."""
    path, rt = live
    result = run("pause", "job", db=path)
    assert result.exit_code == 0, result.output
    # (the last line: this runtime shares the process, its own log lines may come first)
    assert result.stdout.splitlines()[-1] == "paused job job: it is paused"
    assert rt.status("job").status is fa.JobStatus.PAUSED
    assert run("resume", "job", db=path).exit_code == 0
    assert rt.status("job").status in (fa.JobStatus.QUEUED, fa.JobStatus.RUNNING)
    assert run("cancel", "job", db=path).exit_code == 0
    assert rt.status("job").status is fa.JobStatus.CANCELLED
    rejected = run("pause", "job", db=path)
    assert rejected.exit_code == 1
    assert one_error_line(rejected) == \
        "error: pause rejected: cannot pause job 'job': it is cancelled"


def test_an_unanswered_request_times_out_with_exit_3(tmp_path):
    """An owner that does not answer (here: a bare store holding the log) leaves the command
    waiting only up to --timeout; the request stays in the inbox."""
    path = tmp_path / "flow.db"
    with EventStore(path, mode="owner", synchronous="off") as owner:
        owner.append("job", [JobSubmitted(spec=sim_spec())], 0)
        result = run("pause", "job", "--timeout", "0.2", db=path)
        pending = owner.pending_requests()
    assert result.exit_code == 3
    assert "did not answer request" in one_error_line(result)
    assert [(r.job_id, r.command) for r in pending] == [("job", "pause")]


def test_a_waiting_command_decides_itself_once_the_owner_is_gone(tmp_path):
    """The owner goes away without answering: the waiting command (a real process) owns the
    log, decides directly, and answers its own request."""
    path = tmp_path / "flow.db"
    owner = EventStore(path, mode="owner", synchronous="off")
    try:
        owner.append("job", [JobSubmitted(spec=sim_spec())], 0)
        child = subprocess.Popen([sys.executable, "-m", "flowactors.cli", "pause", "job",
                                  "--db", str(path)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (request,) = wait_until(owner.pending_requests, 30, "the request")
    finally:
        owner.close()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "decided directly" in out
    with EventStore(path, mode="readonly") as store:
        assert store.answer_of(request.id).outcome == "applied"
        assert core.fold(store.read_stream("job")).status is fa.JobStatus.PAUSED


def test_with_no_runtime_resume_and_cancel_decide_directly(tmp_path):
    """resume and cancel with no runtime running: recorded at once, illegal ones refused."""
    path = tmp_path / "flow.db"
    with EventStore(path, mode="owner", synchronous="off") as owner:
        owner.append("job", [JobSubmitted(spec=sim_spec()), JobPaused(iteration=0)], 0)
    result = run("resume", "job", db=path)
    assert result.exit_code == 0 and "resumed job job: it is queued" in result.stdout
    again = run("resume", "job", db=path)
    assert again.exit_code == 1
    assert one_error_line(again) == \
        "error: resume rejected: cannot resume job 'job': it is queued"
    assert run("cancel", "job", db=path).exit_code == 0
    with EventStore(path, mode="readonly") as store:
        assert [r.type for r in store.read_stream("job")] == [
            "job.submitted", "job.paused", "job.resumed", "job.cancelled"]


# --- schemas and documentation -----------------------------------------------------------


def test_the_committed_schemas_are_those_the_code_generates():
    """schemas/ holds exactly the generated files (run `flowactors schemas` after changing
    an event, JobSpec, JobView or HistoryLine)."""
    assert schema_files.differences(schema_files.SOURCE_DIR) == []
    assert run("schemas", "--check").exit_code == 0


def test_schemas_writes_and_checks_a_directory(tmp_path):
    """`schemas --dir` writes one file per event type and schema version (old ones too);
    --check lists a changed and a stale file and exits 1; writing again repairs both."""
    assert run("schemas", "--dir", str(tmp_path)).exit_code == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"job.iteration_completed.v1.json", "job.iteration_completed.v2.json",
            "job.submitted.v1.json", "JobSpec.json", "JobView.json",
            "HistoryLine.json"} <= names
    line_schema = json.loads((tmp_path / "HistoryLine.json").read_text())
    assert set(line_schema["$defs"]["HistoryLine"]["properties"]) == {
        "position", "stream", "version", "type", "schema_version", "recorded_at", "data"}
    (tmp_path / "JobSpec.json").write_text("{}\n")
    (tmp_path / "job.gone.v1.json").write_text("{}\n")
    result = run("schemas", "--check", "--dir", str(tmp_path))
    assert result.exit_code == 1
    assert "JobSpec.json: differs from the code" in result.stderr
    assert "job.gone.v1.json: no such schema in the code" in result.stderr
    assert run("schemas", "--dir", str(tmp_path)).exit_code == 0
    assert run("schemas", "--check", "--dir", str(tmp_path)).exit_code == 0


def test_every_command_has_an_example_and_is_documented_in_the_readme():
    """Each subcommand's help shows an `Example:`; README.md shows each one in use."""
    readme = README.read_text()
    assert main.commands
    for name, command in main.commands.items():
        help_text = CliRunner().invoke(main, [name, "--help"]).output
        assert "Example:" in help_text, name
        assert re.search(rf"^flowactors {name}\b", readme, re.M), f"{name} not in README"
