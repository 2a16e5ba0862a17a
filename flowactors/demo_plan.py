"""What a `flowactors demo` run trains, and which log it uses.

The demo's jobs are `toolchoice` jobs with fixed ids and deterministic specs (seeds 0, 1, 2, …
alternating two learning rates), so a second submission is idempotent and two runs train
bit-identical policies. Which file a run uses is decided from the logs themselves, never by
asking: the demo's runs go to `flow.db`, then `flow-2.db`, `flow-3.db`, …; the latest one is
resumed if it holds an unfinished demo, otherwise a fresh run starts in the next free name and
no log is ever removed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import msgspec

from .events import JobSubmitted
from .job import JobState, evolve, initial_state
from .spec import GRPOConfig, JobSpec
from .store import EventStore
from .tasks import build_task
from .tasks.toolchoice import make_training_data
from .training import split_data

__all__ = ["BASELINE_MAX", "DEFAULT_ITERATIONS", "DEFAULT_JOBS", "JOB_PREFIX", "LEARNED_MIN",
           "POLICIES", "TORCH_TASK", "LogKind", "RunPlan", "baseline_score", "demo_specs",
           "learned", "log_chain", "numbered", "plan_run", "resume_iteration"]

DEFAULT_JOBS = 4
DEFAULT_ITERATIONS = 60
LEARNING_RATES = (0.05, 0.01)
TORCH_TASK = "toolchoice-torch"
POLICIES = {"torch": TORCH_TASK, "linear": "toolchoice"}
"""What `flowactors demo --policy` trains: the same environment, learned by either."""
TORCH_LEARNING_RATES = (0.005, 0.003)  # Adam on a network: slower, so learning is visible
N_QUERIES = 200  # 160-169 distinct; 20% held out: 32-33 queries the policy never trains on
BATCH_SIZE = 32
TRAJECTORIES_PER_QUERY = 8
CHECKPOINT_INTERVAL = 5
MAX_STEPS = 4
BASELINE_MAX = 0.4
"""An untrained policy's held-out success is at most this…"""
LEARNED_MIN = 0.9
"""…and a trained one's at least this, within the demo's iterations: the demo's claim."""
JOB_PREFIX = "demo-"


# --- what the demo trains -----------------------------------------------------------------------


def demo_specs(n_jobs: int = DEFAULT_JOBS, n_iterations: int = DEFAULT_ITERATIONS,
               task: str = "toolchoice") -> dict[str, JobSpec]:
    """The demo's jobs by id: seed i, learning rates alternating, everything else equal.

    Fixed ids and deterministic specs make a second submission idempotent, and two runs of
    the demo train bit-identical policies. The agent id records the run's size, so a run
    killed between two submissions can be completed when it resumes.
    """
    return {
        f"{JOB_PREFIX}{seed}": JobSpec(
            agent_id=f"toolchoice-agent-{seed}-of-{n_jobs}",
            training_data=make_training_data(N_QUERIES, seed, distinct=True),
            config=GRPOConfig(
                n_iterations=n_iterations, batch_size=BATCH_SIZE,
                n_trajectories_per_query=TRAJECTORIES_PER_QUERY,
                learning_rate=(TORCH_LEARNING_RATES if task == TORCH_TASK
                               else LEARNING_RATES)[seed % len(LEARNING_RATES)],
                checkpoint_interval=CHECKPOINT_INTERVAL, max_steps_per_trajectory=MAX_STEPS,
                seed=seed),
            task=task)
        for seed in range(n_jobs)
    }


def baseline_score(spec: JobSpec) -> float:
    """Held-out success of the untrained policy: cheap and deterministic, so computed here."""
    task = build_task(spec)
    _, held_out = split_data(spec)
    return task.evaluate(task.init(spec), held_out)


def learned(baseline: float, final: float | None) -> bool:
    """The demo's claim for one job: from ≤ BASELINE_MAX to ≥ LEARNED_MIN."""
    return final is not None and baseline <= BASELINE_MAX and final >= LEARNED_MIN


# --- which log a run uses -------------------------------------------------------------------------


LogKind = Literal["missing", "empty", "other", "unfinished", "finished"]


class RunPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What this invocation does: run `specs` in `path`, fresh or resuming."""

    path: Path
    base: Path  # the --db the user named: later runs go to its numbered siblings
    resume: bool
    specs: dict[str, JobSpec]
    states: dict[str, JobState]  # the demo jobs as the log left them (resume only)
    reason: str  # one sentence for the screen: why this file, and what happens


def numbered(path: Path, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def log_chain(path: Path) -> list[Path]:
    """`path`, `path-2`, `path-3`, … as long as they exist (at least `path`)."""
    chain = [path]
    while numbered(path, len(chain) + 1).exists():
        chain.append(numbered(path, len(chain) + 1))
    return chain


def _read_demo_jobs(path: Path) -> tuple[LogKind, dict[str, JobState]]:
    """Fold the log's demo jobs, read-only. Raises LogCorrupted for a foreign file."""
    if not path.exists():
        return "missing", {}
    states: dict[str, JobState] = {}
    other = False
    with EventStore(path, mode="readonly") as store:
        for recorded in store.read_all():
            stream = recorded.stream
            if stream not in states:
                if not (stream.startswith(JOB_PREFIX) and isinstance(recorded.event, JobSubmitted)
                        and recorded.event.spec.task in ("toolchoice", TORCH_TASK)):
                    other = True
                    continue
                states[stream] = initial_state(stream)
            states[stream] = evolve(states[stream], recorded)
    if not states:
        return ("other" if other else "empty"), {}
    if all(s.status.is_terminal for s in states.values()):
        return "finished", states
    return "unfinished", states


def plan_run(db: Path, *, fresh: bool = False, n_jobs: int = DEFAULT_JOBS,
             n_iterations: int = DEFAULT_ITERATIONS, task: str = "toolchoice") -> RunPlan:
    """Decide, from the logs alone, where this run goes and whether it resumes.

    The latest of `db`, `db-2`, `db-3`, … that exists is resumed when it holds an unfinished
    demo (its recorded specs win over `n_jobs`/`n_iterations`); a missing or empty one is used
    for a fresh run; otherwise the fresh run goes to the next free name. `fresh` always starts
    a new run (in a new file, unless `db` does not exist yet).

    Raises:
        LogCorrupted: the latest file is not a flowactors log.
    """
    chain = log_chain(db)
    latest, following = chain[-1], numbered(db, len(chain) + 1)
    specs = demo_specs(n_jobs, n_iterations, task)
    if fresh:
        if not db.exists():
            return RunPlan(path=db, base=db, resume=False, specs=specs, states={},
                           reason=f"starting a fresh run in {db}")
        return RunPlan(path=following, base=db, resume=False, specs=specs, states={},
                       reason=f"--fresh: starting a new run in {following} "
                              f"({_list(chain)} {'is' if len(chain) == 1 else 'are'} kept)")
    kind, states = _read_demo_jobs(latest)
    if kind in ("missing", "empty"):
        return RunPlan(path=latest, base=db, resume=False, specs=specs, states={},
                       reason=f"starting a fresh run in {latest}")
    if kind == "unfinished":
        recorded = {job_id: s.spec for job_id, s in states.items() if s.spec is not None}
        unfinished = {j: s for j, s in states.items() if not s.status.is_terminal}
        points = "; ".join(f"{j} from iteration {resume_iteration(s)}"
                           if resume_iteration(s) else f"{j} from the start (no checkpoint yet)"
                           for j, s in unfinished.items())
        # A run killed between its submissions: submit the rest, as that run would have.
        first = next(iter(recorded.values()))
        intended = re.search(r"-of-(\d+)$", first.agent_id)
        if intended:
            same_run = demo_specs(int(intended.group(1)), first.config.n_iterations,
                                  first.task)
            if all(same_run.get(j) == spec for j, spec in recorded.items()):
                recorded = {**same_run, **recorded}
        return RunPlan(path=latest, base=db, resume=True, specs=recorded, states=states,
                       reason=f"resuming {len(unfinished)} unfinished "
                              f"job{'s' if len(unfinished) != 1 else ''} in {latest} from "
                              f"the last checkpoints: {points}. Nothing before a checkpoint is "
                              f"run again (--fresh would start a new run instead)")
    why = ("holds a finished demo run" if kind == "finished" else "holds other jobs")
    return RunPlan(path=following, base=db, resume=False, specs=specs, states={},
                   reason=f"{latest} {why}: starting a fresh run in {following} "
                          f"({latest} is kept)")


def resume_iteration(state: JobState) -> int:
    """Where a job continues: its last checkpoint (or pause point); 0 = from the start."""
    return state.resume_point.iteration if state.resume_point is not None else 0


def _list(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)
