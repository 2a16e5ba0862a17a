"""A state's large bytes go to the checkpoint file as they are: `pieces.encode` gives exactly
`codec.encode`'s bytes without copying them, and the file store hashes and writes the pieces."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowactors import codec, pieces
from flowactors import errors as fa_errors
from flowactors.errors import LogCorrupted
from flowactors.filestore import FileCheckpoints

pytestmark = pytest.mark.timeout(120)


class Weights(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    policy: bytes
    optimizer: tuple[bytes, ...] = ()
    note: str = ""


class Defaults(msgspec.Struct, frozen=True, omit_defaults=True):
    blob: bytes = b"\x00" * 64


class Checked(msgspec.Struct, frozen=True):
    blob: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.blob, bytes):
            raise TypeError("blob must be bytes")


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces from 32 bytes up, so that every MessagePack `bin` header size is covered."""
    monkeypatch.setattr(pieces, "MIN_PIECE_BYTES", 32)


leaves = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.binary(max_size=300),
                   st.binary(min_size=65_536, max_size=65_600), st.none(), st.floats())
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
        st.builds(Weights, step=st.integers(0, 9), policy=st.binary(max_size=300),
                  optimizer=st.lists(st.binary(max_size=70), max_size=3).map(tuple),
                  note=st.text(max_size=3))),
    max_leaves=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the same patch for all
@given(value=values)
def test_the_pieces_join_into_exactly_the_encoding(small_pieces, value):
    encoded = pieces.encode(value)
    assert bytes(encoded) == codec.encode(value)
    assert len(encoded) == len(codec.encode(value))
    assert pieces.digest(encoded) == codec.digest(codec.encode(value))


def test_a_large_bytes_value_is_a_piece_of_its_own_not_a_copy():
    policy = bytes(range(256)) * 8192  # 2 MiB
    moment = b"\x01" * (3 << 20)
    state = Weights(step=3, policy=policy, optimizer=(moment, b"small"), note="x")
    encoded = pieces.encode(state)
    assert isinstance(encoded, pieces.Pieces)
    assert any(part is policy for part in encoded.parts)
    assert any(part is moment for part in encoded.parts)
    assert sum(len(part) for part in encoded.parts) < len(policy) + len(moment) + 200
    assert bytes(encoded) == codec.encode(state)
    assert codec.digest_of(state) == codec.digest(codec.encode(state))


@pytest.mark.parametrize("value", [
    Defaults(), Defaults(blob=b"\x01" * 64), Checked(blob=b"\x02" * 64), {"small": b"abc"},
    [b"\x05" * 64] + [0.5] * 5000,  # too long a list to walk item by item
])
def test_values_the_swap_cannot_handle_are_encoded_whole(small_pieces, value):
    encoded = pieces.encode(value)
    assert isinstance(encoded, bytes)
    assert encoded == codec.encode(value)


def test_a_token_that_also_occurs_in_the_state_falls_back_to_the_whole_encoding(
        small_pieces, monkeypatch):
    token = b"T" * 16
    monkeypatch.setattr(pieces.os, "urandom", lambda n: token)
    lookalike = b"\xd8" + bytes([99]) + token  # what the token's extension encodes to
    value = [lookalike, b"\x03" * 100]
    encoded = pieces.encode(value)
    assert isinstance(encoded, bytes) and encoded == codec.encode(value)


def test_the_file_store_writes_pieces_and_reads_them_back_checked(tmp_path):
    store = FileCheckpoints(tmp_path / "files")
    big = bytes(range(256)) * (80 << 12)  # 80 MiB: read back in chunks, hashed beside
    encoded = pieces.encode(Weights(step=1, policy=big))
    address = store.put(encoded)
    whole = bytes(encoded)
    assert address == hashlib.sha256(whole).hexdigest()
    assert store.size(address) == len(whole)
    assert store.get(address) == whole
    assert store.put(encoded) == address  # stored already: not written again
    path = tmp_path / "files" / address
    with open(path, "r+b") as f:  # one byte changed deep in the file
        f.seek(len(whole) - 12_345_678)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(LogCorrupted, match="does not match its address"):
        store.get(address)


def test_a_state_that_cannot_be_stored_still_says_where(small_pieces):
    with pytest.raises(fa_errors.StateNotStorable, match=r"\$\.optimizer\[1\]"):
        pieces.encode(Weights(step=1, policy=b"\x04" * 64, optimizer=(b"ok", object())))
