"""Pure, seeded choices of a training run: the held-out split, each iteration's batch, each
rollout's seed. Everything derives from `GRPOConfig.seed` and the spec, never from the job id or
the clock, so two jobs with one spec and seed train identically, side by side or after a crash.
"""

from __future__ import annotations

import hashlib
import random

from .spec import JobSpec, TrainingQuery, held_out_count


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from parts (stable across processes, unlike `hash`)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_data(spec: JobSpec) -> tuple[list[TrainingQuery], list[TrainingQuery]]:
    """(train, scored): the queries the job trains on and those its validation scores use.

    `validation_data` when the spec has it (then all of `training_data` trains); otherwise
    `eval_fraction` of the data is held out, by a seeded shuffle. With nothing held out
    (`eval_fraction=0`, or a job recorded before `validate_spec` refused a split with an
    empty side) the scores use the training queries, as `spec.validation_set` says.
    """
    data = list(spec.training_data)
    if spec.validation_data is not None:
        return data, list(spec.validation_data)
    shuffled = random.Random(derive_seed(spec.config.seed, "split")).sample(data, len(data))
    n_eval = held_out_count(len(data), spec.config.eval_fraction)
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
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_UNIT = 2.0 ** -53  # 53 random bits make a float in [0, 1)


def _stream(seed: int, iteration: int, domain: int, query_index: int = 0,
            index: int = 0) -> random.Random:
    """A generator for one use, its state mixed from the numbers that name its use (the spec
    bounds them: seed < 2^63, iteration < 2^24, query < 2^8, index < 2^8)."""
    use = iteration << 18 | domain << 16 | query_index << 8 | index
    return SplitMix64(_mix64(_mix64((seed + _GOLDEN_GAMMA) & _MASK64) ^ use))


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers in which every input bit moves
    every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SplitMix64(random.Random):
    """`random.Random`'s methods drawing from SplitMix64 (Steele, Lea and Flood, 2014; Java's
    SplittableRandom), a 64-bit generator that passes BigCrush.

    Why not the Mersenne Twister: seeding it fills 624 words (about 4 µs), and a run seeds a
    generator for every rollout and every batch; this one is seeded by a few multiplications.
    """

    def __init__(self, seed: int = 0) -> None:  # not Random.__init__: no Mersenne Twister
        self.seed(seed)

    def seed(self, a: object = None, version: int = 2) -> None:
        if type(a) is not int:
            raise TypeError(f"SplitMix64 is seeded with an int, not {a!r}")
        self._state = a & _MASK64
        self.gauss_next = None

    def _next64(self) -> int:
        self._state = state = (self._state + _GOLDEN_GAMMA) & _MASK64
        return _mix64(state)

    def random(self) -> float:
        return (self._next64() >> 11) * _UNIT

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        bits = 0
        for _ in range(-(-k // 64)):
            bits = bits << 64 | self._next64()
        return bits >> (-k % 64)

    def getstate(self) -> tuple[int, float | None]:
        return self._state, self.gauss_next

    def setstate(self, state: tuple[int, float | None]) -> None:
        self._state, self.gauss_next = state


def rollout_rng(seed: int, iteration: int, query_index: int, index: int) -> random.Random:
    """A rollout's own generator, seeded from (job seed, iteration, query, index)."""
    return _stream(seed, iteration, _ROLLOUT, query_index, index)
