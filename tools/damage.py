"""Damaged logs, measured: open hundreds of broken copies of a real log and classify what happens.

    python tools/damage.py --copies 500 [--seed S] [--workers 2] [--cli subprocess|inprocess]

Two originals are made from a real run of `tools/crashtest.py`'s deterministic jobs: `crashed`
(its owner was SIGKILLed mid-run: most events are still in the `-wal` file) and `checkpointed`
(the completed log with its WAL folded into the main file). Each copy gets one kind of damage:

    flip-db       1-16 random bytes flipped in the main file
    zero-page     one page of the main file zeroed
    truncate-db   the main file cut at a random offset
    flip-wal      1-16 random bytes flipped in the -wal file
    truncate-wal  the -wal file cut at a random offset
    remove-wal    the -wal file deleted
    garbage-shm   a -shm file of random bytes next to the copy
    foreign       replaced by something else: random bytes, text, an empty file, a short
                  header, another application's SQLite database, a flowactors header without
                  its tables

and is then opened four ways, each with a timeout (a timeout is a hang):

    store         EventStore(copy, mode="readonly"), verify(), and reading every event
    cli-verify    flowactors verify --db copy
    cli-status    flowactors status --db copy
    runtime       Runtime(copy, handle_signals=False), opened and closed (last: it may write),
                  then the copy as it left it: verify() and every event read again

Allowed: the copy works and verify is clean, and its events are a prefix of the original's,
byte-identical (the damage hit unused space, or a WAL tail SQLite discards); or a `FlowError`
with a one-line message (the CLI: non-zero exit, one `error:` line on stderr). A runtime is
judged by the copy it leaves: verify clean, and the events it found on opening (those before
the head it opened at; it then appends recoveries and resumed jobs' iterations) a prefix of
the original's — or none, when there was no log to find (an empty file, or an empty database:
a killed owner's log whose `-wal`, holding even its tables, was lost; it starts a new log).
Forbidden: a hang, a traceback, verify passing events that differ from the original's, a
command or a runtime serving a log that verify rejects without saying so, a runtime serving
other events than the read-only store read from the same copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import crashtest  # noqa: E402  (tools/ is not a package)

KINDS = ("flip-db", "zero-page", "truncate-db", "flip-wal", "truncate-wal", "remove-wal",
         "garbage-shm", "foreign")
TOOLS = ("store", "cli-verify", "cli-status", "runtime")
TIMEOUT = 20.0
PAGE = 4096

# Outcomes. Allowed ones first; a FORBIDDEN one fails the run.
INTACT = "works: events intact"
PREFIX = "works: a verified prefix"
REJECTED = "rejected: one-line FlowError"
VERIFY_REJECTS = "opens, verify reports the damage"
NEW_LOG = "runtime: a new log where there was none"
WARNED = "runtime: opens, logs a warning"
HANG = "FORBIDDEN: hang"
RAW = "FORBIDDEN: raw exception or traceback"
MULTILINE = "FORBIDDEN: error not one line"
SILENT = "FORBIDDEN: served data verify rejects, silently"
ACCEPTED = "FORBIDDEN: verify passed altered events"
DIVERGED = "FORBIDDEN: runtime served other events than the store read"
OUTCOMES = (INTACT, PREFIX, REJECTED, VERIFY_REJECTS, NEW_LOG, WARNED, HANG, RAW, MULTILINE,
            SILENT, ACCEPTED, DIVERGED)


# --- fingerprints of events, so a probe can report what it read in a few bytes ------------------


def fingerprint(recorded: object) -> str:
    """A short digest of a recorded event: its envelope, its event re-encoded, its hash."""
    import msgspec

    r = recorded
    blob = msgspec.msgpack.encode([r.position, r.stream, r.version, r.type,  # type: ignore
                                   r.schema_version, r.recorded_at.isoformat(),  # type: ignore
                                   msgspec.msgpack.encode(r.event), r.hash])  # type: ignore
    return hashlib.sha256(blob).hexdigest()[:16]


# --- the probe: runs in its own process, one JSON line per step ----------------------------------


def probe_main(path: str, steps: list[str]) -> int:
    import faulthandler

    faulthandler.enable()  # a crash leaves its stacks on stderr, for the details file

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    def emit(**fields: object) -> None:
        print(json.dumps(fields), flush=True)

    for step in steps:
        emit(step=step, started=True)
        try:
            fields = _PROBES[step](path)
        except BaseException as exc:  # the probe must report, never die silently
            fields = {"raw": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        emit(step=step, **fields)
    return 0


def _probe_store(path: str) -> dict[str, object]:
    from flowactors.errors import FlowError
    from flowactors.store import EventStore

    try:
        store = EventStore(path, mode="readonly")
    except FlowError as exc:
        return {"open": "error", "error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        return {"open": "raw", "raw": f"{type(exc).__name__}: {exc}",
                "tb": traceback.format_exc()}
    out: dict[str, object] = {"open": "ok"}
    with store:
        try:
            report = store.verify()
            out.update(verify_ok=report.ok, problem=report.problem)
        except Exception as exc:
            out.update(verify_ok=False, raw=f"verify: {type(exc).__name__}: {exc}",
                       tb=traceback.format_exc())
        try:
            out["events"] = [fingerprint(r) for r in store.read_all()]
        except FlowError as exc:
            out.update(read_error=type(exc).__name__, read_message=str(exc))
        except Exception as exc:
            out.update(raw=f"read_all: {type(exc).__name__}: {exc}", tb=traceback.format_exc())
    return out


def _probe_runtime(path: str) -> dict[str, object]:
    """Open and close a Runtime, then read the copy as it left it (`after`, the store probe):
    the runtime may have written (recovered the WAL, created a log, appended recoveries)."""
    import flowactors as fa

    with _every_log() as logs:
        try:
            rt = fa.Runtime(path, handle_signals=False)
        except fa.FlowError as exc:
            return {"open": "error", "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:
            return {"open": "raw", "raw": f"{type(exc).__name__}: {exc}",
                    "tb": traceback.format_exc()}
        jobs = len(rt.jobs())
        rt.close()
    warned = [f"{e.get('log_level')}: {e.get('event')} {e.get('error', '')}" for e in logs
              if e.get("log_level") in ("warning", "error", "critical")]
    return {"open": "ok", "jobs": jobs, "warned": warned, "head": _opened_head(logs),
            "after": _probe_store(path)}


@contextlib.contextmanager
def _every_log() -> Iterator[list[dict[str, object]]]:
    """Capture every log entry, down to debug: the probe's filter (critical only) would drop
    warnings and the owner's `store_opened` before any capture saw them."""
    import structlog
    import structlog.testing

    previous = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=previous)


