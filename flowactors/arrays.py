"""Trainer states holding arrays: `numpy.ndarray`s and `torch.Tensor`s, stored in safetensors.

A state without arrays is stored as its plain MessagePack, exactly as before arrays existed (so
the digests recorded by older logs still hold). A state with arrays is stored as one
safetensors file: every array a named tensor (named by its place in the state, e.g.
`policy.layers.0.weight`), bit-exact, in its own dtype (bfloat16 and the float8s included), and
the state's structure as MessagePack in one more `uint8` tensor, `__state__`, in which each
array is an extension value naming its tensor, dtype and shape. No pickle anywhere: the file opens with any
safetensors reader, and loading it restores each array to its type, dtype and shape (tensors
on the CPU).

numpy and torch are never imported here: a state can only hold an array of a library its
process has imported, so they are looked up in `sys.modules` when needed.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Iterator
from typing import Any

import msgspec

from .errors import StateNotStorable

FORMAT = "flowactors.state/1"
STATE_TENSOR = "__state__"
_NUMPY, _TORCH, _NUMPY_SCALAR = 1, 2, 3  # extension codes: what an array is restored as
_plain = msgspec.msgpack.Encoder()


def array_kind(obj: Any) -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _TORCH
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _NUMPY
        if isinstance(obj, np.generic):
            return _NUMPY_SCALAR
    return None


def children(value: Any) -> Iterator[tuple[str, Any]]:
    """The named parts of a container value (Struct fields, dict items, list elements)."""
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield name, getattr(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key), item
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield str(index), item


def _array_names(value: Any) -> dict[int, str]:
    """id(array) -> its dotted place in the state, for every array reachable by plain walking."""
    names: dict[int, str] = {}
    stack: list[tuple[str, Any]] = [("", value)]
    seen: set[int] = set()
    while stack:
        path, item = stack.pop()
        if array_kind(item) is not None:
            names.setdefault(id(item), path or "value")
        elif id(item) not in seen:
            seen.add(id(item))
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(list(
                children(item))))
    return names


def unencodable_path(value: Any) -> str | None:
    """The place (`$.policy.layers[0]`) of the first part of `value` that cannot be stored."""
    def walk(path: str, item: Any) -> str | None:
        if array_kind(item) is not None:
            return None
        parts = list(children(item))
        if not parts:
            try:
                _plain.encode(item)
            except (TypeError, ValueError, OverflowError):
                return path
            return None
        for key, child in parts:
            step = f"[{key}]" if isinstance(item, (list, tuple)) else f".{key}"
            found = walk(path + step, child)
            if found is not None:
                return found
        return None
    return walk("$", value)


def encode(value: Any) -> bytes:
    """The stored bytes of a trainer state: MessagePack, or safetensors when it holds arrays.

    Raises:
        StateNotStorable: a part of the state cannot be stored (naming where, and why).
    """
    tensors: dict[str, tuple[str, list[int], Any, int]] = {}  # name -> (dtype, shape, keep, kind)
    names: dict[int, str] | None = None

    def hook(obj: Any) -> Any:
        nonlocal names
        kind = array_kind(obj)
        if kind is None:
            raise TypeError(f"objects of type {type(obj).__qualname__} cannot be stored")
        if names is None:
            names = _array_names(value)
        name = names.get(id(obj)) or f"array.{len(tensors)}"
        if name not in tensors:
            tensors[name] = (*_contiguous(obj, kind, name), kind)
        dtype, shape = tensors[name][0], tensors[name][1]
        return msgspec.msgpack.Ext(kind, _plain.encode((name, dtype, shape)))

    try:
        structure = msgspec.msgpack.Encoder(enc_hook=hook).encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        where = unencodable_path(value) or "$"
        raise StateNotStorable(f"trainer state at `{where}`: {exc}") from None
    if not tensors:
        return structure
    return _safetensors(structure, tensors)


def _contiguous(obj: Any, kind: int, name: str) -> tuple[str, list[int], Any]:
    """(dtype name, shape, a C-contiguous CPU copy or view whose memory stays alive)."""
    if kind == _TORCH:
        if obj.layout is not sys.modules["torch"].strided:
            raise StateNotStorable(f"trainer state at `{name}`: a {obj.layout} tensor cannot "
                                   f"be stored (make it dense first)")
        tensor = obj.detach().cpu().contiguous().resolve_conj().resolve_neg()
        return str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor
    np = sys.modules["numpy"]
    array = np.asarray(obj)  # a numpy scalar becomes a 0-d array
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.hasobject or array.dtype.kind in "OUSVMm":
        raise StateNotStorable(f"trainer state at `{name}`: arrays of dtype {array.dtype} "
                               f"cannot be stored (numbers and booleans only)")
    return array.dtype.name, list(array.shape), array


def _safetensors(structure: bytes, tensors: dict[str, tuple[str, list[int], Any, int]]
                 ) -> bytes:
    from safetensors import SafetensorError, TensorSpec, serialize

    try:
        specs = {STATE_TENSOR: TensorSpec(dtype="uint8", shape=[len(structure)],
                                          data_ptr=bytes_address(structure),
                                          data_len=len(structure))}
        for name, (dtype, shape, keep, kind) in tensors.items():
            if kind == _TORCH:
                pointer, size = keep.data_ptr(), keep.numel() * keep.element_size()
            else:
                pointer, size = keep.ctypes.data, keep.nbytes
            specs[name] = TensorSpec(dtype=dtype, shape=shape, data_ptr=pointer, data_len=size)
        # One metadata key only: safetensors writes metadata in hash-map order.
        return serialize(specs, metadata={"format": FORMAT})
    except (SafetensorError, ValueError, TypeError) as exc:
        raise StateNotStorable(f"trainer state: its arrays cannot be stored in safetensors "
                               f"format: {exc}") from None


def bytes_address(data: bytes) -> int:
    """Where a bytes object's content starts in memory."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def is_array_state(data: bytes) -> bool:
    """True when stored state bytes are this module's safetensors form."""
    if len(data) < 10 or data[8:9] != b"{":
        return False
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        return False
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        return False
    return isinstance(header, dict) and header.get("__metadata__", {}).get("format") == FORMAT


