"""Hostile input, fuzzed: job specs, history lines and control requests built by hypothesis.

The contract under test: the only exceptions that escape are `FlowError` subclasses whose
message names the field or line; a rejected spec writes nothing; a rejected control request
changes no job, and its answer says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import sim_spec, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import flowactors as fa
from flowactors.spec import validate_spec
from flowactors.store import EventStore
from flowactors.tasks import build_task
from flowactors.testing import parse_history_line

HISTORIES = Path(__file__).parent / "histories"


def fuzz(examples: int) -> settings:
    """Settings of one fuzz test: no deadline (the runtime's threads make timing vary)."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("quiet_logs")


# --- strategies ---------------------------------------------------------------------------------

any_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=[]), max_size=12),  # NUL, controls, surrogates
    st.sampled_from(["", " ", "\x00", "\ud800", "a" * 201, "$.config", "job-0\n"]),
)
any_int = st.one_of(st.integers(-10, 10**6), st.integers(), st.sampled_from(
    [0, -1, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 2**70]))
any_float = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e308, float("nan")]))
scalars = st.one_of(st.none(), st.booleans(), any_int, any_float, any_text)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=12)

TASKS = ["simulated", "toolchoice", "nope", "no_such_module:Task", ".relative:Task",
         "flowactors:errors", "os:sep", "json:dumps", "builtins:int", "flowactors:FlowError",
         "flowactors.tasks.simulated:SimulatedTask.__init__"]
CONFIG_FIELDS = list(msgspec.structs.fields(fa.GRPOConfig))


def valid_spec_data() -> dict[str, Any]:
    return {"agent_id": "agent", "training_data": [{"query": f"q{i}"} for i in range(5)],
            "config": {"n_iterations": 3, "checkpoint_interval": 2, "seed": 1},
            "task": "simulated", "task_options": {"rollout_seconds": 0.0}, "priority": 0}


# (path into the spec data, the field's name as the error must name it)
MUTABLE_PATHS: list[tuple[tuple[Any, ...], str]] = [
    (("agent_id",), "agent_id"), (("training_data",), "training_data"),
    (("training_data", 0), "training_data"), (("training_data", 0, "query"), "query"),
    (("training_data", 0, "expected_outcome"), "expected_outcome"),
    (("training_data", 0, "kind"), "kind"), (("config",), "config"),
    (("task",), "task"), (("task_options",), "task_options"),
    (("task_options", "rollout_seconds"), "rollout_seconds"),
    (("task_options", "failure_rate"), "failure_rate"),
    (("task_options", "fail_at_iteration"), "fail_at_iteration"),
    (("priority",), "priority"), (("unexpected_field",), "unexpected_field"),
    (("config", "unexpected_field"), "unexpected_field"),
    *[(("config", f.name), f.name) for f in CONFIG_FIELDS],
]


@st.composite
def near_valid_specs(draw) -> tuple[dict[str, Any], str]:
    """A valid spec with one field replaced by hostile data; returns (data, field name)."""
    data = valid_spec_data()
    path, name = draw(st.sampled_from(MUTABLE_PATHS))
    value = draw(st.one_of(json_like, st.sampled_from(TASKS)) if path == ("task",)
                 else json_like)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    if path == ("task",) and draw(st.booleans()):
        data["task_options"] = {}  # so that the task itself is what gets checked
    return data, name


# --- job specs ----------------------------------------------------------------------------------


@fuzz(150)
@given(data=json_like)
@example(data="\ud800")
@example(data={"\ud800": None})
@example(data={"agent_id": "a", "training_data": [{"query": "q"}], "config": {"\udc80": 1}})
def test_validate_spec_rejects_arbitrary_data_with_a_spec_error_only(data):
    """Any JSON-like value either is a valid JobSpec or raises SpecError — nothing else."""
    try:
        spec = validate_spec(data)
    except fa.SpecError as exc:
        assert str(exc).startswith("invalid job spec")
    else:
        assert isinstance(spec, fa.JobSpec)


def _spec_error_or_task(data: Any) -> fa.JobSpec | fa.SpecError:
    """What submit's checks say about `data`: the spec, or the SpecError (anything else
    escapes and fails the test)."""
    try:
        spec = validate_spec(data)
        build_task(spec)
        return spec
    except fa.SpecError as exc:
        return exc


