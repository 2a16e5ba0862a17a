"""The pure core: given events, when a command, then events (or an error)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given as given_
from hypothesis import settings
from hypothesis import strategies as st

from flowactors.errors import InvalidTransition, SpecError
from flowactors.events import (
    BudgetThresholdReached,
    CheckpointSaved,
    CheckpointsPruned,
    IterationCompleted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobPaused,
    JobRecovered,
    JobStarted,
    JobSubmitted,
    RecordedEvent,
    event_tag,
)
from flowactors.job import (
    Cancel,
    Fail,
    JobState,
    Pause,
    RecordCheckpoint,
    RecordIteration,
    Recover,
    Resume,
    SavedState,
    Start,
    Submit,
    decide,
    evolve,
    initial_state,
    recorded_digest,
    state_digest,
    view,
)
from flowactors.folding import fold_log
from flowactors.spec import GRPOConfig, JobSpec, TrainingQuery
from flowactors.testing import given, load_history, then
from flowactors.views import JobStatus

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


HISTORIES = Path(__file__).parent / "histories"


def make_spec(**config) -> JobSpec:
    defaults = dict(n_iterations=10, checkpoint_interval=3)
    return JobSpec(agent_id="agent", training_data=[TrainingQuery(query="q")],
                   config=GRPOConfig(**{**defaults, **config}))


def result(i: int, cost: float = 0.0) -> IterationCompleted:
    return IterationCompleted(iteration=i, avg_reward=0.1 * i, std_reward=0.01, loss=1.0 / i,
                              cost_usd=cost, tokens=10)


def saved(i: int, score: float = 0.5) -> SavedState:
    return SavedState(state_ref=f"{i:064x}", validation_score=score, policy_digest="p",
                      optimizer_digest="o", rng_digest="r")


def run_iterations(state, upto: int, scores=None, cost: float = 0.0):
    """Decide and fold iterations state.iteration+1 .. upto; returns (state, all events)."""
    spec = state.spec
    emitted = []
    for i in range(state.iteration + 1, upto + 1):
        due = i % spec.config.checkpoint_interval == 0 or i == spec.config.n_iterations
        score = (scores or {}).get(i, 0.5)
        events = decide(RecordIteration(result=result(i, cost), saved=saved(i, score) if due
                                        else None), state)
        emitted.extend(events)
        state = then(state, events)
    return state, emitted


def test_submit_then_start_runs_the_job():
    """A submitted job is queued; Start makes it running and stamps started_at from the log."""
    spec = make_spec()
    assert decide(Submit(spec=spec), initial_state("job")) == [JobSubmitted(spec=spec)]
    state = given(JobSubmitted(spec=spec))
    assert state.status is JobStatus.QUEUED
    assert decide(Start(), state) == [JobStarted()]
    assert given(JobSubmitted(spec=spec), JobStarted()).started_at == AT


def test_submit_is_idempotent_and_rejects_another_spec():
    """The same spec again decides nothing; a different spec under the same id is a SpecError."""
    state = given(JobSubmitted(spec=make_spec()))
    assert decide(Submit(spec=make_spec()), state) == []
    with pytest.raises(SpecError, match="different spec"):
        decide(Submit(spec=make_spec(seed=1)), state)


@pytest.mark.parametrize(
    "history, command",
    [
        ([JobStarted(), ], Resume()),
        ([], Resume()),
        ([JobPaused(iteration=0)], Start()),
        ([JobCancelled(iteration=0, state_digest="d")], Cancel()),
        ([JobCancelled(iteration=0, state_digest="d")], Resume()),
        ([JobStarted(), JobFailed(iteration=0, reason="task_error", error_type="E",
                                  message="m", state_digest="d")], Pause()),
        ([JobPaused(iteration=0)], Pause()),
        ([], RecordIteration(result=result(1))),
        ([JobPaused(iteration=0)], Fail(reason="task_error", error_type="E", message="m")),
    ],
)
def test_illegal_transitions_raise_and_decide_nothing(history, command):
    """Every command outside the lifecycle of DESIGN.md raises InvalidTransition."""
    state = given(JobSubmitted(spec=make_spec()), *history)
    with pytest.raises(InvalidTransition, match="job"):
        decide(command, state)


def test_commands_on_a_missing_job_raise():
    """A job with no events cannot be started, paused or cancelled."""
    with pytest.raises(InvalidTransition, match="does not exist"):
        decide(Cancel(), initial_state("nope"))


def test_legal_lifecycle_paths():
    """queued→paused→queued→running→paused→queued→cancelled are all allowed."""
    spec = make_spec()
    state = given(JobSubmitted(spec=spec))
    for command, status in [(Pause(), JobStatus.PAUSED), (Resume(), JobStatus.QUEUED),
                            (Start(), JobStatus.RUNNING),
                            (Pause(state_ref="ab" * 32), JobStatus.PAUSED),
                            (Resume(), JobStatus.QUEUED), (Cancel(), JobStatus.CANCELLED)]:
        state = then(state, decide(command, state))
        assert state.status is status
    assert state.finished_at == AT


def test_checkpoints_fall_on_multiples_of_the_interval_and_completion_references_final():
    """n=10, interval=3: checkpoints 3, 6, 9; the completion event references iteration 10."""
    state = given(JobSubmitted(spec=make_spec()), JobStarted())
    state, events = run_iterations(state, 10)
    assert [e.iteration for e in events if isinstance(e, CheckpointSaved)] == [3, 6, 9]
    completed = events[-1]
    assert isinstance(completed, JobCompleted) and completed.iteration == 10
    assert completed.final_state_ref == saved(10).state_ref
    assert state.status is JobStatus.COMPLETED
    assert view(state).progress.percent_complete == 100.0


def test_an_iteration_out_of_order_is_rejected():
    """Recording iteration 3 after 1 raises: the core never skips or repeats an iteration."""
    state, _ = run_iterations(given(JobSubmitted(spec=make_spec()), JobStarted()), 1)
    with pytest.raises(InvalidTransition, match="expected iteration 2"):
        decide(RecordIteration(result=result(3)), state)


def test_budget_thresholds_and_exhaustion():
    """Cost crossing 75% and 90% records thresholds once; reaching the budget fails the job."""
    spec = make_spec(max_budget_usd=1.0, n_iterations=100)
    state = given(JobSubmitted(spec=spec), JobStarted())
    state, events = run_iterations(state, 4, cost=0.25)
    thresholds = [e.fraction for e in events if isinstance(e, BudgetThresholdReached)]
    assert thresholds == [0.75, 0.9]
    failed = events[-1]
    assert isinstance(failed, JobFailed) and failed.reason == "budget_exhausted"
    assert state.status is JobStatus.FAILED and state.error.reason == "budget_exhausted"
    assert view(state).cost.budget_remaining_usd == 0.0


def test_pruning_keeps_the_best_and_the_latest():
    """keep_checkpoints=2: the two best by validation score survive, and always the latest."""
    spec = make_spec(n_iterations=20, checkpoint_interval=1, keep_checkpoints=2)
    scores = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.2, 5: 0.3}
    state = given(JobSubmitted(spec=spec), JobStarted())
    state, events = run_iterations(state, 5, scores=scores)
    pruned = sorted(i for e in events if isinstance(e, CheckpointsPruned) for i in e.iterations)
    assert pruned == [2, 4]
    live = [c.info.iteration for c in state.checkpoints if not c.info.pruned]
    assert live == [1, 3, 5]
    assert view(state).best_checkpoint == 1
    released = {d for e in events if isinstance(e, CheckpointsPruned) for d in e.released}
    assert released == {saved(2).state_ref, saved(4).state_ref}


def test_recovery_rewinds_derived_state_but_keeps_cost():
    """A recovery to checkpoint 6 forgets iterations 7-8 (progress, metrics, thresholds, best
    checkpoint) except their cost; attempts counts the recovery."""
    spec = make_spec(max_budget_usd=100.0)
    state = given(JobSubmitted(spec=spec), JobStarted())
    state, _ = run_iterations(state, 6, cost=1.0)
    metrics_at_6 = state.metrics
    state, _ = run_iterations(state, 8, scores={}, cost=40.0)
    assert 0.75 in state.thresholds
    events = decide(Recover(attempt=1), state)
    assert events == [JobRecovered(from_checkpoint=6, attempt=1, cause="crash")]
    state = then(state, events)
    assert state.iteration == 6 and state.metrics == metrics_at_6
    assert state.thresholds == () and state.attempts == 1
    assert state.cost_usd == pytest.approx(86.0)
    assert state.resume_point.iteration == 6
    # the re-run iterations are recorded again after the recovery
    state, events = run_iterations(state, 7)
    assert events[0].iteration == 7


def test_a_checkpoint_recorded_after_later_iterations_rewinds_to_its_own_iteration():
    """A checkpoint written in the background is recorded after the iterations that followed
    it: it names its iteration's metrics and the digest of the state before it, prunes as
    ever, a fold of the log agrees with evolve, and a recovery to it rewinds to what the job
    was at its iteration."""
    spec = make_spec(n_iterations=20, checkpoint_interval=3, keep_checkpoints=1,
                     max_budget_usd=100.0)
    state = given(JobSubmitted(spec=spec), JobStarted())
    stream = [JobSubmitted(spec=spec), JobStarted()]

    def record(command):
        events = decide(command, state)
        stream.extend(events)
        return events, then(state, events)

    for i in range(1, 7):
        due = i == 3
        events, state = record(RecordIteration(
            result=result(i, 20.0 if i < 4 else 31.0 if i == 4 else 0.0),
            saved=saved(i) if due else None, checkpoint_later=i == 6))
        if i == 3:
            assert state.thresholds == ()
        if i == 4:
            assert state.thresholds == (0.75, 0.9)  # reached before checkpoint 6
    assert [type(e) for e in events] == [IterationCompleted]  # iteration 6: no checkpoint yet
    metrics_at_6 = state.metrics
    _, state = record(RecordIteration(result=result(7)))
    before = state
    events, state = record(RecordCheckpoint(iteration=6, saved=saved(6), metrics=metrics_at_6))
    assert isinstance(events[0], CheckpointSaved) and events[0].iteration == 6
    assert events[0].metrics == metrics_at_6 and events[0].state_digest == state_digest(before)
    assert isinstance(events[1], CheckpointsPruned) and events[1].iterations == [3]
    assert state.iteration == 7 and state.resume_point.iteration == 6
    recorded = [RecordedEvent(position=n, stream=state.job_id, version=n,
                              type=event_tag(type(e)), schema_version=type(e).schema_version,
                              recorded_at=AT, event=e) for n, e in enumerate(stream, start=1)]
    assert fold_log(recorded)[state.job_id] == state
    state = then(state, decide(Recover(attempt=1), state))
    assert state.iteration == 6 and state.metrics == metrics_at_6
    assert state.thresholds == (0.75, 0.9)


def test_a_late_checkpoint_out_of_order_or_ending_the_job_is_refused():
    """A checkpoint is recorded later only for a due, not-last iteration, never before its
    iteration, never after a later checkpoint; the refusal decides nothing."""
    spec = make_spec(n_iterations=6, checkpoint_interval=3)
    state, _ = run_iterations(given(JobSubmitted(spec=spec), JobStarted()), 3)
    with pytest.raises(InvalidTransition):  # checkpoint 3 is recorded already
        decide(RecordCheckpoint(iteration=3, saved=saved(3), metrics={}), state)
    with pytest.raises(InvalidTransition):  # iteration 6 is not recorded yet
        decide(RecordCheckpoint(iteration=6, saved=saved(6), metrics={}), state)
    state = then(state, decide(RecordIteration(result=result(4)), state))
    with pytest.raises(InvalidTransition):  # not a multiple of the interval
        decide(RecordCheckpoint(iteration=4, saved=saved(4), metrics={}), state)
    state = then(state, decide(RecordIteration(result=result(5)), state))
    with pytest.raises(ValueError, match="cannot record its checkpoint later"):
        decide(RecordIteration(result=result(6), checkpoint_later=True), state)


def test_recovery_before_the_first_checkpoint_restarts_from_scratch():
    """With no checkpoint yet, recovery rewinds to the initial state."""
    state, _ = run_iterations(given(JobSubmitted(spec=make_spec()), JobStarted()), 2)
    events = decide(Recover(attempt=1), state)
    assert events == [JobRecovered(from_checkpoint=None, attempt=1, cause="crash")]
    state = then(state, events)
    assert state.iteration == 0 and state.resume_point is None


def test_terminal_and_checkpoint_events_carry_the_digest_of_the_state_before_them():
    """Replaying recomputes each recorded digest from the fold (invariant 4)."""
    state = given(JobSubmitted(spec=make_spec()), JobStarted())
    checked = 0
    for i in range(1, 11):
        due = i % 3 == 0 or i == 10
        events = decide(RecordIteration(result=result(i), saved=saved(i) if due else None), state)
        for event in events:
            digest = recorded_digest(event)
            if digest is not None:
                assert digest == state_digest(state)
                checked += 1
            state = then(state, [event])
    assert checked == 4  # checkpoints 3, 6, 9 and the completion


def test_state_digest_ignores_timestamps_but_not_data():
    """The digest is independent of recorded_at, sensitive to any domain field."""
    a = given(JobSubmitted(spec=make_spec()))
    b = given(JobSubmitted(spec=make_spec(seed=7)))
    assert state_digest(a) != state_digest(b)
    from msgspec.structs import replace
    assert state_digest(replace(a, created_at=None)) == state_digest(a)


def test_pause_of_a_running_job_keeps_its_trainer_state():
    """A running job paused at a boundary resumes from the snapshot it paused with."""
    state, _ = run_iterations(given(JobSubmitted(spec=make_spec()), JobStarted()), 4)
    ref = "cd" * 32
    state = then(state, decide(Pause(state_ref=ref), state))
    assert state.status is JobStatus.PAUSED
    assert state.resume_point.iteration == 4 and state.resume_point.state_ref == ref
    state = then(state, decide(Resume(), state))
    assert state.status is JobStatus.QUEUED and state.iteration == 4


def test_cancel_records_the_iteration_reached():
    """A cancelled job's event says how far it got."""
    state, _ = run_iterations(given(JobSubmitted(spec=make_spec()), JobStarted()), 2)
    (event,) = decide(Cancel(reason="user"), state)
    assert isinstance(event, JobCancelled) and event.iteration == 2 and event.reason == "user"