class StateDecoder:
    """Decodes stored trainer states of one type, with or without arrays (thread-safe).

    `type_` is the task's `state_type`; a field may be annotated with `torch.Tensor` or
    `numpy.ndarray` (or `Any`).
    """

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._plain = msgspec.msgpack.Decoder(type_, dec_hook=_keep_arrays)

    def decode(self, data: bytes) -> Any:
        if not is_array_state(data):
            return self._plain.decode(data)
        from safetensors import deserialize

        raw = dict(deserialize(data))
        structure = raw.pop(STATE_TENSOR)["data"]

        def ext_hook(kind: int, ref: memoryview) -> Any:
            name, dtype, shape = msgspec.msgpack.decode(ref)
            return _restore(kind, dtype, shape, raw[name]["data"])

        loose = msgspec.msgpack.decode(structure, ext_hook=ext_hook)
        return msgspec.convert(loose, self.type, dec_hook=_keep_arrays)


def _keep_arrays(type_: Any, obj: Any) -> Any:
    if array_kind(obj) is not None:
        return obj
    raise msgspec.ValidationError(f"expected {type_}, got {type(obj).__qualname__}")


def _restore(kind: int, dtype: str, shape: list[int], data: bytes) -> Any:
    if kind == _TORCH:
        import torch

        torch_dtype = getattr(torch, dtype)
        if not data:
            return torch.empty(shape, dtype=torch_dtype)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw.view(torch_dtype).reshape(shape)
    import numpy as np

    array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()  # writable
    return array[()] if kind == _NUMPY_SCALAR else array