@fuzz(150)
@given(case=near_valid_specs())
def test_a_rejected_field_is_named_in_the_error(case):
    """A spec with one hostile field is accepted, or rejected with a SpecError naming that
    field (its path, or its name) — never any other exception."""
    data, name = case
    outcome = _spec_error_or_task(data)
    if isinstance(outcome, fa.SpecError):
        message = str(outcome)
        assert name in message or "$" in message and name.split("_")[0] in message, message


@pytest.mark.parametrize("task", [t for t in TASKS if t not in ("simulated", "toolchoice")])
def test_a_task_name_that_is_not_a_task_is_a_spec_error(tmp_path, task):
    """Regression: a 'module:attr' task naming something that is not a task class escaped
    submit as a raw TypeError (a relative module name, a module, a str, a function with
    another signature) or — an exception class — was accepted and written as a job that can
    only fail. It must be a SpecError naming the task, and nothing is written."""
    data = {**valid_spec_data(), "task": task, "task_options": {}}
    with fa.Runtime(tmp_path / "flow.db", handle_signals=False) as rt:
        before = rt.store.head()
        with pytest.raises(fa.SpecError, match="task"):
            rt.submit(data, job_id="job")
        assert rt.store.head() == before
        assert rt.jobs() == []


def test_a_string_with_a_lone_surrogate_is_a_spec_error():
    """Regression: validate_spec raised a raw UnicodeEncodeError (from msgspec building its
    error message) for a lone surrogate in a string or a key where a JobSpec was expected."""
    for data in ("\ud800", {"\ud800": None}):
        with pytest.raises(fa.SpecError):
            validate_spec(data)


@pytest.mark.parametrize("field, value", [
    ("task_options", {"fail_at_iteration": 2**70}),
    ("training_data", [{"query": "q", "expected_outcome": {"answer": 2**64}}]),
    ("training_data", [{"query": "q", "expected_outcome": {"answer": -2**63 - 1}}]),
    ("agent_id", "agent-\ud800"),
    ("training_data", [{"query": "\udfff"}]),
])
def test_a_spec_the_log_cannot_store_is_a_spec_error(tmp_path, field, value):
    """Regression: a spec that validates but cannot be encoded into the log (an integer
    beyond MessagePack's 64 bits, a string with a lone surrogate) escaped submit as a raw
    OverflowError / UnicodeEncodeError from the store's encoder. It must be a SpecError
    naming the field, and nothing is written."""
    data = {**valid_spec_data(), field: value}
    with fa.Runtime(tmp_path / "flow.db", handle_signals=False) as rt:
        before = rt.store.head()
        with pytest.raises(fa.SpecError) as raised:
            rt.submit(data, job_id="job")
        assert field in str(raised.value) or field == "training_data" and "$.training_data" \
            in str(raised.value), str(raised.value)
        assert rt.store.head() == before


@pytest.mark.timeout(180)
def test_submit_of_hostile_specs_raises_spec_error_and_writes_nothing(tmp_path):
    """Runtime.submit with hostile specs and job ids: a SpecError (or, for the spec already
    submitted under that id, the same job back), and the log's head does not move."""
    with fa.Runtime(tmp_path / "flow.db", handle_signals=False) as rt:
        existing = validate_spec(valid_spec_data())
        rt.submit(existing, job_id="existing")
        rt.cancel("existing")  # terminal: the runtime is idle from here on
        idle = rt.store.head()
        views = rt.jobs()

        @fuzz(120)
        @given(data=st.one_of(near_valid_specs().map(lambda c: c[0]), json_like),
               job_id=st.one_of(st.none(), any_text, any_int))
        def submit_is_refused(data, job_id):
            outcome = _spec_error_or_task(data)
            if isinstance(outcome, fa.JobSpec):  # a valid spec: reuse the taken id
                job_id = "existing"
            try:
                returned = rt.submit(data, job_id=job_id)
            except fa.SpecError:
                pass
            else:  # only the identical spec under its own id is accepted (idempotent)
                assert returned == "existing" and outcome == existing
            assert rt.store.head() == idle
            assert rt.jobs() == views

        submit_is_refused()


# --- history lines ------------------------------------------------------------------------------