def _opened_head(logs: list[dict[str, object]]) -> int:
    """The head position the owner found on opening, before the runtime appended anything:
    what it served is the copy's events up to there."""
    for entry in logs:
        if entry.get("event") == "store_opened" and entry.get("mode") == "owner":
            head = entry.get("head_position")
            if isinstance(head, int):
                return head
    raise RuntimeError("the owner's store_opened log entry with its head_position is missing: "
                       "cannot tell the events the runtime found from those it appended")


def _probe_cli(args: list[str]) -> Callable[[str], dict[str, object]]:
    def run(path: str) -> dict[str, object]:
        from click.testing import CliRunner

        from flowactors.cli import main

        result = CliRunner().invoke(main, [*args, "--db", path])
        out: dict[str, object] = {"exit": result.exit_code, "stderr": result.stderr}
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            out["raw"] = f"{type(result.exception).__name__}: {result.exception}"
            out["tb"] = "".join(traceback.format_exception(result.exception))
        return out
    return run


_PROBES: dict[str, Callable[[str], dict[str, object]]] = {
    "store": _probe_store,
    "runtime": _probe_runtime,
    "cli-verify": _probe_cli(["verify"]),
    "cli-status": _probe_cli(["status"]),
}


def run_probe(path: Path, steps: list[str], timeout: float = TIMEOUT
              ) -> dict[str, dict[str, object]]:
    """Run probe steps in a child process; a step that did not finish in time is a hang."""
    child = subprocess.Popen([sys.executable, str(HERE), "--probe", str(path), *steps],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout * len(steps))
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        hung = True
    results: dict[str, dict[str, object]] = {}
    for line in stdout.decode(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not item.pop("started", False):
            results[item.pop("step")] = item
    for step in steps:
        if step not in results:
            results[step] = {"hang": True} if hung else {
                "raw": f"the probe died (exit {child.returncode})",
                "tb": stderr.decode(errors="replace")[-2000:]}
    return results


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "flowactors"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flowactors.cli import main; sys.exit(main())"]


def run_cli(args: list[str], path: Path, timeout: float = TIMEOUT) -> dict[str, object]:
    """Run the real `flowactors` command; a timeout is a hang."""
    child = subprocess.Popen([*cli_command(), *args, "--db", str(path)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"hang": True}
    return {"exit": child.returncode, "stderr": stderr.decode(errors="replace")}


# --- originals and damage ------------------------------------------------------------------------


@dataclass
class Original:
    name: str
    files: dict[str, bytes]  # suffix ("", "-wal") -> content
    events: list[str]  # fingerprints, in position order


def make_originals(workdir: Path) -> list[Original]:
    """A crashed log (most of it in the WAL) and a completed, checkpointed one."""
    from flowactors.store import EventStore

    config = crashtest.JobsConfig(n_jobs=3, rollout_seconds=0.005, iterations=(7, 9, 5),
                                  intervals=(2, 3, 2), toolchoice=True)
    src = workdir / "source"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    log, acks, faults = src / "flow.db", src / "acks", src / "faults"
    faults.write_text("")
    child = crashtest.spawn_child(log, acks, config, "store.commit_with_blobs@6", faults,
                                  src / "stderr")
    try:
        crashtest._wait_point(child, faults, "store.commit_with_blobs")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    crashed = {"": log.read_bytes(), "-wal": (src / "flow.db-wal").read_bytes()}
    child = crashtest.spawn_child(log, acks, config, stderr_path=src / "stderr")
    if child.wait(timeout=crashtest.CHILD_TIMEOUT) != 0:
        raise RuntimeError(f"the source run failed: {crashtest._tail(src / 'stderr')}")
    # A request from another process, answered: damage may hit the inbox tables too.
    from flowactors import remote
    from flowactors import replay as rp

    remote.control(log, "job-0", "pause", timeout=5)
    conn = sqlite3.connect(log)  # fold the WAL into the main file; the last close deletes it
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    if (src / "flow.db-wal").exists() and (src / "flow.db-wal").stat().st_size:
        raise RuntimeError("the checkpointed source still has a WAL")
    checkpointed = {"": log.read_bytes()}
    originals = []
    for name, files in (("crashed", crashed), ("checkpointed", checkpointed)):
        odir = workdir / f"original-{name}"
        write_copy(odir, files)
        with EventStore(odir / "flow.db", mode="readonly") as store:
            report = store.verify()
            if not report.ok:
                raise RuntimeError(f"the {name} original does not verify: {report.problem}")
            events = [fingerprint(r) for r in store.read_all()]
        originals.append(Original(name, files, events))
    return originals


def write_copy(directory: Path, files: dict[str, bytes]) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for suffix, content in files.items():
        (directory / f"flow.db{suffix}").write_bytes(content)
    return directory / "flow.db"


def _flip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    offsets = sorted(rng.randrange(len(buf)) for _ in range(rng.randint(1, 16)))
    for offset in offsets:
        buf[offset] ^= rng.randint(1, 255)
    return bytes(buf), f"offsets {offsets}"


def _foreign(rng: random.Random, workdir: Path) -> tuple[bytes, str]:
    choice = rng.choice(["random", "text", "empty", "short-header", "other-sqlite",
                         "no-tables"])
    if choice == "random":
        return rng.randbytes(rng.randint(1, 50_000)), "random bytes"
    if choice == "text":
        return b"position,stream,version\n1,job,1\n" * rng.randint(1, 100), "a text file"
    if choice == "empty":
        return b"", "an empty file"
    if choice == "short-header":
        return b"SQLite format 3\x00" + rng.randbytes(rng.randint(0, 80)), "a short header"
    fd, tmp = tempfile.mkstemp(dir=workdir, suffix=".db")
    os.close(fd)
    os.unlink(tmp)
    conn = sqlite3.connect(tmp)
    if choice == "no-tables":
        conn.execute("PRAGMA application_id = 1181499747")  # flowactors' id
        conn.execute("PRAGMA user_version = 1")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('application', 'flowactors'), "
                     "('format_version', '1')")
    else:
        conn.execute("CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT)")
        conn.execute("INSERT INTO events VALUES (1, 'job')")
    conn.commit()
    conn.close()
    content = Path(tmp).read_bytes()
    os.unlink(tmp)
    return content, "another SQLite database" if choice == "other-sqlite" else \
        "a flowactors header without its tables"


def damage(original: Original, kind: str, rng: random.Random, workdir: Path
           ) -> tuple[dict[str, bytes], str]:
    """The damaged files (suffix -> content) and a description of the damage."""
    files = dict(original.files)
    db, wal = files[""], files.get("-wal")
    if kind in ("flip-wal", "truncate-wal", "remove-wal") and not wal:
        kind = {"flip-wal": "flip-db", "truncate-wal": "truncate-db",
                "remove-wal": "zero-page"}[kind]
    if kind == "flip-db":
        files[""], what = _flip(db, rng)
    elif kind == "zero-page":
        page = rng.randrange(len(db) // PAGE)
        files[""] = db[:page * PAGE] + bytes(PAGE) + db[(page + 1) * PAGE:]
        what = f"page {page + 1} of {len(db) // PAGE}"
    elif kind == "truncate-db":
        cut = rng.randrange(len(db))
        files[""] = db[:cut]
        what = f"at {cut} of {len(db)}"
    elif kind == "flip-wal":
        assert wal is not None
        files["-wal"], what = _flip(wal, rng)
    elif kind == "truncate-wal":
        assert wal is not None
        cut = rng.randrange(len(wal))
        files["-wal"] = wal[:cut]
        what = f"at {cut} of {len(wal)}"
    elif kind == "remove-wal":
        del files["-wal"]
        what = "deleted"
    elif kind == "garbage-shm":
        files["-shm"] = rng.randbytes(rng.choice([100, 32768, 65536]))
        what = f"{len(files['-shm'])} random bytes"
    elif kind == "foreign":
        files = {}
        files[""], what = _foreign(rng, workdir)
    else:
        raise ValueError(kind)
    return files, f"{kind} ({original.name}): {what}"


# --- classification ------------------------------------------------------------------------------


def _one_line(message: object) -> bool:
    """One line as a reader sees it: no line break of any kind (str.splitlines' set)."""
    return isinstance(message, str) and len(message.strip().splitlines()) == 1


def classify_store(result: dict[str, object], original: list[str]) -> str:
    """The store's outcome; `INTACT` or `PREFIX` when the copy verifies and its events are a
    byte-identical prefix of the original's."""
    if result.get("hang"):
        return HANG
    if "raw" in result:
        return RAW
    if result.get("open") == "error":
        return REJECTED if _one_line(result.get("message")) else MULTILINE
    if not result.get("verify_ok"):
        return VERIFY_REJECTS
    events = result.get("events")
    if events is None:  # verify passed, yet reading failed: verify missed the damage
        return ACCEPTED
    assert isinstance(events, list)
    if not is_prefix(events, original):
        return ACCEPTED
    return INTACT if len(events) == len(original) else PREFIX


def is_prefix(events: list[str], original: list[str]) -> bool:
    """`events` (fingerprints, in position order) are the original's first events,
    byte-identical. Positions and hashes are in the fingerprints, so a prefix of the log is a
    prefix of each of its streams, with the same hashes."""
    return len(events) <= len(original) and events == original[:len(events)]


def classify_cli(result: dict[str, object], store: str) -> str:
    """A CLI command's outcome, given the store's (`INTACT`/`PREFIX`: a verified log)."""
    if result.get("hang"):
        return HANG
    stderr = str(result.get("stderr", ""))
    if "raw" in result or "Traceback" in stderr:
        return RAW
    if result.get("exit") == 0:
        return store if store in (INTACT, PREFIX) else SILENT
    lines = [line for line in stderr.splitlines() if line.strip()]
    if len(lines) == 1 and lines[0].startswith("error: "):
        return REJECTED
    return MULTILINE


def classify_runtime(result: dict[str, object], store_result: dict[str, object],
                     original: list[str]) -> str:
    """A Runtime's outcome, judged by the copy it left (`result["after"]`), not by the store's
    read-only look before: an owner's read-write open may legitimately see another file (it
    creates a log where there was none). `store_result`: the store probe of the copy before."""
    if result.get("hang"):
        return HANG
    if "raw" in result:
        return RAW
    if result.get("open") == "error":
        return REJECTED if _one_line(result.get("message")) else MULTILINE
    after = result.get("after")
    assert isinstance(after, dict)
    if "raw" in after:
        return RAW
    events, head = after.get("events"), result.get("head")
    if after.get("open") != "ok" or not after.get("verify_ok") or events is None:
        said = " ".join(map(str, result.get("warned") or [])).lower()  # type: ignore[arg-type]
        return WARNED if any(w in said for w in ("corrupt", "verif", "hash")) else SILENT
    assert isinstance(events, list) and isinstance(head, int)
    served = events[:head]  # the rest, the runtime appended itself
    if not is_prefix(served, original):
        return ACCEPTED
    store = classify_store(store_result, original)
    if store in (INTACT, PREFIX) and served != store_result.get("events"):
        return DIVERGED
    if not served and store == REJECTED:
        return NEW_LOG  # an owner makes a new log in an empty file or database
    return INTACT if len(served) == len(original) else PREFIX


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Figures:
    copies: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter()
                                                                       for t in TOOLS})
    forbidden: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.forbidden

    def count(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.outcomes.values())

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {self.kinds[k]}" for k in KINDS)
        width = max(len(o) for o in OUTCOMES)
        head = f"{'outcome':<{width}}  " + "  ".join(f"{t:>10}" for t in TOOLS)
        rows = [f"{o:<{width}}  " + "  ".join(f"{self.outcomes[t][o]:>10}" for t in TOOLS)
                for o in OUTCOMES]
        return [
            f"damaged copies: {self.copies} ({kinds})",
            head, *rows,
            f"hangs: {self.count(HANG)}, raw tracebacks: {self.count(RAW)}, "
            f"silently accepted corruptions: "
            f"{self.count(SILENT) + self.count(ACCEPTED) + self.count(DIVERGED)}, "
            f"errors not one line: {self.count(MULTILINE)}",
            f"time: {self.seconds:.0f} s",
        ]


