"""Record the histories in tests/histories/ from real runs of the Runtime.

    python tools/record_histories.py [OUT_DIR] [--only NAME ...]   (default: tests/histories)

Each scenario runs the `simulated` task with a fixed seed on its own fresh log, then exports
the job's events (`flowactors.testing.record_history`, the same lines as `flowactors export`)
to `<name>.jsonl`, and writes `<name>.expected.json` beside it: the final `JobView` (without
its timestamps) and state digest that replaying the file must give. For the runs in this
process the expectation is checked against the runtime's own live view first.

`crashed_resumed` runs `tools/crash_child.py` in a subprocess, SIGKILLs it at a fault point
(iteration 3 is recorded, iteration 4 and its checkpoint are not; the last checkpoint is
iteration 2), and runs it again to completion: the log keeps the superseded iteration 3, then
the recovery, then iterations 3 to 5 again. `completed_v1` is `completed` with its iteration
events rewritten to schema 1 of `job.iteration_completed` (std_reward and success_rate inside
`metrics`), the shape an older flowactors wrote: it must still replay, by upcasting, to the same
state. `broken/` holds histories derived from `failed` that must fail (see `write_broken`).

The paused and cancelled scenarios act while an iteration is in flight (its rollouts take
0.3 s each), so they land on the same iteration on any reasonable machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

import flowactors as fa
from flowactors import job as core
from flowactors.testing import check_history, load_history, record_history

ROOT = Path(__file__).resolve().parents[1]
CRASH_CHILD = ROOT / "tools" / "crash_child.py"
QUERIES = [fa.TrainingQuery(query=f"history query {i}", expected_outcome={"answer": str(i)})
           for i in range(6)]
SLOW = 0.3  # seconds per rollout where the scenario acts mid-iteration
V1_NOTE = ("completed_v1.jsonl is completed.jsonl with each job.iteration_completed line "
           "rewritten to schema version 1 (std_reward and success_rate inside metrics)")


def spec(agent: str, *, seed: int, task_options: dict[str, Any] | None = None,
         **config: Any) -> fa.JobSpec:
    settings: dict[str, Any] = dict(n_iterations=6, batch_size=2, n_trajectories_per_query=2,
                                    checkpoint_interval=2, seed=seed)
    settings.update(config)
    return fa.JobSpec(agent_id=agent, training_data=QUERIES, task="simulated",
                      config=fa.GRPOConfig(**settings), task_options=task_options or {})


def runtime(db: Path) -> fa.Runtime:
    return fa.Runtime(db, synchronous="off", handle_signals=False)


def act_during_iteration(rt: fa.Runtime, job_id: str, after: int,
                         action: Callable[[], object]) -> None:
    """Call `action` while iteration `after + 1` is in flight."""
    for recorded in rt.watch(job_id):
        if recorded.type == "job.iteration_completed" and recorded.event.iteration == after:
            time.sleep(SLOW / 3)  # the next iteration's rollouts have started
            action()
            return
    raise RuntimeError(f"{job_id} ended before iteration {after}")


# --- scenarios: each runs one job on a fresh log; returns (job id, live view or None) ---


def completed(db: Path) -> tuple[str, fa.JobView | None]:
    """Six iterations, checkpoints every two, only the best one kept (pruning)."""
    with runtime(db) as rt:
        rt.submit(spec("agent-completed", seed=11, keep_checkpoints=1), job_id="completed")
        return "completed", rt.wait("completed", timeout=60)


def cancelled(db: Path) -> tuple[str, fa.JobView | None]:
    """Cancelled while iteration 3 runs: nothing of it is recorded."""
    with runtime(db) as rt:
        rt.submit(spec("agent-cancelled", seed=12, n_iterations=8,
                       task_options={"rollout_seconds": SLOW}), job_id="cancelled")
        act_during_iteration(rt, "cancelled", 2, lambda: rt.cancel("cancelled"))
        return "cancelled", rt.wait("cancelled", timeout=60)


def failed(db: Path) -> tuple[str, fa.JobView | None]:
    """The task's update raises at iteration 3: the job fails with the error."""
    with runtime(db) as rt:
        rt.submit(spec("agent-failed", seed=13, task_options={"fail_at_iteration": 3}),
                  job_id="failed")
        return "failed", rt.wait("failed", timeout=60)