def _real_lines() -> list[str]:
    lines = []
    for path in sorted(HISTORIES.glob("*.jsonl")):
        lines.extend(line for line in path.read_text().splitlines() if line.strip())
    return lines


REAL_LINES = _real_lines()


@st.composite
def mutated_lines(draw) -> str:
    """A real exported line with one value (anywhere in it) replaced by hostile data."""
    line = json.loads(draw(st.sampled_from(REAL_LINES)))
    target = line
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        if isinstance(target[key], (dict, list)) and draw(st.booleans()):
            target = target[key]
            continue
        if draw(st.integers(0, 5)) == 0:
            del target[key]
        else:
            target[key] = draw(json_like)
        break
    return json.dumps(line, allow_nan=True)


@fuzz(200)
@given(line=st.one_of(mutated_lines(), json_like.map(json.dumps), st.binary(max_size=64),
                      any_text))
@example(line="\ud800")
@example(line='{"position": 1, "stream": "\ud800"}')
def test_a_hostile_history_line_raises_log_corrupted_naming_the_line(line):
    """A damaged or arbitrary history line parses, or raises LogCorrupted naming the file and
    line — never another exception."""
    where = "history.jsonl:7"
    try:
        recorded = parse_history_line(line, where)
    except fa.LogCorrupted as exc:
        assert str(exc).startswith(where), str(exc)
    else:
        assert isinstance(recorded, fa.RecordedEvent)


def test_a_history_line_with_a_lone_surrogate_is_log_corrupted():
    """Regression: parse_history_line of a str holding a lone surrogate raised a raw
    UnicodeEncodeError; it must be LogCorrupted naming the line."""
    with pytest.raises(fa.LogCorrupted, match="h.jsonl:3"):
        parse_history_line('{"position": 1, "stream": "\ud800"}', "h.jsonl:3")


# --- control requests ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_hostile_control_requests_are_refused_or_rejected_and_change_no_job(tmp_path):
    """Control requests from another process with arbitrary job ids and commands, to a
    runtime whose jobs are all terminal: the request is refused with a FlowError, or the
    owner answers `rejected` with a reason; no job changes and no event is written."""
    path = tmp_path / "flow.db"
    with fa.Runtime(path, handle_signals=False) as rt:
        rt.submit(sim_spec("a", n_iterations=2), job_id="done")
        rt.submit(sim_spec("b", n_iterations=500, task_options={"rollout_seconds": 0.01}),
                  job_id="gone")
        rt.wait("done", timeout=60)
        rt.cancel("gone")
        views = rt.jobs()
        head = rt.store.head()
        requester = EventStore(path, mode="requester")

        @fuzz(40)
        @given(job_id=st.one_of(st.sampled_from(["done", "gone", "Done", "done ", "gone\x00"]),
                                any_text),
               command=st.one_of(st.sampled_from(["pause", "resume", "cancel"]), any_text))
        def request_is_rejected(job_id, command):
            try:
                request_id = requester.request(job_id, command)
            except fa.FlowError as exc:
                assert "\n" not in str(exc)
                return
            answer = wait_until(lambda: requester.answer_of(request_id), 10,
                                f"an answer to request {request_id}")
            assert answer.outcome == "rejected" and answer.reason, answer
            assert rt.jobs() == views
            assert rt.store.head() == head

        try:
            request_is_rejected()
        finally:
            requester.close()


@pytest.fixture
def requester(tmp_path):
    EventStore(tmp_path / "flow.db", mode="owner").close()
    with EventStore(tmp_path / "flow.db", mode="requester") as store:
        yield store


def test_an_unknown_command_is_a_flow_error(requester):
    """Regression: EventStore.request with a command other than pause/resume/cancel raised a
    bare ValueError; hostile input must surface as a FlowError (one that is also a ValueError
    keeps existing callers working) naming the command."""
    with pytest.raises(fa.FlowError, match="restart"):
        requester.request("job", "restart")  # type: ignore[arg-type]


def test_a_job_id_the_log_cannot_store_is_a_flow_error(requester):
    """Regression: a job id with a lone surrogate made EventStore.request raise a raw
    UnicodeEncodeError from sqlite3; it must be a FlowError naming the job id."""
    with pytest.raises(fa.FlowError, match="job_id"):
        requester.request("job-\ud800", "cancel")
