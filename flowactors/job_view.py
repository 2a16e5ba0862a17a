"""What users see of a job: its `JobView` and checkpoints, derived from its folded state. Pure."""

from __future__ import annotations

from .job_state import JobState
from .spec import validation_set
from .views import CheckpointInfo, Cost, JobView, Progress

__all__ = ["best_checkpoint", "checkpoint_infos", "view"]


def best_checkpoint(state: JobState) -> CheckpointInfo | None:
    live = [c.info for c in state.checkpoints if not c.info.pruned]
    if not live:
        return None
    return max(live, key=lambda c: (c.validation_score, c.iteration))


def checkpoint_infos(state: JobState) -> list[CheckpointInfo]:
    """Checkpoints best first (kept ones before pruned ones)."""
    infos = [c.info for c in state.checkpoints]
    return sorted(infos, key=lambda c: (c.pruned, -c.validation_score, -c.iteration))


def view(state: JobState) -> JobView:
    """The user-facing view of a job's state."""
    spec = state.spec
    if spec is None:
        raise ValueError(f"job {state.job_id!r} has no events")
    total = spec.config.n_iterations
    budget = spec.config.max_budget_usd
    best = best_checkpoint(state)
    return JobView(
        job_id=state.job_id,
        agent_id=spec.agent_id,
        status=state.status,
        progress=Progress(
            current_iteration=state.iteration,
            total_iterations=total,
            percent_complete=round(100.0 * state.iteration / total, 2),
        ),
        metrics=state.metrics,
        cost=Cost(
            tokens_consumed=state.tokens,
            cost_usd=state.cost_usd,
            budget_usd=budget,
            budget_remaining_usd=None if budget is None else max(0.0, budget - state.cost_usd),
        ),
        best_checkpoint=best.iteration if best else None,
        error=state.error,
        attempts=state.attempts,
        created_at=state.created_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        task=spec.task,
        priority=spec.priority,
        version=state.version,
        validation_score=state.validation_score,
        validation_set=validation_set(spec),
        forked_from=state.forked_from,
        forks=list(state.forks),
    )
