"""Side-by-side benchmark of flowactors against DBOS and eventsourcing, on the same machine.

    python tools/bench_peers.py [--quick] [--reps N] [--venv DIR] [--json FILE]

The peers are never dependencies of the project: this script creates (once, idempotently) a
virtual environment of its own outside the repository (default
~/.cache/flowactors-bench/peers-venv), installs the pinned peers there plus this project's
dependencies, and runs every measurement as a fresh process of that environment
(tools/bench_peers_worker.py) in a fresh directory, with this working tree first on the path.
Systems alternate within each repetition (their order rotates), and each figure is the median of
the repetitions. Every system runs each workload at the same concurrency and with SQLite
settings at least as durable for flowactors as for the peer (printed from each system's own
connection).

Workloads:
  1. Durable steps: 100 jobs x 100 iterations of zero-cost work, all started together; every
     iteration durably recorded before the next one starts. flowactors: `simulated` jobs with
     zero-cost rollouts; DBOS: 100 workflows of 100 @DBOS.step, started with start_workflow;
     eventsourcing: 100 aggregates driven from 100 threads, one event saved per iteration.
  2. Recovery: the state of 1,000 jobs with 1,000 events each, rebuilt by a new process.
     flowactors: a log as a crash leaves it (real jobs writing at once, a checkpoint every 5
     iterations, SIGKILL; see tools/crashed_log.py), then open the runtime (it replays the
     whole log and starts every unfinished job's actor); eventsourcing: repository.get of each aggregate. DBOS re-executes pending
     workflows, replaying each recorded step from its database; that is measured against
     flowactors resuming the same number of unfinished (running) jobs, at a size DBOS finishes
     in reasonable time (--dbos-recovery).
  3. Status latency: p50/p99 of reading one job's state while 100 jobs run iterations of 2 ms
     of work each (flowactors: status(); DBOS: get_workflow_status; eventsourcing:
     repository.get of the aggregate).
  4. The limit: raw sqlite3 executemany of the same rows in ONE transaction, one commit per
     row, and raw SELECT + msgspec decode of the recovery log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "bench_peers_worker.py"
PEERS = {"dbos": "3.4.0", "eventsourcing": "9.5.6"}
DEFAULT_VENV = Path("~/.cache/flowactors-bench/peers-venv").expanduser()
SYSTEMS = ("flowactors", "dbos", "eventsourcing")
NAMES = {"flowactors": "flowactors", "dbos": "DBOS", "eventsourcing": "eventsourcing",
         "flowactors-crashed": "flowactors", "flowactors-running": "flowactors"}


# --- the peers' environment -------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    """Create the environment and install the pinned peers and the project's dependencies,
    unless a stamp says exactly that is already there."""
    wanted = json.dumps({"peers": PEERS, "python": sys.version.split()[0],
                         "pyproject": hashlib.sha256((REPO / "pyproject.toml").read_bytes())
                         .hexdigest()}, sort_keys=True)
    stamp = venv / ".flowactors-bench-stamp"
    python = venv_python(venv)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"setting up the peers' environment in {venv} (once) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = venv / "install.log"
    with open(log, "w") as out:
        # The project itself is installed for its dependencies; the workers import this
        # working tree (PYTHONPATH), so the code measured is always the code checked out.
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check",
             *[f"{name}=={version}" for name, version in PEERS.items()], str(REPO)],
            stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"installing the peers failed; see {log}")
    stamp.write_text(wanted)
    return python


def versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sqlite3, sys; print(json.dumps({n: "
            "m.version(n) for n in sys.argv[1:]} | {'sqlite': sqlite3.sqlite_version}))")
    out = subprocess.run([str(python), "-c", code, *PEERS, "sqlalchemy"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


# --- running workers ------------------------------------------------------------------------

class Runner:
    def __init__(self, python: Path, workdir: Path, synchronous: str) -> None:
        self.python = python
        self.workdir = workdir
        self.synchronous = synchronous
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.count = 0
        self.failures: list[str] = []

    def run(self, workload: str, system: str, *, timeout: float = 3600,
            **options: Any) -> dict[str, Any]:
        """One measurement in a fresh process and a fresh directory; its JSON result.

        A run that dies is reported and tried once more (so a rare crash does not lose the
        whole benchmark); the failures are listed with the table."""
        for attempt in (1, 2):
            self.count += 1
            directory = self.workdir / f"run-{self.count:03d}-{workload}-{system}"
            directory.mkdir(parents=True)
            args = [str(self.python), str(WORKER), workload, system, "--dir", str(directory),
                    "--synchronous", self.synchronous]
            for key, value in options.items():
                args += [f"--{key}", str(value)]
            os.sync()  # no writeback of an earlier run's files (or copies) during this one
            started = time.perf_counter()
            done = subprocess.run(args, capture_output=True, text=True, env=self.env,
                                  timeout=timeout, cwd=directory)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            shutil.rmtree(directory, ignore_errors=True)
            if done.returncode == 0 and lines:
                result = json.loads(lines[-1])
                result["wall_s"] = time.perf_counter() - started
                return result
            tail = [line for line in done.stderr.splitlines() if line.strip()][-12:]
            self.failures.append(f"{workload}/{system} (exit {done.returncode}): "
                                 + (tail[-1] if tail else "no output"))
            print(f"  {workload}/{system} failed (exit {done.returncode}), attempt {attempt}:",
                  *[f"    {line}" for line in tail], sep="\n", file=sys.stderr, flush=True)
        raise RuntimeError(f"{workload}/{system} failed twice")


def copy_history(source: Path, directory: Path) -> Path:
    """A private copy of a built history (the database and its side files but the lock),
    written out before it is timed: the kernel flushing hundreds of MB of dirty pages would
    otherwise share the machine with the measured open."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in source.parent.glob(source.name + "*"):
        if not path.name.endswith((".lock", "-shm")):
            shutil.copy(path, directory / path.name)
    os.sync()
    return directory / source.name


