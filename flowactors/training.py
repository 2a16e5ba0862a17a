"""Pure, seeded choices of a training run: the held-out split, each iteration's batch, each
rollout's seed. Everything derives from `GRPOConfig.seed` and the spec, never from the job id or
the clock, so two jobs with one spec and seed train identically, side by side or after a crash.
"""

from __future__ import annotations

import hashlib
import random

from .spec import JobSpec, TrainingQuery


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from parts (stable across processes, unlike `hash`)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_data(spec: JobSpec) -> tuple[list[TrainingQuery], list[TrainingQuery]]:
    """(train, held_out): `eval_fraction` of the data is held out, by a seeded shuffle.

    With too little data to hold any out, evaluation uses the training queries.
    """
    data = list(spec.training_data)
    shuffled = random.Random(derive_seed(spec.config.seed, "split")).sample(data, len(data))
    n_eval = int(len(data) * spec.config.eval_fraction)
    if n_eval == 0 or n_eval == len(data):
        return data, data
    return shuffled[n_eval:], shuffled[:n_eval]


def batch_for(spec: JobSpec, train: list[TrainingQuery], iteration: int) -> list[TrainingQuery]:
    """The iteration's `batch_size` queries (with replacement when the data is smaller)."""
    rng = _stream(spec.config.seed, iteration, _BATCH)
    size = spec.config.batch_size
    if size <= len(train):
        return rng.sample(train, size)
    return [rng.choice(train) for _ in range(size)]


_ROLLOUT, _BATCH = 0, 1


def _stream(seed: int, iteration: int, domain: int, query_index: int = 0,
            index: int = 0) -> random.Random:
    """A generator for one use, from numbers packed into one integer without overlap.

    The spec bounds query (< 2^8) and index (< 2^8); an integer seeds the Mersenne Twister
    through its full-width `init_by_array`, so distinct tuples give distinct streams, at a
    fraction of the cost of hashing.
    """
    return random.Random(((((seed << 64 | iteration) << 2 | domain) << 8 | query_index) << 8)
                         | index)


def rollout_rng(seed: int, iteration: int, query_index: int, index: int) -> random.Random:
    """A rollout's own generator, seeded from (job seed, iteration, query, index)."""
    return _stream(seed, iteration, _ROLLOUT, query_index, index)
