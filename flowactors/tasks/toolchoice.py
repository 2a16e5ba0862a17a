"""`toolchoice`: a real, small, CPU-only learning task — choose the tool that answers a query.

The environment is real (`toolchoice_env`, whose names are re-exported here): each query is a
short text, and four little tools actually try to answer it — a calculator, a lookup table of
facts, a unit converter and a text tool. One more action, `answer`, submits the latest tool
result and ends the trajectory. A trajectory is at most `max_steps` actions.

The policy sees only the query's words (hashed bag of words, numbers folded into one token),
never its id or its `kind`, so what it learns carries over to held-out queries: it is a linear
softmax per context (no result yet / a result / the tool failed) over those features.

Rewards are shaped: +0.1 the first time the expected tool is used (only the first, so calling
it again pays nothing), -0.01 per step, +1 when the submitted answer matches
`expected_outcome`. The update is GRPO: the discounted return (`GRPOConfig.gamma`) of each
trajectory is normalised within its query's group (`group_advantages`), the policy gradient of
the summed step log-probabilities is clipped to a global norm and applied with Adam
(`GRPOConfig.learning_rate`). Plain Python on purpose: the core stays dependency-free and the
state (lists of floats) encodes to the same bytes on every run.

Determinism: the policy starts at zero (uniform), rollouts draw only from the `rng` they are
given, and the update sums trajectories in the order it receives them (query, then index).
Floating-point addition is not associative, so another order gives other bits — which is why
the runtime must never combine results in completion order.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Annotated, ClassVar

import msgspec

from ..errors import SpecError
from ..spec import GRPOConfig, JobSpec, TrainingQuery
from .base import Trajectory, group_advantages
from .toolchoice_env import (  # re-exported: the environment's names stay importable here
    ACTIONS,
    ANSWER,
    CONTEXTS,
    CORRECT_TOOL_BONUS,
    FACTS,
    NO_RESULT,
    OUTCOME_REWARD,
    RESULT,
    REWARD_SCALE,
    START,
    STEP_PENALTY,
    TOOLS,
    answer_matches,
    make_training_data,
    play_episode,
    query_features,
    run_tool,
    sample_action,
)

__all__ = ["ACTIONS", "ANSWER", "CONTEXTS", "NO_RESULT", "RESULT", "START", "TOOLS", "AdamState",
           "ToolChoiceOptions", "ToolChoicePolicy", "ToolChoiceState", "ToolChoiceTask",
           "answer_matches", "make_training_data", "play_episode", "query_features", "run_tool",
           "sample_action"]

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


class ToolChoiceOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of the `toolchoice` task (`JobSpec.task_options`)."""

    tokens_per_step: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 50
    """Tokens one step is billed as (a prompt plus a tool call)."""
    usd_per_1k_tokens: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 0.0001
    """Price of 1000 tokens: small but nonzero, so a budget can be demonstrated."""
    temperature: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 1.0
    """Sampling temperature of rollouts (evaluation is always greedy)."""
    feature_buckets: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 256
    """Size of the hashed bag-of-words feature space."""
    max_grad_norm: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0
    """Global gradient norm above which the gradient is scaled down before Adam."""


class ToolChoicePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Linear softmax policy: `weights[((context * len(ACTIONS)) + action) * buckets + f]`.

    `max_steps` is kept here so that `evaluate` (which gets no config) plays the same horizon
    as training.
    """

    weights: list[float]
    buckets: int
    max_steps: int


class AdamState(msgspec.Struct, frozen=True, kw_only=True):
    """Adam moments and step count: part of the checkpoint, so a resume continues exactly."""

    step: int
    m: list[float]
    v: list[float]


class ToolChoiceState(msgspec.Struct, frozen=True, kw_only=True):
    """The trainer state. `rng` is None: update and evaluate need no randomness of their own."""

    policy: ToolChoicePolicy
    optimizer: AdamState
    rng: None = None


# --- The policy --------------------------------------------------------------------------------


def _probabilities(policy: ToolChoicePolicy, context: int, features: list[int],
                   temperature: float) -> list[float]:
    weights, buckets = policy.weights, policy.buckets
    logits = []
    for action in range(len(ACTIONS)):
        base = (context * len(ACTIONS) + action) * buckets
        logits.append(sum(weights[base + f] for f in features) / temperature)
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _greedy(probabilities: list[float]) -> int:
    """Argmax, ties to the lowest index: deterministic."""
    return max(range(len(probabilities)), key=lambda a: (probabilities[a], -a))


# --- The task ----------------------------------------------------------------------------------

class ToolChoiceTask:
    """Learn which tool answers which query, from the query's words, by GRPO."""

    Options: ClassVar[type[msgspec.Struct]] = ToolChoiceOptions
    state_type: ClassVar[type] = ToolChoiceState
    inline_rollouts: ClassVar[bool] = True  # a rollout is a few hundred µs of pure Python
    reward_scale: ClassVar[str] = REWARD_SCALE

    def __init__(self, options: ToolChoiceOptions) -> None:
        self.options = options

    def init(self, spec: JobSpec) -> ToolChoiceState:
        """A uniform policy (zero weights) and fresh Adam moments.

        Raises:
            SpecError: an expected outcome names a tool this task does not have.
        """
        for i, query in enumerate(spec.training_data):
            tool = query.expected_outcome.get("tool")
            if tool is not None and tool not in TOOLS:
                raise SpecError(f"unknown tool {tool!r} at $.training_data[{i}]"
                                f".expected_outcome.tool: expected one of {', '.join(TOOLS)}")
        size = CONTEXTS * len(ACTIONS) * self.options.feature_buckets
        policy = ToolChoicePolicy(weights=[0.0] * size, buckets=self.options.feature_buckets,
                                  max_steps=spec.config.max_steps_per_trajectory)
        return ToolChoiceState(policy=policy,
                               optimizer=AdamState(step=0, m=[0.0] * size, v=[0.0] * size))

    def rollout(self, state: ToolChoiceState, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        """Sample actions until `answer` or `max_steps`; rewards as in the module docstring.

        `data` keeps what the update needs (features, contexts, actions, step rewards) as
        plain builtins.

        Raises:
            InterruptedError: `cancelled` was set before a step.
        """
        policy = state.policy
        features = query_features(query.query, policy.buckets)
        return play_episode(
            query, features,
            lambda context: _probabilities(policy, context, features, self.options.temperature),
            tokens_per_step=self.options.tokens_per_step,
            usd_per_1k_tokens=self.options.usd_per_1k_tokens,
            rng=rng, max_steps=max_steps, cancelled=cancelled)

    def update(self, state: ToolChoiceState, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[ToolChoiceState, dict[str, float]]:
        """One GRPO step: group-normalised discounted returns, clipped gradient, Adam.

        The loss is the policy-gradient surrogate -mean(advantage * sum log pi(a|s)) over the
        trajectories that did not fail; a batch with none leaves the state unchanged.
        """
        policy = state.policy
        temperature = self.options.temperature
        n_actions, buckets = len(ACTIONS), policy.buckets
        grad = [0.0] * len(policy.weights)
        learners = [t for g in groups for t in g if not t.failed]
        if not learners:
            return state, {"loss": 0.0, "grad_norm": 0.0, "success_rate": 0.0, "entropy": 0.0}
        scale = 1.0 / len(learners)
        loss = entropy = 0.0
        n_steps = 0
        for group in groups:
            # GRPO ranks discounted returns; `reward` stays the plain sum, what users read.
            scored = [t if t.failed else msgspec.structs.replace(
                t, reward=sum(r * config.gamma ** k for k, r in enumerate(t.data["rewards"])))
                for t in group]
            for trajectory, advantage in zip(group, group_advantages(scored)):
                if trajectory.failed:
                    continue
                data = trajectory.data
                features = data["features"]
                for context, action in zip(data["contexts"], data["actions"]):
                    probabilities = _probabilities(policy, context, features, temperature)
                    loss -= scale * advantage * math.log(max(probabilities[action], 1e-300))
                    entropy -= sum(p * math.log(p) for p in probabilities if p > 0.0)
                    n_steps += 1
                    if advantage == 0.0:
                        continue
                    for b, p in enumerate(probabilities):
                        # d(-A log pi(a))/d logit_b = -A (1[b=a] - p_b) / T
                        coefficient = -scale * advantage * ((b == action) - p) / temperature
                        base = (context * n_actions + b) * buckets
                        for f in features:
                            grad[base + f] += coefficient
        grad_norm = math.sqrt(sum(g * g for g in grad))
        if grad_norm > self.options.max_grad_norm:
            clip = self.options.max_grad_norm / grad_norm
            grad = [g * clip for g in grad]
        optimizer = state.optimizer
        step = optimizer.step + 1
        lr = config.learning_rate
        correction1 = 1.0 - ADAM_BETA1 ** step
        correction2 = 1.0 - ADAM_BETA2 ** step
        weights, m, v = [], [], []
        for w, g, m_i, v_i in zip(policy.weights, grad, optimizer.m, optimizer.v):
            m_i = ADAM_BETA1 * m_i + (1.0 - ADAM_BETA1) * g
            v_i = ADAM_BETA2 * v_i + (1.0 - ADAM_BETA2) * g * g
            weights.append(w - lr * (m_i / correction1) / (math.sqrt(v_i / correction2)
                                                           + ADAM_EPS))
            m.append(m_i)
            v.append(v_i)
        new_state = ToolChoiceState(
            policy=msgspec.structs.replace(policy, weights=weights),
            optimizer=AdamState(step=step, m=m, v=v))
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "success_rate": sum(t.success for t in learners) / len(learners),
                   "entropy": entropy / max(1, n_steps)}
        return new_state, metrics

    def evaluate(self, state: ToolChoiceState, queries: list[TrainingQuery]) -> float:
        """Success rate of the greedy (argmax) policy on `queries`: deterministic."""
        if not queries:
            return 0.0
        policy = state.policy
        successes = 0
        for query in queries:
            features = query_features(query.query, policy.buckets)
            context, observation, last_tool = START, None, None
            for _ in range(policy.max_steps):
                action = _greedy(_probabilities(policy, context, features, 1.0))
                if action == ANSWER:
                    successes += answer_matches(observation, query.expected_outcome, last_tool)
                    break
                last_tool = TOOLS[action]
                observation = run_tool(last_tool, query.query)
                context = RESULT if observation is not None else NO_RESULT
        return successes / len(queries)
