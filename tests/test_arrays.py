"""Arrays in trainer states: numpy and torch, every dtype, bit-exact, in safetensors format."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from helpers import open_runtime, sim_spec

import flowactors as fa
from flowactors import arrays, codec
from flowactors.events import IterationCompleted, JobFailed
from flowactors.replay import check

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

TORCH_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "float8_e4m3fn",
                "float8_e5m2"]
NUMPY_DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
                "uint16", "uint32", "uint64", "bool", "complex64"]


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    policy: Any
    optimizer: Any = None
    rng: Any = None


def _bits(t: Any) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if isinstance(t, torch.Tensor) \
        else np.ascontiguousarray(t).tobytes()


def test_every_torch_and_numpy_dtype_round_trips_bit_exactly_to_its_type_dtype_and_shape():
    """Tensors and arrays anywhere in Structs, dicts and lists come back with their type,
    dtype, shape and bits (NaNs, -0.0 and bfloat16 included)."""
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.randn(11, generator=g), torch.tensor([float("nan"), -0.0])])
    tensors = {name: base.to(getattr(torch, name)).reshape(13, 1) for name in TORCH_DTYPES}
    ndarrays = [np.arange(6).astype(name).reshape(2, 3) for name in NUMPY_DTYPES]
    state = Holder(policy={"layers": [tensors, torch.zeros(0, 4)]},
                   optimizer={"moments": ndarrays, "scale": np.float32(0.5), "step": 3},
                   rng=g.get_state())
    blob = codec.encode(state)
    assert blob == codec.encode(state), "encoding is deterministic"
    assert arrays.is_array_state(blob)
    back = arrays.StateDecoder(Holder).decode(blob)
    for name, t in tensors.items():
        got = back.policy["layers"][0][name]
        assert type(got) is torch.Tensor and got.dtype == t.dtype and got.shape == t.shape
        assert _bits(got) == _bits(t), name
    assert back.policy["layers"][1].shape == (0, 4)
    for want, got in zip(ndarrays, back.optimizer["moments"]):
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert type(back.optimizer["scale"]) is np.float32 and back.optimizer["step"] == 3
    assert torch.equal(back.rng, state.rng)


def test_the_stored_form_is_a_safetensors_file_with_tensors_named_by_their_place():
    """Any safetensors reader opens a stored state; tensor names are paths in the state."""
    from safetensors.torch import load

    state = Holder(policy={"w": torch.ones(2, 2, dtype=torch.bfloat16)}, rng=torch.arange(3))
    loaded = load(codec.encode(state))
    assert set(loaded) == {"policy.w", "rng", arrays.STATE_TENSOR}
    assert loaded["policy.w"].dtype == torch.bfloat16


def test_a_state_without_arrays_keeps_its_plain_messagepack_bytes():
    """Old logs' digests stay true: a state with no arrays encodes as before."""
    state = Holder(policy=[0.5, 1.0], optimizer={"step": 2})
    assert codec.encode(state) == msgspec.msgpack.encode(state)


def test_a_change_of_one_bit_of_a_tensor_changes_the_state_digest():
    """Arrays are covered by the digest, bit for bit."""
    t = torch.zeros(4, dtype=torch.bfloat16)
    u = t.clone()
    u.view(torch.int16)[2] = 1  # the smallest subnormal: one bit
    assert codec.digest_of(Holder(policy=t)) != codec.digest_of(Holder(policy=u))


def test_an_unstorable_value_is_named_by_its_place():
    """The error names the path of the first value that cannot be stored."""
    with pytest.raises(fa.StateNotStorable, match=r"\$\.optimizer\.slots\[1\]"):
        codec.encode(Holder(policy=torch.ones(1), optimizer={"slots": [1, object()]}))
    with pytest.raises(fa.StateNotStorable, match="complex128"):
        codec.encode(Holder(policy=torch.ones(1, dtype=torch.complex128)))


class UnstorableTask:
    """`simulated`'s shape, but its initial state holds a lock."""

    Options = fa.tasks.NoOptions
    state_type = Holder

    def __init__(self, options: Any) -> None:
        pass

    def init(self, spec: Any) -> Holder:
        import threading
        return Holder(policy=[0.0], optimizer={"lock": threading.Lock()})

    def rollout(self, state, query, *, rng, max_steps, cancelled):
        return fa.Trajectory(reward=1.0)

    def update(self, state, groups, config):
        return state, {}

    def evaluate(self, state, queries):
        return 0.0


def test_an_unstorable_initial_state_fails_the_job_when_it_starts(tmp_path):
    """Not after iterations were computed: the job fails before its first iteration, naming
    the place of the bad value."""
    spec = msgspec.structs.replace(sim_spec(n_iterations=4, checkpoint_interval=2),
                                   task="test_arrays:UnstorableTask")
    with open_runtime(tmp_path / "flow.db") as rt:
        job_id = rt.submit(spec)
        view = rt.wait(job_id, timeout=30)
        events = [r.event for r in rt.history(job_id)]
    assert view.status is fa.JobStatus.FAILED
    assert not any(isinstance(e, IterationCompleted) for e in events)
    failed = [e for e in events if isinstance(e, JobFailed)][0]
    assert failed.error_type == "StateNotStorable" and "$.optimizer.lock" in failed.message


class ArrayTask(UnstorableTask):
    """A state-in, state-out task whose state is a numpy array and a bfloat16 tensor."""

    def init(self, spec: Any) -> Holder:
        return Holder(policy=torch.zeros(3, dtype=torch.bfloat16), optimizer=np.zeros(2))

    def update(self, state, groups, config):
        return Holder(policy=state.policy + 0.125, optimizer=state.optimizer + 1.0), {}

    def evaluate(self, state, queries):
        return float(state.optimizer[0])


def test_a_job_with_array_states_checkpoints_loads_and_replays_with_its_digests(tmp_path):
    """Checkpoints hold the arrays; load_checkpoint restores them; `replay --check` holds."""
    spec = msgspec.structs.replace(sim_spec(n_iterations=5, checkpoint_interval=2),
                                   task="test_arrays:ArrayTask")
    with open_runtime(tmp_path / "flow.db") as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=30).status is fa.JobStatus.COMPLETED
        saved = rt.load_checkpoint(job_id, 4)
        history = list(rt.history(job_id))
    assert saved.policy.dtype == torch.bfloat16 and saved.policy.tolist() == [0.5] * 3
    assert saved.optimizer.tolist() == [4.0, 4.0]
    assert check(history).ok
