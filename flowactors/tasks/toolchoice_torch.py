"""`toolchoice-torch`: the `toolchoice` environment learned by a PyTorch policy with GRPO and Adam.

Same queries, tools and rewards as `toolchoice` (see that module); the policy is a small
`torch.nn.Module` (hashed bag-of-words features and the step's context → a tanh hidden layer →
logits over the actions), trained by `torch.optim.Adam` on the GRPO surrogate loss. It is the
example of a task with *live* trainer objects: `init` builds the model, the optimizer and a
`torch.Generator`, `update` steps them in place, and the runtime asks for a `snapshot` only when
a checkpoint or the final state is due (`restore` rebuilds them on resume). The snapshot is
`model.state_dict()`, `optimizer.state_dict()` and the generator's state: tensors, stored
bit-exactly in safetensors format.

Determinism on CPU: parameters are drawn from a generator seeded by the job's seed (never the
process-wide RNG), each update shuffles its steps into minibatches with the trainer's own
generator (its state is part of every checkpoint), rollouts sample from the `rng` they are
given, and the task runs torch on `threads` threads (a fixed count: a sum split over another
number of threads rounds differently). Importing this module imports torch (seconds):
`flowactors` itself never does.
"""

from __future__ import annotations

import copy
import math
import random
import threading
from typing import Annotated, Any, ClassVar

import msgspec
import torch

from ..spec import GRPOConfig, JobSpec, TrainingQuery
from ..training import derive_seed
from .base import Trajectory, group_advantages
from .toolchoice_env import (
    ACTIONS,
    ANSWER,
    CONTEXTS,
    NO_RESULT,
    RESULT,
    REWARD_SCALE,
    START,
    TOOLS,
    answer_matches,
    play_episode,
    query_features,
    run_tool,
)

__all__ = ["PolicyNet", "TorchToolChoiceOptions", "TorchToolChoiceState", "TorchToolChoiceTask",
           "TorchTrainer"]


class TorchToolChoiceOptions(msgspec.Struct, frozen=True, kw_only=True,
                             forbid_unknown_fields=True):
    """Options of the `toolchoice-torch` task (`JobSpec.task_options`)."""

    hidden: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    """Width of the policy's hidden layer."""
    feature_buckets: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 128
    """Size of the hashed bag-of-words feature space."""
    minibatches: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    """Adam steps per iteration, each on a random share of the iteration's steps."""
    temperature: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 1.0
    """Sampling temperature of rollouts (evaluation is always greedy)."""
    max_grad_norm: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0
    """Gradient norm above which a step's gradient is scaled down."""
    tokens_per_step: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 50
    usd_per_1k_tokens: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 0.0001
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    """torch's intra-op threads (process-wide, set when the task is built)."""


class TorchToolChoiceState(msgspec.Struct, frozen=True, kw_only=True):
    """The stored trainer: what `snapshot` returns and `restore` takes."""

    policy: dict[str, Any]
    """`model.state_dict()`: parameter name -> tensor."""
    optimizer: dict[str, Any]
    """`optimizer.state_dict()`: Adam's moments and step counts, and its hyperparameters."""
    rng: Any
    """The trainer's `torch.Generator` state (a uint8 tensor)."""
    max_steps: int


