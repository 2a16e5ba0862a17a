"""Which queries a job scores on: `JobSpec.validation_data`, the held-out split and its rules,
`JobView.validation_set`; and which parts of a trainer state a checkpoint's digests cover."""

from __future__ import annotations

import msgspec
import pytest
from helpers import QUERIES, sim_spec

import flowactors as fa
from flowactors import codec
from flowactors import job as core
from flowactors.events import CheckpointSaved, JobSubmitted, RecordedEvent
from flowactors.spec import digest_form, validate_spec, validation_set
from flowactors.tasks import NoOptions
from flowactors.tasks.simulated import SimulatedOptions, SimulatedTask
from flowactors.training import split_data

VALIDATION = [fa.TrainingQuery(query=f"validation query {i}") for i in range(3)]


def test_a_job_scores_on_its_validation_data_and_trains_on_all_its_training_data(rt):
    """With `validation_data`, every checkpoint's score and the final score are the task's
    `evaluate` on exactly those queries, all of `training_data` trains, and the view says
    `validation_data`."""
    spec = msgspec.structs.replace(sim_spec(n_iterations=4), validation_data=VALIDATION)
    assert split_data(spec) == (QUERIES, VALIDATION)
    view = rt.wait(rt.submit(spec, job_id="own"), timeout=30)
    assert view.status is fa.JobStatus.COMPLETED and view.validation_set == "validation_data"
    task = SimulatedTask(SimulatedOptions())
    for info in rt.checkpoints("own"):
        state = rt.load_checkpoint("own", info.iteration)
        assert info.validation_score == task.evaluate(state, VALIDATION)
        assert info.validation_score != task.evaluate(state, split_data(sim_spec())[1])
    assert view.validation_score == task.evaluate(rt.load_checkpoint("own", 4), VALIDATION)


def test_the_view_names_the_set_scores_were_computed_on(rt):
    """`held_out` for a split of the training data, `training_data` when eval_fraction=0."""
    split = rt.wait(rt.submit(sim_spec(n_iterations=2), job_id="split"), timeout=30)
    assert split.validation_set == "held_out"
    same = rt.wait(rt.submit(sim_spec(n_iterations=2, eval_fraction=0.0), job_id="same"),
                   timeout=30)
    assert same.validation_set == "training_data"
    assert split_data(sim_spec(eval_fraction=0.0)) == (QUERIES, QUERIES)


def one_query(**config) -> dict:
    return {"agent_id": "a", "training_data": [{"query": "q"}], "config": config}


@pytest.mark.parametrize("data, where, why", [
    (one_query(), r"\$\.config\.eval_fraction", "holds out 0"),
    ({**one_query(), "training_data": [{"query": f"q{i}"} for i in range(4)]},
     r"\$\.config\.eval_fraction", "4 queries of training_data holds out 0"),
    ({**one_query(), "validation_data": []}, r"\$\.validation_data", "length >= 1"),
    ({**one_query(), "validation_data": [{"query": "other"}, {"query": "q"}]},
     r"\$\.validation_data\[1\]", "also training_data\\[0\\]"),
    ({**one_query(), "training_data": [{"query": f"q{i % 4}"} for i in range(5)]},
     r"\$\.training_data\[4\]", "also training_data\\[0\\]"),
])
def test_a_split_with_an_empty_side_or_an_overlap_is_a_spec_error(rt, data, where, why):
    """Refused on submit, naming the field, and nothing is written: a split of too little
    data, an empty validation set, a validation query that is also a training query, a
    duplicate training query that a split could put on both sides."""
    with pytest.raises(fa.SpecError, match=why) as raised:
        validate_spec(data)
    assert raised.match(where)
    before = rt.store.head()
    with pytest.raises(fa.SpecError, match=where):
        rt.submit(data, job_id="refused")
    assert rt.store.head() == before


def test_what_needs_no_split_is_accepted():
    """eval_fraction=0 (scores on the training data) and validation_data are accepted with a
    single training query; duplicates are fine when nothing is split."""
    assert validate_spec(one_query(eval_fraction=0)).config.eval_fraction == 0
    own = validate_spec({**one_query(), "training_data": [{"query": "q"}, {"query": "q"}],
                         "validation_data": [{"query": "v"}]})
    assert validation_set(own) == "validation_data"