def paused_resumed(db: Path) -> tuple[str, fa.JobView | None]:
    """Paused while iteration 3 runs (so at its end, with its trainer state), resumed."""
    with runtime(db) as rt:
        rt.submit(spec("agent-paused", seed=14, n_iterations=5,
                       task_options={"rollout_seconds": SLOW}), job_id="paused_resumed")
        act_during_iteration(rt, "paused_resumed", 2, lambda: rt.pause("paused_resumed"))
        rt.resume("paused_resumed")
        return "paused_resumed", rt.wait("paused_resumed", timeout=60)


def budget_stopped(db: Path) -> tuple[str, fa.JobView | None]:
    """$1 per iteration against a $3.50 budget: 75% and 90% thresholds, then stopped."""
    with runtime(db) as rt:
        rt.submit(spec("agent-budget", seed=15, n_iterations=10, max_budget_usd=3.5,
                       task_options={"cost_per_trajectory_usd": 0.25}),
                  job_id="budget_stopped")
        return "budget_stopped", rt.wait("budget_stopped", timeout=60)


def crashed_resumed(db: Path) -> tuple[str, fa.JobView | None]:
    """A runtime process SIGKILLed before checkpoint 4 is appended, then run again."""
    fault_file = db.with_suffix(".faults")
    fault_file.touch()
    args = [sys.executable, str(CRASH_CHILD), str(db), "1", "5", "2"]
    env = {**os.environ, "FLOWACTORS_FAULTS": "actor.checkpoint@2",
           "FLOWACTORS_FAULT_FILE": str(fault_file)}
    child = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not fault_file.read_text() and child.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError("the crash child never reached its fault point")
        time.sleep(0.01)
    if child.poll() is not None:
        raise RuntimeError(f"the crash child exited early ({child.returncode})")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    env.pop("FLOWACTORS_FAULTS")
    subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)
    return "job-0", None


def forked_parent(db: Path) -> tuple[str, fa.JobView | None]:
    """A completed job that a fork was made from at checkpoint 2 (its stream lists the fork)."""
    with runtime(db) as rt:
        rt.submit(spec("agent-parent", seed=16), job_id="forked_parent")
        rt.wait("forked_parent", timeout=60)
        config = msgspec.structs.replace(spec("agent-parent", seed=16).config,
                                         learning_rate=0.05)
        rt.fork("forked_parent", at_iteration=2, job_id="forked_child", config=config)
        rt.wait("forked_child", timeout=60)
        return "forked_parent", rt.status("forked_parent")


def forked_child(db: Path) -> tuple[str, fa.JobView | None]:
    """The fork of `forked_parent` at checkpoint 2 with learning_rate 0.05: it names its
    parent and checkpoint and trains iterations 3 to 6 from the parent's trainer state."""
    forked_parent(db)
    with runtime(db) as rt:
        return "forked_child", rt.status("forked_child")


def crashed_with_trajectories(db: Path) -> tuple[str, fa.JobView | None]:
    """`crashed_resumed` recorded with trajectories (on by default since they exist): the
    superseded iteration 3 keeps its trajectories, in its event."""
    return crashed_resumed(db)


SCENARIOS: dict[str, Callable[[Path], tuple[str, fa.JobView | None]]] = {
    "completed": completed,
    "cancelled": cancelled,
    "failed": failed,
    "paused_resumed": paused_resumed,
    "budget_stopped": budget_stopped,
    "crashed_resumed": crashed_resumed,
    "forked_parent": forked_parent,
    "forked_child": forked_child,
    "crashed_with_trajectories": crashed_with_trajectories,
}
BEFORE_TRAJECTORIES = ("completed", "cancelled", "failed", "paused_resumed", "budget_stopped",
                       "crashed_resumed")
