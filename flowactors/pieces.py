"""A state's stored bytes in pieces: its large `bytes` values referenced, never copied.

Weights held as one `bytes` of 512 MB used to be copied into the state's MessagePack before the
file was written: a copy of the whole state, under the GIL, which stalled every other thread of
the runtime (other jobs' iterations included) for seconds. `encode` returns the same bytes as
`codec.encode` as consecutive buffers — the small MessagePack around the large values, and each
large value itself — which the checkpoint store hashes and writes one after the other, with the
GIL released.

How: each large `bytes` is swapped for a MessagePack extension value holding a random token,
the much smaller value is encoded, and each token's 18 bytes are swapped back for the `bin`
header of the value they stand for. A state the swap cannot handle exactly (arrays, a Struct
that omits defaults or rejects the swap, a token found twice) is encoded whole, as before.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgspec

from . import arrays

__all__ = ["MIN_PIECE_BYTES", "Pieces", "digest", "encode"]

MIN_PIECE_BYTES = 1 << 20  # below this, copying costs less than the swap
_EXT_CODE = 99  # any code: the token never reaches the stored bytes
_TOKEN_BYTES = 16  # fixext 16: a one-byte header, the code, the token
_MAX_WALKED_ITEMS = 4096  # a longer list (of numbers, say) is not walked item by item
_encoder = msgspec.msgpack.Encoder()


class Pieces:
    """Stored bytes as consecutive buffers (`parts`); `len` is their total size."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def encode(value: Any) -> bytes | Pieces:
    """`codec.encode(value)`, as `Pieces` when the value holds `bytes` of `MIN_PIECE_BYTES` or
    more (in Structs, dict values, and tuples and lists of up to 4,096 items), else as bytes.

    Raises:
        StateNotStorable: a part of the state cannot be stored.
    """
    large: dict[bytes, bytes] = {}
    try:
        swapped = _swap(value, large)
    except _Whole:
        return arrays.encode(value)
    if not large:
        return arrays.encode(value)
    try:
        structure = _encoder.encode(swapped)
    except (TypeError, ValueError, OverflowError):
        return arrays.encode(value)  # which says what cannot be stored, and where
    found = []
    for token, data in large.items():
        mark = b"\xd8" + _EXT_CODE.to_bytes(1, "big") + token
        at = structure.find(mark)
        if at < 0 or structure.find(mark, at + 1) >= 0:
            return arrays.encode(value)
        found.append((at, len(mark), data))
    view = memoryview(structure)
    parts: list[bytes | memoryview] = []
    done = 0
    for at, width, data in sorted(found, key=lambda item: item[0]):
        parts += [view[done:at], _bin_header(len(data)), data]
        done = at + width
    parts.append(view[done:])
    return Pieces([part for part in parts if len(part)])


def digest(data: bytes | Pieces) -> str:
    """The content address (hex SHA-256) of stored bytes, whole or in pieces."""
    if not isinstance(data, Pieces):
        return hashlib.sha256(data).hexdigest()
    hasher = hashlib.sha256()
    for part in data.parts:
        hasher.update(part)  # hashlib releases the GIL for large buffers
    return hasher.hexdigest()


def _bin_header(size: int) -> bytes:
    """MessagePack's header of a `bin` value of `size` bytes (the smallest, as msgspec's)."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


class _Whole(Exception):
    """The value must be encoded whole."""


def _swap(item: Any, large: dict[bytes, bytes]) -> Any:
    """`item` with each large bytes swapped for a token extension (recorded in `large`)."""
    if type(item) is bytes:
        if len(item) < MIN_PIECE_BYTES or len(item) >= 1 << 32:
            return item
        token = os.urandom(_TOKEN_BYTES)  # never in the output: no effect on the bytes
        large[token] = item
        return msgspec.msgpack.Ext(_EXT_CODE, token)
    if arrays.array_kind(item) is not None:
        raise _Whole
    if isinstance(item, msgspec.Struct):
        config = item.__struct_config__
        if config.omit_defaults:
            raise _Whole  # a swapped default would be encoded where the original is omitted
        changed = {}
        for name in item.__struct_fields__:
            old = getattr(item, name)
            new = _swap(old, large)
            if new is not old:
                changed[name] = new
        if not changed:
            return item
        try:
            return msgspec.structs.replace(item, **changed)
        except Exception:  # a __post_init__ that checks its fields: encode it whole
            raise _Whole from None
    if type(item) in (tuple, list) and len(item) <= _MAX_WALKED_ITEMS:
        new_items = [_swap(part, large) for part in item]
        if all(new is old for new, old in zip(new_items, item)):
            return item
        return type(item)(new_items)
    if type(item) is dict:
        new_values = {key: _swap(part, large) for key, part in item.items()}
        if all(new_values[key] is part for key, part in item.items()):
            return item
        return new_values
    return item