def rotate(items: tuple[str, ...] | list[str], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


# --- the table --------------------------------------------------------------------------------

def med(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 ** 2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.release()}, {model}, {os.cpu_count()} CPUs{memory}"


def filesystem(path: Path) -> str:
    """The file system type of the mount holding `path` (fsync costs depend on it)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and 2 repetitions: a smoke run of a few minutes")
    parser.add_argument("--reps", type=int, help="repetitions (default 5; 2 with --quick)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help=f"the peers' environment (default {DEFAULT_VENV})")
    parser.add_argument("--workdir", type=Path,
                        help="where the databases go (default: a temporary directory)")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"],
                        help="flowactors' durability (full: as durable as every peer)")
    parser.add_argument("--dbos-recovery", default=None, metavar="JOBSxEVENTS",
                        help="size of DBOS's recovery (default 100x200; 20x100 with --quick)")
    parser.add_argument("--json", type=Path, help="also write every raw result to this file")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="run nothing: print the table of a run saved with --json")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_report(saved["meta"], saved["results"])
        return 0
    reps = args.reps or (2 if args.quick else 5)
    steps_jobs, steps_iterations = (100, 30) if args.quick else (100, 100)
    rec_jobs, rec_events = (200, 1000) if args.quick else (1000, 1000)
    dbos_jobs, dbos_events = map(int, (args.dbos_recovery or
                                       ("20x100" if args.quick else "100x200")).split("x"))
    status_seconds = 1.0 if args.quick else 2.0

    python = ensure_venv(args.venv)
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(python, workdir, args.synchronous)
    meta: dict[str, Any] = {
        "versions": versions(python), "machine": machine(), "python": sys.version.split()[0],
        "filesystem": filesystem(workdir), "load_before": os.getloadavg()[0], "reps": reps,
        "synchronous": args.synchronous, "steps": [steps_jobs, steps_iterations],
        "recovery": [rec_jobs, rec_events], "dbos_recovery": [dbos_jobs, dbos_events],
        "status_jobs": 100}
    started = time.perf_counter()
    raw: dict[str, list[dict]] = {}

    def record(key: str, result: dict) -> None:
        raw.setdefault(key, []).append(result)

    try:
        print(f"building the recovery histories: {rec_jobs:,} jobs x {rec_events:,} events "
              f"(flowactors, eventsourcing), {dbos_jobs} x {dbos_events} (DBOS) ...",
              flush=True)
        builds = workdir / "builds"
        builds.mkdir()
        histories = {}
        for system, jobs, events in (("flowactors-crashed", rec_jobs, rec_events),
                                     ("eventsourcing", rec_jobs, rec_events),
                                     ("flowactors-running", dbos_jobs, dbos_events),
                                     ("dbos", dbos_jobs, dbos_events)):
            histories[system] = builds / f"{system}.db"
            built = runner.run("build", system, path=histories[system], jobs=jobs,
                               iterations=events)
            print(f"  {system}: {built['events']:,} events in {built['wall_s']:.0f} s",
                  flush=True)

        for rep in range(reps):
            print(f"repetition {rep + 1}/{reps} ...", flush=True)
            for system in rotate(SYSTEMS, rep):
                record(f"steps/{system}", runner.run(
                    "steps", system, jobs=steps_jobs, iterations=steps_iterations))
            for system in rotate(SYSTEMS, rep):
                record(f"status/{system}", runner.run(
                    "status", system, jobs=100, seconds=status_seconds))
            for system in rotate(("flowactors-crashed", "eventsourcing"), rep):
                copy = copy_history(histories[system], workdir / f"rep{rep}-{system}")
                record(f"recover/{system}", runner.run("recover", system, path=copy,
                                                       jobs=rec_jobs))
                shutil.rmtree(copy.parent)
            for system in rotate(("flowactors-running", "dbos"), rep):
                copy = copy_history(histories[system], workdir / f"rep{rep}-{system}")
                record(f"recover/{system}", runner.run("recover", system, path=copy,
                                                       jobs=dbos_jobs))
                shutil.rmtree(copy.parent)
            record("limit/raw", runner.run("limit", "raw", path=histories["flowactors-crashed"],
                                           jobs=steps_jobs, iterations=steps_iterations))
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        meta.update(load_after=os.getloadavg()[0], seconds=time.perf_counter() - started,
                    failures=runner.failures)
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "results": raw}, indent=1))
    print_report(meta, raw)
    return 0


HEADER = ("workload", "system", "figure (median, min–max)", "flowactors' ratio")


def fmt_us(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:,.1f} ms"
    return f"{us:.2f} µs" if us < 10 else f"{us:,.0f} µs"


def print_report(meta: dict[str, Any], raw: dict[str, list[dict]]) -> None:
    """The table: each figure's median (min–max) and flowactors' ratio to it."""
    v = meta["versions"]
    settings = {NAMES[key.split("/")[1]]: r[0]["settings"] for key, r in raw.items()
                if r and "settings" in r[0] and key.split("/")[1] in NAMES}
    settings["raw sqlite3"] = raw["limit/raw"][0]["settings"]
    print()
    print(f"flowactors vs DBOS {v['dbos']} (SQLAlchemy {v['sqlalchemy']}) and eventsourcing "
          f"{v['eventsourcing']}: median of {meta['reps']} repetitions; ratio = how many "
          f"times faster flowactors is")
    print(f"machine: {meta['machine']}; Python {meta['python']}, SQLite {v['sqlite']}; "
          f"databases on {meta['filesystem']}; load average {meta['load_before']:.1f} before, "
          f"{meta['load_after']:.1f} after; {meta['seconds']:.0f} s")
    print("SQLite settings, read from each system's own connection:")
    for name in ("flowactors", "DBOS", "eventsourcing", "raw sqlite3"):
        if name in settings:
            print(f"  {name:<14} {settings[name]}")
    if meta["synchronous"] != "full":
        print("  NOTE: flowactors ran with synchronous=NORMAL: LESS durable than the peers")

    rows: list[tuple[str, str, str, str]] = []
    ratios: dict[str, float] = {}
    limit = raw["limit/raw"]

    def figure(results: list[dict], key: str, unit: str, fmt: str) -> str:
        values = [r[key] for r in results]
        text = f"{format(statistics.median(values), fmt)}{unit}"
        if len(values) > 1:
            text += f" ({format(min(values), fmt)}–{format(max(values), fmt)})"
        return text

    jobs, iterations = meta["steps"]
    fa = raw["steps/flowactors"]
    fa_rate = med(fa, "per_s")
    rows.append((f"1. durable steps, {jobs} jobs x {iterations}", "flowactors",
                 figure(fa, "per_s", " steps/s", ",.0f"), ""))
    for system in ("dbos", "eventsourcing"):
        peer = raw[f"steps/{system}"]
        ratios[f"steps/{system}"] = fa_rate / med(peer, "per_s")
        rows.append(("", NAMES[system], figure(peer, "per_s", " steps/s", ",.0f"),
                     f"{ratios[f'steps/{system}']:.1f}x"))
    rows.append(("", "raw: all rows in 1 transaction",
                 figure(limit, "one_txn_per_s", " rows/s", ",.0f"),
                 f"flowactors at {fa_rate / med(limit, 'one_txn_per_s'):.1%}"))
    rows.append(("", "raw: 1 commit per row, 1 thread",
                 figure(limit, "commit_each_per_s", " rows/s", ",.0f"),
                 f"flowactors at {fa_rate / med(limit, 'commit_each_per_s'):.0%}"))

    jobs, events = meta["recovery"]
    fa = raw["recover/flowactors-crashed"]
    fa_s = med(fa, "seconds")
    rows.append((f"2. recovery, {jobs:,} jobs x {events:,} events", "flowactors: open a crashed log",
                 figure(fa, "seconds", " s", ".2f"), ""))
    peer = raw["recover/eventsourcing"]
    ratios["recover/eventsourcing"] = med(peer, "seconds") / fa_s
    rows.append(("", "eventsourcing: repository.get", figure(peer, "seconds", " s", ".2f"),
                 f"{ratios['recover/eventsourcing']:.1f}x"))
    rows.append(("", "raw: SELECT + msgspec decode", figure(limit, "read_decode_s", " s", ".2f"),
                 f"flowactors at {med(limit, 'read_decode_s') / fa_s:.0%}"))
    jobs, events = meta["dbos_recovery"]
    fa = raw["recover/flowactors-running"]
    fa_s = med(fa, "seconds")
    rows.append((f"   recover and resume, {jobs} x {events}", "flowactors: open + resume",
                 figure(fa, "seconds", " s", ".2f"), ""))
    peer = raw["recover/dbos"]
    ratios["recover/dbos"] = med(peer, "seconds") / fa_s
    rows.append(("", "DBOS: launch, recover pending", figure(peer, "seconds", " s", ".2f"),
                 f"{ratios['recover/dbos']:.0f}x"))

    fa_p99 = med(raw["status/flowactors"], "p99_us")
    for i, system in enumerate(SYSTEMS):
        r = raw[f"status/{system}"]
        ratio = ""
        if system != "flowactors":
            ratios[f"status/{system}"] = med(r, "p99_us") / fa_p99
            ratio = f"{ratios[f'status/{system}']:,.0f}x"
        rows.append((f"3. status read, {meta['status_jobs']} jobs running" if i == 0 else "",
                     NAMES[system],
                     f"p50 {fmt_us(med(r, 'p50_us'))}, p99 {fmt_us(med(r, 'p99_us'))} "
                     f"({med(r, 'calls'):,.0f} reads; jobs meanwhile "
                     f"{med(r, 'iterations_per_s_meanwhile'):,.0f} it/s)", ratio))

    widths = [max(len(row[i]) for row in rows + [HEADER]) for i in range(4)]
    print()
    for row in [HEADER] + rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print()
    for failure in meta.get("failures", []):
        print(f"a run crashed and was run again: {failure}")
    targets = [
        ("steps >= 20x DBOS", ratios["steps/dbos"] >= 20, ratios["steps/dbos"]),
        ("steps >= 5x eventsourcing", ratios["steps/eventsourcing"] >= 5,
         ratios["steps/eventsourcing"]),
        ("recovery >= 10x eventsourcing", ratios["recover/eventsourcing"] >= 10,
         ratios["recover/eventsourcing"]),
        ("status p99 < DBOS", ratios["status/dbos"] > 1, ratios["status/dbos"]),
        ("status p99 < eventsourcing", ratios["status/eventsourcing"] > 1,
         ratios["status/eventsourcing"]),
    ]
    print("targets: " + "; ".join(f"{name}: {value:,.1f}x {'met' if ok else 'MISSED'}"
                                  for name, ok, value in targets))


if __name__ == "__main__":
    sys.exit(main())
