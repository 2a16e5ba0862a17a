"""flowactors.training: the seeded choices of a run, and the generator they draw from."""

from __future__ import annotations

import copy
import statistics

import pytest

from flowactors.spec import GRPOConfig, JobSpec, TrainingQuery
from flowactors.training import SplitMix64, batch_for, rollout_rng

pytestmark = pytest.mark.timeout(60)


def _spec(seed: int = 7, batch_size: int = 3) -> JobSpec:
    return JobSpec(agent_id="a", task="simulated",
                   training_data=[TrainingQuery(query=f"q{i}") for i in range(10)],
                   config=GRPOConfig(seed=seed, batch_size=batch_size))


def test_a_rollout_generator_depends_on_every_part_of_its_name_and_nothing_else():
    draws = {args: rollout_rng(*args).random()
             for args in [(7, 1, 0, 0), (8, 1, 0, 0), (7, 2, 0, 0), (7, 1, 1, 0), (7, 1, 0, 1),
                          (0, 0, 0, 0), (2**63 - 1, 1_000_000, 255, 15)]}
    assert len(set(draws.values())) == len(draws)
    assert all(rollout_rng(*args).random() == value for args, value in draws.items())


def test_batches_are_reproducible_distinct_queries_that_vary_by_iteration():
    spec = _spec()
    train = list(spec.training_data)
    batches = [batch_for(spec, train, iteration) for iteration in range(1, 201)]
    assert batches == [batch_for(spec, train, iteration) for iteration in range(1, 201)]
    names = [[q.query for q in b] for b in batches]
    assert all(len(set(b)) == len(b) == 3 for b in names)
    assert len({tuple(b) for b in names}) > 100
    counts = [sum(q.query in b for b in names) for q in train]  # each query about 60 times
    assert min(counts) > 30 and max(counts) < 90


def test_splitmix_draws_are_uniform_and_serve_random_randoms_methods():
    rng = SplitMix64(12345)
    floats = [rng.random() for _ in range(20_000)]
    assert all(0.0 <= x < 1.0 for x in floats)
    assert abs(statistics.fmean(floats) - 0.5) < 0.01
    assert abs(statistics.pvariance(floats) - 1 / 12) < 0.005
    buckets = [0] * 8
    for _ in range(8_000):
        buckets[rng.randrange(8)] += 1
    assert min(buckets) > 850 and max(buckets) < 1150
    assert rng.getrandbits(0) == 0 and rng.getrandbits(200) < 2**200
    assert abs(statistics.fmean(rng.gauss(0.0, 1.0) for _ in range(5_000))) < 0.1
    assert sorted(rng.sample(range(10), 10)) == list(range(10))
    state = rng.getstate()
    ahead = [rng.random() for _ in range(3)]
    rng.setstate(state)
    assert [rng.random() for _ in range(3)] == ahead
    with pytest.raises(TypeError):
        SplitMix64("seed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rng.getrandbits(-1)


def test_a_task_can_copy_its_generator():
    """Regression: `Random.__reduce__` rebuilds a generator with no arguments, which a
    SplitMix64 that required its seed refused (copy.copy, copy.deepcopy)."""
    rng = SplitMix64(99)
    rng.random()
    for copier in (copy.copy, copy.deepcopy):
        twin = copier(rng)
        state = rng.getstate()
        assert type(twin) is SplitMix64
        assert [twin.random() for _ in range(3)] == [rng.random() for _ in range(3)]
        rng.setstate(state)
