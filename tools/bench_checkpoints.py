"""Checkpoint store benchmark: every figure next to its baseline, measured in the same run.

    python tools/bench_checkpoints.py [--quick] [--dir DIR] [--only SECTION ...]

- threshold: appending an event with a state in the log vs storing it as a file first and
  appending the event without it, for small sizes (where the inline threshold comes from);
- save: time until durable of a 1 MB, 64 MB, 512 MB state through the checkpoint store vs plain
  `write` + `fsync` of the same bytes, vs the log's blob path (what every state took before),
  and vs `torch.save` + `fsync` when torch is installed;
- load: the checkpoint store's checked read vs a plain read of the file, from the page cache
  and from the disk (the file's cached pages dropped first);
- peak RSS of a process saving a 512 MB state, against the state's size;
- reopen: a runtime opening a log with 20 checkpoint files of 64 MB vs the same log shape with
  small states;
- stall: a job with a 512 MB state trained in place, checkpointing every 4th iteration: the
  time its iteration loop is blocked per checkpoint with background saves vs synchronous
  saves (the same job, its saves on its own thread), each against the same job without
  checkpoints; and meanwhile another job's longest gap between iterations, vs its gap beside
  the job without checkpoints;
- peak RSS of a process whose job saves a 512 MB state in the background.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowactors import GRPOConfig, JobSpec, Runtime, TrainingQuery  # noqa: E402
from flowactors.checkpointing import INLINE_MAX_BYTES, StateStore  # noqa: E402
from flowactors.events import JobStarted  # noqa: E402
from flowactors.filestore import FileCheckpoints  # noqa: E402
from flowactors.store import EventStore  # noqa: E402

MB = 1 << 20


def best(fn, repeat: int, setup=None) -> float:
    """The shortest of `repeat` runs of `fn`, each after `setup` (not timed)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + (64 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Evict a (written and synced) file's pages from the page cache: the next read is the
    disk's, as after a reboot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fresh(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for p in directory.iterdir():
        p.unlink()
    return directory


def bench_threshold(root: Path, repeat: int) -> None:
    print("threshold: event + state in the log vs file first, then the event (full fsync)")
    with EventStore(root / "threshold.db", synchronous="full") as log:
        files = FileCheckpoints(root / "threshold.files")
        version = [0]

        def in_log(data: bytes) -> None:
            log.append("t", [JobStarted()], version[0], blobs=[data])
            version[0] += 1

        def as_file(data: bytes) -> None:
            files.put(data)
            log.append("t", [JobStarted()], version[0])
            version[0] += 1

        for size in (16 << 10, 64 << 10, 128 << 10, 256 << 10, 1 * MB, 4 * MB):
            samples = [os.urandom(size) for _ in range(repeat)]
            it = iter(samples)
            t_log = best(lambda: in_log(next(it)), repeat)
            it = iter(samples[::-1])
            t_file = best(lambda: as_file(next(it)), repeat)
            print(f"  {size >> 10:>6} KiB: in log {t_log * 1e3:7.2f} ms   file + event "
                  f"{t_file * 1e3:7.2f} ms   (file/log {t_file / t_log:4.2f}x)")


def bench_save_load(root: Path, sizes: list[int], repeat: int) -> None:
    print("save until durable (MB/s; the best of %d runs, of 10 up to 16 MB)" % repeat)
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    for size in sizes:
        repeat_size = 10 if size <= 16 * MB else repeat  # a small save is over in a few ms
        data = os.urandom(size)
        store = StateStore(EventStore(root / f"save{size}.db", synchronous="full"),
                           FileCheckpoints(fresh(root / f"save{size}.files")))
        plain = root / "plain.bin"
        t_plain = best(lambda: plain_write(plain, data), repeat_size)

        t_store = best(lambda: store.store(data), repeat_size,
                       setup=lambda: fresh(root / f"save{size}.files"))
        version = [0]

        def in_log() -> None:
            store.log.append("s", [JobStarted()], version[0], blobs=[data])
            version[0] += 1
        t_log = best(in_log, 1) if size <= 512 * MB else float("nan")
        line = (f"  {size // MB:>4} MB: store {size / MB / t_store:7.1f}   plain write+fsync "
                f"{size / MB / t_plain:7.1f} ({t_plain / t_store:4.0%} of it)   "
                f"log blob (before) {size / MB / t_log:7.1f}")
        if torch is not None:
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)

            def torch_save() -> None:
                with open(root / "torch.pt", "wb") as f:
                    torch.save(tensor, f)
                    f.flush()
                    os.fsync(f.fileno())
            t_torch = best(torch_save, repeat_size)
            line += f"   torch.save+fsync {size / MB / t_torch:7.1f}"
        else:
            line += "   torch.save: torch not installed"
        print(line)
        address = store.store(data).address
        # the file store itself: `store.get` would find the same bytes in the log (in_log above)
        file = root / f"save{size}.files" / address
        for where, setup in (("cached", None), ("disk", lambda: drop_cached(file))):
            t_get = best(lambda: store.files.get(address), repeat_size, setup)
            t_read = best(file.read_bytes, repeat_size, setup)
            print(f"           load, {where:>6}: checked {size / MB / t_get:7.1f} MB/s   plain read "
                  f"{size / MB / t_read:7.1f} MB/s ({t_read / t_get:4.0%} of it)")
        store.log.close()
        del data