# --- fold_log: a whole log's states, runs of iterations folded in one step ------------------------

_HISTORY_EVENTS = [r.event for path in sorted(HISTORIES.glob("*.jsonl"))
                   for r in load_history(path)]


def _evolved_one_by_one(events: list[RecordedEvent]) -> dict[str, JobState]:
    states: dict[str, JobState] = {}
    for recorded_event in events:
        state = states.get(recorded_event.stream) or initial_state(recorded_event.stream)
        states[recorded_event.stream] = evolve(state, recorded_event)
    return states


def _recorded(log: list[tuple[str, Any]]) -> list[RecordedEvent]:
    """(job, event) pairs as a log records them: positions in order, each job's versions."""
    versions: dict[str, int] = {}
    recorded = []
    for position, (stream, event) in enumerate(log, start=1):
        versions[stream] = versions.get(stream, 0) + 1
        recorded.append(RecordedEvent(
            position=position, stream=stream, version=versions[stream],
            type=event_tag(type(event)), schema_version=type(event).schema_version,
            recorded_at=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=position),
            event=event))
    return recorded


def _log(picks: list[tuple[int, int]]) -> list[RecordedEvent]:
    """Events of the recorded histories, dealt to three jobs in the order picked."""
    return _recorded([(f"job-{job}", _HISTORY_EVENTS[index]) for job, index in picks])


