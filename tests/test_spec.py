"""What a spec and a job id may hold: every number bounded, every float finite, ids safe in a
file name. A refused one is a SpecError naming where, and writes nothing."""

from __future__ import annotations

import math
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowactors as fa
from flowactors import testing
from flowactors.rollouts import Deadlines
from flowactors.spec import validate_job_id, validate_spec
from helpers import open_runtime, sim_spec


@pytest.mark.parametrize(("config", "field"), [
    ({"rollout_timeout_s": math.inf}, "rollout_timeout_s"),
    ({"rollout_timeout_s": 1e300}, "rollout_timeout_s"),
    ({"max_budget_usd": math.inf}, "max_budget_usd"),
    ({"checkpoint_interval": 10**9}, "checkpoint_interval"),
])
def test_a_number_out_of_its_bounds_is_a_spec_error_naming_the_field(config, field):
    """An unbounded number (an infinite timeout switched off every job's timeouts) is
    refused, and the error names the field."""
    with pytest.raises(fa.SpecError, match=rf"\$\.config\.{field}"):
        validate_spec(sim_spec(**config))


def test_a_task_option_out_of_its_bounds_is_a_spec_error_naming_it():
    """Task options are bounded too: an infinite cost per trajectory is refused."""
    with pytest.raises(fa.SpecError, match=r"cost_per_trajectory_usd"):
        validate_spec(sim_spec(task_options={"cost_per_trajectory_usd": 1e309}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_anywhere_in_a_spec_is_a_spec_error_naming_its_path(value):
    """NaN would be exported as null and fail the run's own history check: refused, named."""
    spec = fa.JobSpec(agent_id="a", training_data=[
        fa.TrainingQuery(query="q", expected_outcome={"answer": {"scores": [1.0, value]}})])
    with pytest.raises(fa.SpecError,
                       match=r"\$\.training_data\[0\]\.expected_outcome\.answer\.scores\[1\]"):
        validate_spec(spec)


@pytest.mark.parametrize("job_id", ["../../etc", "a/b", " ", "", ".hidden", "a" * 129,
                                    "tab\there", "é", "job\n"])
def test_an_unsafe_job_id_is_refused_and_nothing_is_written(tmp_path, job_id):
    """Ids end up in file names: path separators, spaces, leading dots, over 128 characters
    and non-ASCII are refused by submit, which then writes nothing."""
    with open_runtime(tmp_path / "flow.db") as rt:
        head = rt.store.head()
        with pytest.raises(fa.SpecError, match="invalid job id"):
            rt.submit(sim_spec(), job_id=job_id)
        assert rt.store.head() == head and rt.jobs() == []


@pytest.mark.parametrize("job_id", ["run-1", "a" * 128, "exp:lr=0.1"[:6], "A_b.c:d-9"])
def test_a_safe_job_id_is_accepted(job_id):
    """Letters, digits and . _ : - up to 128 characters are fine."""
    assert validate_job_id(job_id) == job_id


@pytest.mark.timeout(30)
def test_one_far_deadline_does_not_stop_the_others():
    """The shared deadlines thread survives a deadline too far to wait for at once (it died
    with OverflowError) and a callback that raises, and keeps serving the other jobs."""
    deadlines = Deadlines()
    fired = threading.Event()
    try:
        deadlines.call_at(time.monotonic() + 1e300, lambda: None)
        deadlines.call_at(time.monotonic(), lambda: 1 / 0)
        deadlines.call_at(time.monotonic() + 0.05, fired.set)
        assert fired.wait(10)
    finally:
        deadlines.close()


outcomes = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@pytest.mark.timeout(300)
def test_every_accepted_spec_exports_a_history_that_passes_its_check(tmp_path):
    """Property: whatever a spec holds, if submit accepts it, the exported history of its run
    loads back and every recorded state digest is reproduced (with `validation_data` too)."""
    accepted: list[str] = []

    with open_runtime(tmp_path / "flow.db") as rt:
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(outcome=outcomes, kind=st.one_of(st.none(), st.text(max_size=8)),
               query=st.text(min_size=1, max_size=8))
        def submit_any(outcome, kind, query):
            spec = fa.JobSpec(agent_id="a", task="simulated", training_data=[
                fa.TrainingQuery(query=query, expected_outcome={"x": outcome}, kind=kind)],
                validation_data=[fa.TrainingQuery(query=query + "?", kind=kind)],
                config=fa.GRPOConfig(n_iterations=2, checkpoint_interval=1, batch_size=1,
                                     n_trajectories_per_query=2))
            try:
                accepted.append(rt.submit(spec, job_id=f"job-{len(accepted)}"))
            except fa.SpecError:
                assert _has_non_finite(outcome)  # the only reason to refuse these

        submit_any()
        assert accepted, "no spec was accepted"
        for job_id in accepted:
            rt.wait(job_id, timeout=60)
    for job_id in accepted:
        out = tmp_path / f"{job_id}.jsonl"
        testing.record_history(tmp_path / "flow.db", out, job_id)
        report = testing.check_history(testing.load_history(out))
        assert report.ok, (job_id, report)


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_has_non_finite(item) for item in items)