RSS_CHILD = """
import os, sys
def peak():  # VmHWM: unlike ru_maxrss, which execve keeps from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.path.insert(0, sys.argv[3])
from flowactors.checkpointing import StateStore
from flowactors.filestore import FileCheckpoints
from flowactors.store import EventStore
data = os.urandom(1 << 20) * (int(sys.argv[2]) >> 20)  # touched pages, no big temporary
before = peak()
StateStore(EventStore(sys.argv[1] + ".db"), FileCheckpoints(sys.argv[1])).store(data)
print(before, peak())
"""


def bench_rss(root: Path, size: int) -> None:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(root / "rss"), str(size),
                          str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True).stdout.split()
    before, peak = (int(x) * 1024 for x in out)
    print(f"peak RSS saving {size // MB} MB: {peak / MB:.0f} MB (state {size / MB:.0f} MB; "
          f"{before / MB:.0f} MB before the save; goal <= 2x state + 300 MB = "
          f"{(2 * size) / MB + 300:.0f} MB)")


def bench_reopen(root: Path, state_bytes: int, repeat: int) -> None:
    queries = [TrainingQuery(query=f"q{i}") for i in range(4)]

    def spec(n: int) -> JobSpec:
        return JobSpec(agent_id="a", training_data=queries, task="bulky_task:Bulky",
                       task_options={"state_bytes": n},
                       config=GRPOConfig(n_iterations=20, checkpoint_interval=1,
                                         keep_checkpoints=20, batch_size=2, eval_fraction=0,
                                         n_trajectories_per_query=1))

    times = {}
    for name, n in (("with files", state_bytes), ("small states", 1000)):
        db = root / f"reopen-{name.replace(' ', '-')}.db"
        with Runtime(db, synchronous="off", handle_signals=False) as rt:
            rt.wait(rt.submit(spec(n)), timeout=600)

        def reopen() -> None:
            Runtime(db, synchronous="off", handle_signals=False).close()
        times[name] = best(reopen, repeat)
    print(f"reopen, 20 checkpoints of {state_bytes // MB} MB as files: "
          f"{times['with files'] * 1e3:.0f} ms   without (small states in the log): "
          f"{times['small states'] * 1e3:.0f} ms   (+{(times['with files'] - times['small states']) * 1e3:.0f} ms)")


def bulky(size: int, n: int, interval: int, update_seconds: float) -> JobSpec:
    return JobSpec(agent_id="a", training_data=[TrainingQuery(query=f"q{i}") for i in range(4)],
                   task="bulky_task:Bulky",
                   task_options={"state_bytes": size, "update_seconds": update_seconds,
                                 "in_place": True},
                   config=GRPOConfig(n_iterations=n, checkpoint_interval=interval,
                                     keep_checkpoints=1, batch_size=2, eval_fraction=0,
                                     n_trajectories_per_query=1))


def iteration_times(rt: Runtime, job: str) -> list[float]:
    """When each iteration was committed (seconds, from the log's own timestamps)."""
    return [r.recorded_at.timestamp() for r in rt.history(job)
            if r.type == "job.iteration_completed"]