@settings(max_examples=300, deadline=None)
@given_(st.lists(st.tuples(st.integers(0, 2), st.integers(0, len(_HISTORY_EVENTS) - 1)),
                 max_size=60))
def test_fold_log_gives_the_states_evolve_gives_one_event_at_a_time(picks):
    log = _log(picks)
    folded = fold_log(log)
    one_by_one = _evolved_one_by_one(log)
    assert folded == one_by_one
    assert list(folded) == list(one_by_one)  # jobs in the order of their first event


def _checkpoint_events(steps: list[tuple[int, int, int, list[int]]]) -> list[tuple[int, Any]]:
    """Events of two jobs that checkpoint: saves at iterations that mostly go up (a step of -1
    makes one go down), prunes and recoveries naming saved iterations, iterations and budget
    thresholds between them."""
    numbers, saved = [0, 0], [[], []]
    log: list[tuple[int, Any]] = []
    for job, kind, step, picks in steps:
        named = [saved[job][pick % len(saved[job])] for pick in picks] if saved[job] else []
        if kind == 0:
            numbers[job] = max(0, numbers[job] + step)
            saved[job].append(numbers[job])
            digest = f"sha256:{numbers[job]:064x}"
            event: Any = CheckpointSaved(
                iteration=numbers[job], state_ref=digest, validation_score=0.5,
                policy_digest=digest, optimizer_digest=digest, rng_digest=digest,
                state_digest=digest)
        elif kind == 1:
            event = CheckpointsPruned(iterations=named, released=[])
        elif kind == 2:
            event = IterationCompleted(iteration=numbers[job], avg_reward=1.0, std_reward=0.0,
                                       loss=0.1, tokens=3, cost_usd=0.01)
        elif kind == 3:
            event = BudgetThresholdReached(fraction=0.75, cost_usd=1.0, budget_usd=2.0)
        else:
            event = JobRecovered(from_checkpoint=named[0] if named else None, attempt=1)
        log.append((job, event))
    return log


@settings(max_examples=300, deadline=None)
@given_(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0, 0, 1, 1, 2, 3, 4]),
                           st.sampled_from([1, 1, 1, 2, 0, -1]),
                           st.lists(st.integers(0, 5), max_size=3)), max_size=80))
def test_fold_log_folds_checkpoint_saves_and_prunes_as_evolve_does(steps):
    """Saves (mostly in order, sometimes not), prunes, recoveries and other events of two
    jobs interleaved: fold_log keeps checkpoints in a list between events and must still give
    the states evolve gives, pruned marks and their order included."""
    start = [JobSubmitted(spec=make_spec()), JobStarted()]
    log = [(job, event) for job in (0, 1) for event in start] + _checkpoint_events(steps)
    recorded = _recorded([(f"job-{job}", event) for job, event in log])
    assert fold_log(recorded) == _evolved_one_by_one(recorded)


def test_fold_log_of_recorded_histories_matches_evolve():
    for path in sorted(HISTORIES.glob("*.jsonl")):
        log = load_history(path)
        assert fold_log(log) == _evolved_one_by_one(log), path.name