class PolicyNet(torch.nn.Module):
    """logits(action | query, context) = tanh(Σ embed[f] + context[c]) · out + bias."""

    def __init__(self, buckets: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()

        def draw(*shape: int, scale: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=generator) * scale)

        self.embed = draw(buckets, hidden, scale=1.0 / math.sqrt(8.0))
        self.context = draw(CONTEXTS, hidden, scale=0.5)
        self.out = draw(hidden, len(ACTIONS), scale=1.0 / math.sqrt(hidden))
        self.bias = torch.nn.Parameter(torch.zeros(len(ACTIONS)))

    def forward(self, features: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """features: [n, buckets] multi-hot; contexts: [n] long → logits [n, actions]."""
        hidden = torch.tanh(features @ self.embed + self.context[contexts])
        return hidden @ self.out + self.bias


class TorchTrainer:
    """The live trainer: model, optimizer and generator, updated in place between checkpoints."""

    def __init__(self, model: PolicyNet, optimizer: torch.optim.Adam,
                 generator: torch.Generator, max_steps: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.generator = generator
        self.max_steps = max_steps


_ALL_CONTEXTS = torch.arange(CONTEXTS)


class TorchToolChoiceTask:
    """Choose the tool that answers a query: a PyTorch policy trained by GRPO with Adam."""

    Options: ClassVar[type[msgspec.Struct]] = TorchToolChoiceOptions
    state_type: ClassVar[type] = TorchToolChoiceState
    inline_rollouts: ClassVar[bool] = True  # one small forward pass per rollout
    reward_scale: ClassVar[str] = REWARD_SCALE  # the same environment, the same rewards

    def __init__(self, options: TorchToolChoiceOptions) -> None:
        self.options = options
        torch.set_num_threads(options.threads)

    # --- the live trainer and its snapshots ---

    def _build(self, learning_rate: float, max_steps: int, seed: int) -> TorchTrainer:
        generator = torch.Generator().manual_seed(seed)
        model = PolicyNet(self.options.feature_buckets, self.options.hidden, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, foreach=False)
        return TorchTrainer(model, optimizer, generator, max_steps)

    def init(self, spec: JobSpec) -> TorchTrainer:
        """A freshly drawn policy (from the job's seed), fresh Adam moments."""
        config = spec.config
        return self._build(config.learning_rate, config.max_steps_per_trajectory,
                           derive_seed(config.seed, "toolchoice-torch") >> 1)

    def snapshot(self, trainer: TorchTrainer) -> TorchToolChoiceState:
        """Copies (the trainer goes on training while the copy is stored)."""
        return TorchToolChoiceState(
            policy={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            optimizer=copy.deepcopy(trainer.optimizer.state_dict()),
            rng=trainer.generator.get_state(), max_steps=trainer.max_steps)

    def restore(self, state: TorchToolChoiceState) -> TorchTrainer:
        """The live trainer of a snapshot, exactly: parameters, Adam state, generator."""
        lr = state.optimizer["param_groups"][0]["lr"]
        trainer = self._build(lr, state.max_steps, 0)
        trainer.model.load_state_dict(state.policy)
        trainer.optimizer.load_state_dict(state.optimizer)
        trainer.generator.set_state(state.rng)
        return trainer

    # --- rollouts, updates, evaluation ---

    def _features(self, features: list[list[int]]) -> torch.Tensor:
        rows = torch.zeros(len(features), self.options.feature_buckets)
        for row, active in enumerate(features):
            rows[row, active] = 1.0
        return rows

    def _action_probabilities(self, trainer: TorchTrainer, features: list[int],
                              temperature: float) -> list[list[float]]:
        """Action probabilities in each context, one forward pass for all of them."""
        with torch.no_grad():
            x = self._features([features]).expand(CONTEXTS, -1)
            logits = trainer.model(x, _ALL_CONTEXTS) / temperature
            return torch.softmax(logits, dim=-1).tolist()  # type: ignore[no-any-return]

    def rollout(self, trainer: TorchTrainer, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        """Sample actions until `answer` or `max_steps`, rewards as in `toolchoice`."""
        features = query_features(query.query, self.options.feature_buckets)
        probabilities = self._action_probabilities(trainer, features, self.options.temperature)
        return play_episode(
            query, features, probabilities.__getitem__,
            tokens_per_step=self.options.tokens_per_step,
            usd_per_1k_tokens=self.options.usd_per_1k_tokens,
            rng=rng, max_steps=max_steps, cancelled=cancelled)

    def update(self, trainer: TorchTrainer, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[TorchTrainer, dict[str, float]]:
        """GRPO: group-normalised discounted returns weight each step's log-probability; the
        steps are shuffled (the trainer's generator) into `minibatches` Adam steps."""
        features: list[list[int]] = []
        contexts: list[int] = []
        actions: list[int] = []
        weights: list[float] = []
        learners = [t for g in groups for t in g if not t.failed]
        for group in groups:
            scored = [t if t.failed else msgspec.structs.replace(
                t, reward=sum(r * config.gamma ** k for k, r in enumerate(t.data["rewards"])))
                for t in group]
            for trajectory, advantage in zip(group, group_advantages(scored)):
                if trajectory.failed:
                    continue
                data = trajectory.data
                for context, action in zip(data["contexts"], data["actions"]):
                    features.append(data["features"])
                    contexts.append(context)
                    actions.append(action)
                    weights.append(advantage / len(learners))
        if not actions:
            return trainer, {"loss": 0.0, "success_rate": 0.0, "entropy": 0.0}
        x, c = self._features(features), torch.tensor(contexts)
        a, w = torch.tensor(actions), torch.tensor(weights)
        order = torch.randperm(len(actions), generator=trainer.generator)
        loss_total = entropy_total = 0.0
        for share in torch.chunk(order, self.options.minibatches):
            logp = torch.log_softmax(trainer.model(x[share], c[share]) / self.options.temperature,
                                     dim=-1)
            loss = -(w[share] * logp.gather(1, a[share, None]).squeeze(1)).sum()
            trainer.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), self.options.max_grad_norm,
                                           foreach=False)
            trainer.optimizer.step()
            loss_total += float(loss.detach())
            entropy_total -= float((logp.exp() * logp).sum().detach())
        return trainer, {"loss": loss_total,
                         "success_rate": sum(t.success for t in learners) / len(learners),
                         "entropy": entropy_total / len(actions)}

    def evaluate(self, trainer: TorchTrainer, queries: list[TrainingQuery]) -> float:
        """Success rate of the greedy policy on `queries`: deterministic, draws nothing."""
        if not queries:
            return 0.0
        successes = 0
        for query in queries:
            probabilities = self._action_probabilities(
                trainer, query_features(query.query, self.options.feature_buckets), 1.0)
            context, observation, last_tool = START, None, None
            for _ in range(trainer.max_steps):
                row = probabilities[context]
                action = max(range(len(row)), key=lambda i: (row[i], -i))
                if action == ANSWER:
                    successes += answer_matches(observation, query.expected_outcome, last_tool)
                    break
                last_tool = TOOLS[action]
                observation = run_tool(last_tool, query.query)
                context = RESULT if observation is not None else NO_RESULT
        return successes / len(queries)