def test_a_job_recorded_before_the_rules_still_replays_and_says_what_it_scored_on():
    """A log may hold a spec submitted before degenerate splits were refused: it folds (the
    rules are checked on submit, not on reading), trains and scores on its training data as
    it did, and its view says `training_data`."""
    old = fa.JobSpec(agent_id="a", training_data=[fa.TrainingQuery(query="q")])
    with pytest.raises(fa.SpecError):
        validate_spec(old)
    recorded = RecordedEvent(position=1, stream="old", version=1, type="job.submitted",
                             schema_version=1, recorded_at=core._EPOCH,
                             event=JobSubmitted(spec=old))
    state = core.fold([recorded])
    assert core.view(state).validation_set == "training_data"
    assert split_data(old) == (list(old.training_data), list(old.training_data))


def test_a_spec_without_validation_data_digests_as_before_the_field_existed():
    """State digests of jobs recorded before `validation_data` existed must not change: the
    spec is digested without the field while it is None, with it once set."""
    state = core.fold([RecordedEvent(
        position=1, stream="j", version=1, type="job.submitted", schema_version=1,
        recorded_at=core._EPOCH, event=JobSubmitted(spec=sim_spec()))])
    digested = msgspec.msgpack.decode(msgspec.msgpack.encode(digest_form(state.spec)))
    assert list(digested) == ["agent_id", "training_data", "config", "task", "task_options",
                              "priority"]  # JobSpec's fields, in order, before validation_data
    assert digested == {k: v for k, v in msgspec.to_builtins(sim_spec()).items()
                        if k != "validation_data"}
    with_own = msgspec.structs.replace(state, spec=msgspec.structs.replace(
        state.spec, validation_data=VALIDATION))
    assert core.state_digest(with_own) != core.state_digest(state)


# --- checkpoint digests --------------------------------------------------------------------------


class NoOptimizerState(msgspec.Struct, frozen=True):
    weight: float = 0.0


class NoOptimizerTask:
    """A policy that is one float: no optimizer state, no generator state."""

    Options = NoOptions
    state_type = NoOptimizerState

    def __init__(self, options) -> None:
        self.options = options

    def init(self, spec):
        return NoOptimizerState()

    def rollout(self, state, query, *, rng, max_steps, cancelled):
        return fa.Trajectory(reward=rng.random(), success=True, steps=1)

    def update(self, state, groups, config):
        return NoOptimizerState(state.weight + 1.0), {"loss": 0.0}

    def evaluate(self, state, queries):
        return 0.5


def test_digests_of_absent_optimizer_and_rng_are_none(rt):
    """A trainer state without `optimizer` / `rng` records None for their digests (not the
    digest of nothing, equal at every checkpoint); a state with an optimizer records the
    digest of it, which changes as it trains."""
    plain = msgspec.structs.replace(sim_spec(n_iterations=4),
                                    task="test_validation_data:NoOptimizerTask")
    rt.wait(rt.submit(plain, job_id="plain"), timeout=30)
    infos = rt.checkpoints("plain")
    assert len(infos) == 2
    assert all(i.optimizer_digest is None and i.rng_digest is None for i in infos)
    assert len({i.policy_digest for i in infos}) == 2
    rt.wait(rt.submit(sim_spec(n_iterations=4), job_id="sim"), timeout=30)
    infos = rt.checkpoints("sim")
    assert len({i.optimizer_digest for i in infos}) == 2 and None not in {
        i.optimizer_digest for i in infos}
    state = rt.load_checkpoint("sim", 2)
    assert codec.digest_of(state.optimizer) in {i.optimizer_digest for i in infos}
    assert all(i.rng_digest is None for i in infos)  # SimulatedState.rng is None


def test_a_schema_1_checkpoint_keeps_the_digests_it_recorded():
    """Schema 1 of `job.checkpoint_saved` recorded the digest of None for an absent part; it
    upcasts to schema 2 with every value as recorded (its state digests depend on them)."""
    nothing = codec.digest_of(None)
    v1 = {"iteration": 2, "state_ref": "s", "validation_score": 0.5, "metrics": {},
          "policy_digest": "p", "optimizer_digest": nothing, "rng_digest": nothing,
          "state_digest": "d"}
    event = codec.decode_event("job.checkpoint_saved", 1, msgspec.msgpack.encode(v1))
    assert type(event) is CheckpointSaved
    assert msgspec.structs.asdict(event) == {**v1, "state_size": None, "state_location": None}
    assert codec.CURRENT_VERSIONS["job.checkpoint_saved"] == 2