def run_pair(root: Path, name: str, size: int, n: int, interval: int, update: float,
             background: bool) -> tuple[float, float]:
    """The big job's mean time per iteration before its last (whose state it saves at the
    end), and the other job's longest gap between iterations meanwhile."""
    db = root / f"stall-{name}.db"
    with Runtime(db, synchronous="normal", handle_signals=False) as rt:
        if not background:
            rt.saves = None  # every save on its job's thread, as before
        other = rt.submit(bulky(1000, 100_000, 100_000, 0.01))
        big = rt.submit(bulky(size, n, interval, update))
        rt.wait(big, timeout=600)
        rt.cancel(other)
        times = iteration_times(rt, big)
        window = (times[1], times[-2])  # from iteration 2 (the state exists) to n-1
        per_iteration = (window[1] - window[0]) / (len(times) - 3)
        others = [t for t in iteration_times(rt, other) if window[0] <= t <= window[1]]
        gap = max(b - a for a, b in zip(others, others[1:]))
    for p in root.glob(f"stall-{name}.db*"):
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
        else:
            p.unlink()
    return per_iteration, gap


def bench_stall(root: Path, size: int, n: int, update: float, interval: int) -> None:
    plain_it, plain_gap = run_pair(root, "none", size, n, n + 1, update, True)
    sync_it, sync_gap = run_pair(root, "sync", size, n, interval, update, False)
    bg_it, bg_gap = run_pair(root, "bg", size, n, interval, update, True)
    per_checkpoint = (n - 3) / interval  # checkpoints per iteration of the window, times it
    sync_stall = (sync_it - plain_it) * interval
    bg_stall = (bg_it - plain_it) * interval
    print(f"stall per checkpoint, {size // MB} MB state trained in place, a checkpoint every "
          f"{interval} iterations of {plain_it * 1e3:.0f} ms ({n} iterations; "
          f"{per_checkpoint:.1f} checkpoints measured):")
    print(f"  synchronous save:          {sync_stall * 1e3:7.0f} ms")
    print(f"  background save:           {bg_stall * 1e3:7.0f} ms   "
          f"({bg_stall / sync_stall:.0%} of the synchronous stall; goal <= 10%)")
    print(f"another job's longest gap between iterations: {bg_gap * 1e3:.0f} ms with background "
          f"saves beside it, {sync_gap * 1e3:.0f} ms with synchronous ones, {plain_gap * 1e3:.0f} "
          f"ms beside the job without checkpoints ({bg_gap / plain_gap:.1f}x; goal <= 2x)")


RSS_JOB_CHILD = """
import os, sys
def peak():  # VmHWM: unlike ru_maxrss, which execve keeps from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, sys.argv[4])
from bench_checkpoints import bulky
from flowactors import Runtime
size = int(sys.argv[2])
with Runtime(sys.argv[1], synchronous="normal", handle_signals=False) as rt:
    rt.wait(rt.submit(bulky(size, 5, 2, 0.3)), timeout=600)
print(peak())
"""


def bench_job_rss(root: Path, size: int) -> None:
    tools = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", RSS_JOB_CHILD, str(root / "rssjob.db"),
                          str(size), str(tools.parent), str(tools)],
                         capture_output=True, text=True, check=True).stdout.split()
    peak = int(out[-1]) * 1024
    print(f"peak RSS of a job saving {size // MB} MB states in the background (5 iterations, "
          f"checkpoints 2, 4 in the background, the final state on the job's thread): "
          f"{peak / MB:.0f} MB (goal <= 2x state + 300 MB = {(2 * size) / MB + 300:.0f} MB)")


SECTIONS = ("threshold", "save", "rss", "reopen", "stall", "job-rss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a disk)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    args = parser.parse_args()
    run = set(args.only or SECTIONS)
    repeat = 2 if args.quick else 3
    sizes = [1 * MB, 16 * MB] if args.quick else [1 * MB, 64 * MB, 512 * MB]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"inline threshold: {INLINE_MAX_BYTES >> 10} KiB")
        if "threshold" in run:
            bench_threshold(root, 5 if args.quick else 10)
        if "save" in run:
            bench_save_load(root, sizes, repeat)
        if "rss" in run:
            bench_rss(root, 64 * MB if args.quick else 512 * MB)
        if "reopen" in run:
            bench_reopen(root, 4 * MB if args.quick else 64 * MB, repeat)
        stall_size = 64 * MB if args.quick else 512 * MB
        if "stall" in run:
            # checkpoints further apart than a save takes: one in flight at a time never waits
            bench_stall(root, stall_size, 11 if args.quick else 15, 1.0, 4)
        if "job-rss" in run:
            bench_job_rss(root, stall_size)


if __name__ == "__main__":
    main()
