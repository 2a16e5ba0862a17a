"""The `toolchoice` task: a real environment, real learning under GRPO, exact determinism.

The runtime is not involved: `train` below mimics it (seeded held-out split, seeded batches,
one seeded RNG per rollout, groups combined in query-then-index order).
"""

from __future__ import annotations

import math
import random
import threading
import time

import msgspec
import pytest

from flowactors import SpecError
from flowactors.spec import GRPOConfig, JobSpec, TrainingQuery
from flowactors.tasks import build_task, failed_trajectory
from flowactors.tasks.toolchoice import (
    ACTIONS, ANSWER, CONTEXTS, RESULT, START, TOOLS, ToolChoiceState, ToolChoiceTask,
    answer_matches, make_training_data, run_tool)

LEARNING_RATE = 0.1
N_ITERATIONS = 30


def make_spec(seed: int, *, n_iterations: int = N_ITERATIONS, task_options: dict | None = None,
              training_data: list[TrainingQuery] | None = None) -> JobSpec:
    return JobSpec(
        agent_id="a",
        training_data=training_data if training_data is not None
        else make_training_data(60, seed),
        config=GRPOConfig(n_iterations=n_iterations, batch_size=8, n_trajectories_per_query=8,
                          learning_rate=LEARNING_RATE, checkpoint_interval=5,
                          max_steps_per_trajectory=4, seed=seed),
        task="toolchoice", task_options=task_options or {})


def split(spec: JobSpec) -> tuple[list[TrainingQuery], list[TrainingQuery]]:
    data = list(spec.training_data)
    shuffled = random.Random(spec.config.seed).sample(data, len(data))
    n_eval = int(len(data) * spec.config.eval_fraction)
    return shuffled[n_eval:], shuffled[:n_eval]


def collect(task, state, spec: JobSpec, train: list[TrainingQuery], iteration: int):
    """One iteration's groups, in query-then-index order, each rollout with its own RNG."""
    config, seed = spec.config, spec.config.seed
    batch = random.Random(f"{seed}:batch:{iteration}").sample(train, config.batch_size)
    never = threading.Event()
    return [[task.rollout(state, query, rng=random.Random(f"{seed}:{iteration}:{q}:{i}"),
                          max_steps=config.max_steps_per_trajectory, cancelled=never)
             for i in range(config.n_trajectories_per_query)]
            for q, query in enumerate(batch)]


def train(spec: JobSpec):
    """Run the whole job in-process: (task, final state, held-out success per iteration)."""
    task = build_task(spec)
    train_data, held_out = split(spec)
    state = task.init(spec)
    curve = [task.evaluate(state, held_out)]
    for iteration in range(spec.config.n_iterations):
        groups = collect(task, state, spec, train_data, iteration)
        state, metrics = task.update(state, groups, spec.config)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        curve.append(task.evaluate(state, held_out))
    return task, state, curve


def forced_state(task: ToolChoiceTask, spec: JobSpec, plan: dict[int, int]) -> ToolChoiceState:
    """A state whose policy takes action `plan[context]` in that context with certainty."""
    state = task.init(spec)
    weights = list(state.policy.weights)
    buckets = state.policy.buckets
    for context, action in plan.items():
        base = (context * len(ACTIONS) + action) * buckets
        weights[base:base + buckets] = [100.0] * buckets
    return msgspec.structs.replace(
        state, policy=msgspec.structs.replace(state.policy, weights=weights))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_learns_to_choose_tools_for_held_out_queries(seed):
    """From the words alone, held-out success goes from <= 0.4 to >= 0.9 in 30 fast iterations."""
    spec = make_spec(seed)
    started = time.perf_counter()
    _, _, curve = train(spec)
    elapsed = time.perf_counter() - started
    assert curve[0] <= 0.4, curve
    assert curve[-1] >= 0.9, curve
    assert elapsed < 5.0, f"training loop took {elapsed:.2f}s"


def test_same_seed_trains_bit_identical_states():
    """Two runs of one spec end with the same encoded state bytes; another seed does not."""
    encode = msgspec.msgpack.encode
    _, first, _ = train(make_spec(3, n_iterations=8))
    _, second, _ = train(make_spec(3, n_iterations=8))
    _, other, _ = train(make_spec(4, n_iterations=8,
                                  training_data=make_training_data(60, 3)))
    assert encode(first) == encode(second)
    assert encode(first) != encode(other)