def check_copy(original: Original, files: dict[str, bytes], what: str, cdir: Path,
               cli: str) -> dict[str, str]:
    """Open one damaged copy every way; return each tool's outcome (and record details)."""
    path = write_copy(cdir, files)
    if cli == "subprocess":
        store = run_probe(path, ["store"])["store"]
        results = {"store": store,
                   "cli-verify": run_cli(["verify"], path),
                   "cli-status": run_cli(["status"], path)}
    else:
        results = run_probe(path, ["store", "cli-verify", "cli-status"])
    results["runtime"] = run_probe(path, ["runtime"])["runtime"]
    store = classify_store(results["store"], original.events)
    outcomes = {
        "store": store,
        "cli-verify": classify_cli(results["cli-verify"], store),
        "cli-status": classify_cli(results["cli-status"], store),
        "runtime": classify_runtime(results["runtime"], results["store"], original.events),
    }
    if any(o.startswith("FORBIDDEN") for o in outcomes.values()):
        (cdir / "details.json").write_text(json.dumps(
            {"damage": what, "outcomes": outcomes, "results": results}, indent=1, default=str))
    else:
        shutil.rmtree(cdir, ignore_errors=True)
    return outcomes


def run(copies: int, *, seed: int = 0, workers: int = 2, cli: str = "subprocess",
        workdir: Path | None = None, kinds: tuple[str, ...] = KINDS,
        say: Callable[[str], None] = print) -> Figures:
    started = time.monotonic()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="damage-")) if own else Path(workdir)
    try:
        originals = make_originals(root)
        say("originals: " + ", ".join(f"{o.name} ({len(o.events)} events, files "
                                      f"{sorted(o.files)})" for o in originals))
        figures = Figures()
        lock = threading.Lock()

        def one(i: int) -> None:
            rng = random.Random(seed * 1_000_003 + i)
            original = originals[i % len(originals)]
            fitting = [k for k in kinds if "-wal" in original.files or "wal" not in k]
            kind = fitting[(i // len(originals)) % len(fitting)]
            files, what = damage(original, kind, rng, root)
            cdir = root / f"copy-{i:04d}"
            outcomes = check_copy(original, files, what, cdir, cli)
            with lock:
                figures.copies += 1
                figures.kinds[what.split(" ")[0]] += 1
                for tool, outcome in outcomes.items():
                    figures.outcomes[tool][outcome] += 1
                    if outcome.startswith("FORBIDDEN"):
                        figures.forbidden.append(f"copy {i}, {what}: {tool}: {outcome} "
                                                 f"(details in {cdir / 'details.json'})")
                if figures.copies % 50 == 0:
                    say(f"  {figures.copies} copies checked")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(one, i) for i in range(copies)]:
                future.result()
        figures.seconds = time.monotonic() - started
        return figures
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        return probe_main(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cli", choices=["subprocess", "inprocess"], default="subprocess",
                        help="run `flowactors` as its own process (default), or through "
                             "click's CliRunner inside the probe process (faster)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the originals and every copy with a forbidden outcome here")
    parser.add_argument("--max-shown", type=int, default=20)
    args = parser.parse_args(argv)
    crashtest.quiet_logs()
    figures = run(args.copies, seed=args.seed, workers=args.workers, cli=args.cli,
                  workdir=args.workdir, say=lambda line: print(line, flush=True))
    print("\n".join(figures.lines()))
    for line in figures.forbidden[:args.max_shown]:
        print(f"FAILED: {line}")
    if len(figures.forbidden) > args.max_shown:
        print(f"... and {len(figures.forbidden) - args.max_shown} more")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