"""Recorded before trajectories and forks existed: they pin that such logs still replay, so
`--only` re-records the others without touching them."""


# --- expectations ------------------------------------------------------------------------------


def view_fields(view: fa.JobView) -> dict[str, Any]:
    """A view as plain data, without its timestamps (they differ on every run)."""
    data = msgspec.to_builtins(view)
    for key in ("created_at", "started_at", "finished_at"):
        data.pop(key)
    return data


def expectation(history: Path) -> dict[str, Any]:
    """What replaying `history` gives, checked: every recorded digest must match."""
    events = load_history(history)
    report = check_history(events)
    if not report.ok:
        raise RuntimeError(f"{history}: {report.mismatch}")
    (state,) = report.states.values()
    return {"events": report.events, "digests_checked": report.digests_checked,
            "state_digest": core.state_digest(state), "view": view_fields(core.view(state))}


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def to_v1(line: dict[str, Any]) -> dict[str, Any]:
    """An exported `job.iteration_completed` line (schema 2) in its schema 1 shape."""
    if line["type"] != "job.iteration_completed" or line["schema_version"] != 2:
        return line
    data = dict(line["data"])
    metrics = dict(data.get("metrics", {}))
    metrics["std_reward"] = data.pop("std_reward")
    metrics["success_rate"] = data.pop("success_rate", 0.0)
    data["metrics"] = metrics
    return {**line, "schema_version": 1, "data": data}


def main(argv: list[str]) -> int:
    only = argv[argv.index("--only") + 1:] if "--only" in argv else None
    argv = argv[:argv.index("--only")] if "--only" in argv else argv
    out = Path(argv[0]) if argv else ROOT / "tests" / "histories"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, scenario in SCENARIOS.items():
            if only is not None and name not in only:
                continue
            db = Path(tmp) / f"{name}.db"
            job_id, live = scenario(db)
            history = out / f"{name}.jsonl"
            count = record_history(db, history, job_id)
            expected = expectation(history)
            if live is not None and view_fields(live) != expected["view"]:
                raise RuntimeError(f"{name}: replay differs from the runtime's live view:\n"
                                   f"{view_fields(live)}\n{expected['view']}")
            write_json(out / f"{name}.expected.json", expected)
            print(f"{name}: {count} events, {expected['view']['status']}")
    if only is not None:
        return 0
    lines = [json.loads(line) for line in (out / "completed.jsonl").read_text().splitlines()]
    v1 = out / "completed_v1.jsonl"
    v1.write_text("".join(json.dumps(to_v1(line), separators=(",", ":")) + "\n"
                          for line in lines))
    write_json(out / "completed_v1.expected.json", expectation(v1))
    print(f"completed_v1: {V1_NOTE}")
    write_broken(out / "broken", (out / "failed.jsonl").read_text().splitlines())
    return 0


def write_broken(directory: Path, lines: list[str]) -> None:
    """Histories that must fail, each derived from a good one (see tests/test_histories.py)."""
    directory.mkdir(exist_ok=True)

    def edited(index: int, change: Callable[[dict[str, Any]], None]) -> list[str]:
        copy = list(lines)
        line = json.loads(copy[index])
        change(line)
        copy[index] = json.dumps(line, separators=(",", ":"))
        return copy

    def unknown_type(line: dict[str, Any]) -> None:
        line["type"] = "job.teleported"

    def bad_field(line: dict[str, Any]) -> None:
        line["data"]["iteration"] = "three"

    def drifted(line: dict[str, Any]) -> None:
        line["data"]["state_digest"] = "0" * 64

    cases = {
        "unknown_type": edited(3, unknown_type),     # line 4
        "bad_field": edited(2, bad_field),           # line 3
        "malformed_line": [*lines[:4], lines[4][: len(lines[4]) // 2], *lines[5:]],  # line 5
        "digest_mismatch": edited(5, drifted),       # line 6: loads, fails the replay check
    }
    for name, content in cases.items():
        (directory / f"{name}.jsonl").write_text("\n".join(content) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