def test_update_depends_on_trajectory_order_within_a_group():
    """Reordering one group's trajectories changes the update's bits (but not its meaning)."""
    spec = make_spec(5)
    task = build_task(spec)
    train_data, _ = split(spec)
    state = task.init(spec)
    for iteration in range(3):
        state, _ = task.update(state, collect(task, state, spec, train_data, iteration),
                               spec.config)
    groups = collect(task, state, spec, train_data, 3)
    index = next(i for i, g in enumerate(groups) if len({t.reward for t in g}) > 2)
    shuffled = list(groups)
    shuffled[index] = list(reversed(groups[index]))
    in_order, _ = task.update(state, groups, spec.config)
    reordered, _ = task.update(state, shuffled, spec.config)
    assert msgspec.msgpack.encode(in_order) != msgspec.msgpack.encode(reordered)
    assert max(abs(a - b) for a, b in zip(in_order.policy.weights,
                                          reordered.policy.weights)) < 1e-6


def test_state_round_trips_through_msgpack_and_training_continues_exactly():
    """A decoded checkpoint equals the state and continues to the same bits as the original."""
    spec = make_spec(6, n_iterations=4)
    task, state, _ = train(spec)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=task.state_type)
    assert decoded == state
    train_data, held_out = split(spec)
    groups = collect(task, state, spec, train_data, 4)
    assert collect(task, decoded, spec, train_data, 4) == groups
    after, metrics = task.update(state, groups, spec.config)
    after_decoded, metrics_decoded = task.update(decoded, groups, spec.config)
    assert msgspec.msgpack.encode(after) == msgspec.msgpack.encode(after_decoded)
    assert metrics == metrics_decoded
    assert task.evaluate(after, held_out) == task.evaluate(after_decoded, held_out)


def test_rollout_raises_when_cancelled_before_it_starts():
    """A rollout whose cancellation event is already set does no step at all."""
    spec = make_spec(0)
    task = build_task(spec)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(InterruptedError):
        task.rollout(task.init(spec), spec.training_data[0], rng=random.Random(0),
                     max_steps=4, cancelled=cancelled)


def test_rollout_stops_between_steps_once_cancelled():
    """Cancellation during a step stops the rollout before the next step is taken."""
    spec = make_spec(0)
    task = build_task(spec)
    # A policy that never answers would take all 1000 steps.
    state = forced_state(task, spec, {START: 0, RESULT: 0})
    cancelled = threading.Event()

    class CancellingRandom(random.Random):
        draws = 0

        def random(self):
            self.draws += 1
            cancelled.set()
            return super().random()

    rng = CancellingRandom(0)
    with pytest.raises(InterruptedError):
        task.rollout(state, spec.training_data[0], rng=rng, max_steps=1000, cancelled=cancelled)
    assert rng.draws == 1


@pytest.mark.parametrize("options, field", [
    ({"temperature": 0.0}, "$.task_options.temperature"),
    ({"tokens_per_step": "many"}, "$.task_options.tokens_per_step"),
    ({"usd_per_1k_tokens": -1.0}, "$.task_options.usd_per_1k_tokens"),
    ({"feature_buckets": 2}, "$.task_options.feature_buckets"),
    ({"bogus": 1}, "bogus"),
])
def test_invalid_options_are_a_spec_error_naming_the_field(options, field):
    """Bad task_options fail when the task is built, with the offending field in the message."""
    with pytest.raises(SpecError, match=field.replace("$", r"\$")):
        build_task(make_spec(0, task_options=options))


def test_unknown_expected_tool_is_a_spec_error_naming_the_query():
    """An expected outcome naming a tool the task lacks is rejected at init, with its path."""
    data = [TrainingQuery(query="what is 2 + 2", expected_outcome={"tool": "search"})]
    spec = make_spec(0, training_data=data)
    with pytest.raises(SpecError, match=r"\$\.training_data\[0\]\.expected_outcome\.tool"):
        build_task(spec).init(spec)


@pytest.mark.parametrize("tool", range(len(TOOLS)))
def test_choosing_the_expected_tool_earns_the_shaping_bonus(tool):
    """With one step, the expected tool scores 0.1 - 0.01, any other tool -0.01."""
    spec = make_spec(0)
    task = build_task(spec)
    query = spec.training_data[0]  # arithmetic: the calculator is expected
    state = forced_state(task, spec, {START: tool})
    trajectory = task.rollout(state, query, rng=random.Random(0), max_steps=1,
                              cancelled=threading.Event())
    expected = 0.09 if TOOLS[tool] == query.expected_outcome["tool"] else -0.01
    assert trajectory.reward == pytest.approx(expected)
    assert not trajectory.success


def test_bonus_is_paid_once_and_a_correct_answer_earns_the_outcome():
    """Calling the right tool twice pays the bonus once; answering its result pays +1."""
    spec = make_spec(0)
    task = build_task(spec)
    query = spec.training_data[0]
    calculator = TOOLS.index("calculator")
    twice = task.rollout(forced_state(task, spec, {START: calculator, RESULT: calculator}),
                         query, rng=random.Random(0), max_steps=2, cancelled=threading.Event())
    assert twice.reward == pytest.approx(0.1 - 0.02)
    answered = task.rollout(forced_state(task, spec, {START: calculator, RESULT: ANSWER}),
                            query, rng=random.Random(0), max_steps=4,
                            cancelled=threading.Event())
    assert answered.success and answered.steps == 2
    assert answered.reward == pytest.approx(0.1 - 0.02 + 1.0)


def test_cost_is_tokens_per_step_at_the_configured_price():
    """A trajectory bills tokens_per_step per step, priced per 1000 tokens."""
    spec = make_spec(0, task_options={"tokens_per_step": 200, "usd_per_1k_tokens": 0.5})
    task = build_task(spec)
    state = forced_state(task, spec, {START: 0, RESULT: 0})
    trajectory = task.rollout(state, spec.training_data[0], rng=random.Random(0), max_steps=3,
                              cancelled=threading.Event())
    assert (trajectory.steps, trajectory.tokens) == (3, 600)
    assert trajectory.cost_usd == pytest.approx(0.3)


def test_default_cost_is_small_but_nonzero():
    """By default a trajectory costs something, so budgets can be demonstrated."""
    spec = make_spec(0)
    task = build_task(spec)
    trajectory = task.rollout(task.init(spec), spec.training_data[0], rng=random.Random(0),
                              max_steps=4, cancelled=threading.Event())
    assert trajectory.tokens > 0 and 0.0 < trajectory.cost_usd < 0.01


def test_failed_trajectories_teach_nothing_and_do_not_break_the_update():
    """A failed rollout in a group is skipped; a batch of only failures leaves the state as is."""
    spec = make_spec(0)
    task = build_task(spec)
    train_data, _ = split(spec)
    state = task.init(spec)
    groups = collect(task, state, spec, train_data, 0)
    groups[0][3] = failed_trajectory("boom")
    new_state, metrics = task.update(state, groups, spec.config)
    assert new_state.optimizer.step == 1 and math.isfinite(metrics["loss"])
    only_failures = [[failed_trajectory("boom")] * 2]
    unchanged, _ = task.update(state, only_failures, spec.config)
    assert unchanged == state


def test_training_data_is_deterministic_varied_and_answerable_by_exactly_its_tool():
    """Every generated query is answered by its expected tool and by no other tool."""
    data = make_training_data(80, 11)
    assert data == make_training_data(80, 11)
    assert data != make_training_data(80, 12)
    assert {q.kind for q in data} == {"arithmetic", "lookup", "conversion", "text"}
    assert len({q.query for q in data}) > 60
    for query in data:
        expected = query.expected_outcome
        for tool in TOOLS:
            result = run_tool(tool, query.query)
            assert answer_matches(result, expected, tool) == (tool == expected["tool"]), (
                query, tool, result)


def test_answers_compare_numbers_as_numbers_and_text_without_case():
    """'391' matches 391 and '391.0'; 'Paris' matches 'paris'; a wrong tool never matches."""
    assert answer_matches("391.0", {"answer": 391}, "calculator")
    assert answer_matches("paris", {"answer": "Paris ", "tool": "lookup"}, "lookup")
    assert not answer_matches("paris", {"answer": "paris", "tool": "lookup"}, "text")
    assert not answer_matches(None, {"answer": "paris"}, "lookup")
    assert not answer_matches("anything", {}, "lookup")


def test_untrained_greedy_policy_never_answers():
    """The zero-initialised policy is uniform; greedy ties never pick `answer`, so it scores 0."""
    spec = make_spec(0)
    task = build_task(spec)
    state = task.init(spec)
    assert len(state.policy.weights) == CONTEXTS * len(ACTIONS) * state.policy.buckets
    assert task.evaluate(state, spec.training_data) == 0.0
    assert task.evaluate(state, []) == 0.0
