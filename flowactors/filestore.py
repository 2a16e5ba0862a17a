"""Checkpoint files: a `CheckpointStore` of content-addressed files on any fsspec filesystem.

A trainer state of hundreds of megabytes does not belong in the log's one writer transaction:
it would stall every job's appends and hit SQLite's blob limit. Here each state is one file
named by its address (hex SHA-256), in a directory beside the log by default or under any
fsspec URL (`memory://`, `s3://...`). `put` returns only once the file is durable — on a local
disk, written to a temporary name, fsynced, renamed, and the directory fsynced; elsewhere, the
object store's own put — so the event naming it can be appended after it. Which files are still
needed is the log's business (`flowactors.liveness`): this store keeps whatever it is given
until told to delete it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .arrays import bytes_address
from .errors import BlobNotFound, LogCorrupted
from .pieces import Pieces, digest

__all__ = ["FileCheckpoints"]

_TEMP_SUFFIX = ".partial"
_DISCARDED_SUFFIX = ".discarded"
# A large state is written 1 MiB per call (a call holds its core in the kernel for its whole
# copy) and flushed (fdatasync) every 64 MiB: the disk's queue stays short, so the commits of
# other jobs never wait behind hundreds of megabytes of dirty pages, and the last fsync has
# little left to do (measured: as fast as one write and one fsync).
_WRITE_BYTES = 1 << 20
_FLUSH_BYTES = 64 << 20
_READ_CHUNK = 4 << 20  # a read's size: hashing one overlaps reading the next
_HASH_WHILE_WRITING = 256 << 10  # from here, hashing beside the write beats hashing first


def _is_address(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class FileCheckpoints:
    """Content-addressed files under `url` (a local directory, created if missing, or any
    fsspec URL). Thread-safe: every call stands alone, and a file appears whole or not at all.

    Args:
        url: where the files go, e.g. "flow.db.checkpoints", "memory://ckpt", "s3://b/ckpt".
        create: make a missing local directory at the first write (a reader, e.g.
            `flowactors verify`, never does): a log that never stored a large state stays
            one file.
        storage_options: passed to the fsspec filesystem (credentials, endpoints).
    """

    def __init__(self, url: str | os.PathLike[str], *, create: bool = True,
                 **storage_options: Any) -> None:
        self.url = os.fspath(url)
        fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.fs = fs
        self.local = isinstance(fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.create = create

    def __repr__(self) -> str:
        return f"FileCheckpoints({self.url!r})"

    def _path(self, address: str) -> str:
        if not _is_address(address):
            raise BlobNotFound(f"{address!r} is not a checkpoint address (hex SHA-256)")
        return f"{self.root}/{address}"

    # --- the CheckpointStore port ---

    def put(self, data: bytes | memoryview | Pieces, *, background: bool = False) -> str:
        """Store bytes (whole or in pieces) durably under their address (hashed here, once);
        return it. A file already there with the same size is the same content: nothing is
        written again.

        `background`: nobody waits for this put (a checkpoint written while its job trains
        on), so it keeps to one core — hashing each slice on this thread before writing it —
        instead of hashing on a second core beside the write, which is faster but takes a
        core from training and from every other job's iterations."""
        parts = data.parts if isinstance(data, Pieces) else [memoryview(data)]
        if self.local and len(data) >= _HASH_WHILE_WRITING:
            return self._write_local_hashing(parts, len(data), background)
        address = digest(data)
        if self.size(address) != len(data):
            if self.local:
                os.replace(self._write_temp(address, parts), self._path(address))
                self._sync_dir()
            else:
                self.fs.pipe_file(self._path(address), bytes(data))
        return address

    def get(self, address: str) -> bytes:
        """The bytes at `address`, checked against it.

        Raises:
            BlobNotFound: no such file. LogCorrupted: its content does not hash to its name.
        """
        path = self._path(address)
        try:
            if self.local:
                data, actual = _read_hashing(path)
            else:
                data = self.fs.cat_file(path)
                actual = digest(data)
        except FileNotFoundError:
            raise BlobNotFound(f"no checkpoint file {address} in {self.url}") from None
        if actual != address:
            raise LogCorrupted(f"checkpoint file {address} in {self.url} does not match its "
                               f"address (its content hashes to {actual})")
        return data

    def has(self, address: str) -> bool:
        return self.size(address) is not None

    def delete(self, address: str) -> bool:
        """Remove the file (the caller decided nothing needs it); True once it is gone."""
        discarded = self.discard(address)
        if discarded is not None:
            self.remove_leftover(discarded)
        return True

    def discard(self, address: str) -> str | None:
        """Take the file out of the store at once (a rename: a put of the same bytes from now
        on writes it anew) and return the name of what is left to remove with
        `remove_leftover` — on a local disk, where removing hundreds of megabytes takes a
        tenth of a second — or None when it is already gone. A crash in between leaves a
        leftover that the next open removes."""
        try:
            if not self.local:
                self.fs.rm_file(self._path(address))
                return None
            name = f".{address}.{uuid.uuid4().hex[:8]}{_DISCARDED_SUFFIX}"
            os.replace(self._path(address), f"{self.root}/{name}")
            return name
        except FileNotFoundError:
            return None

    # --- what the runtime's checks need ---

    def size(self, address: str) -> int | None:
        """The file's size in bytes, or None when there is none."""
        path = self._path(address)
        try:
            return os.stat(path).st_size if self.local else int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def files(self) -> dict[str, int]:
        """Every stored address with its size (one listing)."""
        return {name: size for name, size in self._listing() if _is_address(name)}

    def leftovers(self) -> list[str]:
        """Temporary files of writes that never finished (a crash mid-put) and discarded
        files not yet removed."""
        return [name for name, _ in self._listing()
                if name.endswith((_TEMP_SUFFIX, _DISCARDED_SUFFIX))]

    def remove_leftover(self, name: str) -> None:
        try:
            self.fs.rm_file(f"{self.root}/{name}")
        except FileNotFoundError:
            pass

    def _listing(self) -> Iterator[tuple[str, int]]:
        if self.local:
            try:
                entries = list(os.scandir(self.root))
            except FileNotFoundError:
                return
            for entry in entries:
                try:  # a file removed since the directory was read is not listed
                    if entry.is_file(follow_symlinks=False):
                        yield entry.name, entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
            return
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return
        for info in found:
            if info.get("type") == "file":
                yield info["name"].rstrip("/").rsplit("/", 1)[-1], int(info.get("size") or 0)

    # --- local files: durable before put returns ---

    def _write_local_hashing(self, parts: list[bytes | memoryview], size: int,
                             one_core: bool) -> str:
        """Write a state while it is hashed — slice by slice on this thread (`one_core`), or
        by another thread beside the write (hashlib releases the GIL): either way one hash
        pass, not a pass before the write."""
        name = f"state.{uuid.uuid4().hex}"
        if one_core:
            hasher = hashlib.sha256()
            temp = self._write_temp(name, parts, hasher)
            address = hasher.hexdigest()
        else:
            found: list[str] = []
            thread = threading.Thread(target=lambda: found.append(digest(Pieces(parts))),
                                      name="flowactors-hash", daemon=True)
            thread.start()
            try:
                temp = self._write_temp(name, parts)
            finally:
                thread.join()
            address = found[0]
        if self.size(address) == size:  # stored already: the same bytes
            os.unlink(temp)
        else:
            os.replace(temp, self._path(address))
            self._sync_dir()
        return address

    def _write_temp(self, name: str, parts: list[bytes | memoryview],
                    hasher: Any = None) -> str:
        """Write and fsync the bytes of `parts`, one after the other, to a temporary file
        (feeding each slice to `hasher` first, if given); return its path."""
        temp = f"{self.root}/.{name}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}"
        if self.create:
            os.makedirs(self.root, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            unflushed = 0
            for piece in _slices(parts):
                if hasher is not None:
                    hasher.update(piece)
                written = 0
                while written < len(piece):
                    written += os.write(fd, piece[written:])
                unflushed += written
                if unflushed >= _FLUSH_BYTES:
                    os.fdatasync(fd)
                    unflushed = 0
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_location(log_path: str | os.PathLike[str]) -> str:
    """The checkpoint directory of a log: beside it, named after it."""
    path = Path(log_path)
    return str(path.with_name(path.name + ".checkpoints"))


def _slices(parts: list[bytes | memoryview]) -> Iterator[memoryview]:
    """The bytes of `parts`, in order, as views of at most `_WRITE_BYTES` (no copy)."""
    for part in parts:
        with memoryview(part).cast("B") as view:
            for start in range(0, len(view), _WRITE_BYTES):
                yield view[start:start + _WRITE_BYTES]


def _read_hashing(path: str) -> tuple[bytes, str]:
    """A file's bytes and their address, hashed by another thread while the reads go on (both
    release the GIL): a checked load takes about as long as a plain read, not twice as long."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if hasattr(os, "posix_fadvise"):  # read ahead of the chunks, while they are hashed
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if size < 2 * _READ_CHUNK:
            data = f.read()
            return data, digest(data)
        data = _new_bytes(None, size)  # filled below, before anything else can see it
        view = memoryview((ctypes.c_char * size).from_address(bytes_address(data))).cast("B")
        hasher = hashlib.sha256()
        chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()

        def hash_chunks() -> None:
            while (chunk := chunks.get()) is not None:
                hasher.update(chunk)

        thread = threading.Thread(target=hash_chunks, name="flowactors-hash", daemon=True)
        thread.start()
        done = 0
        try:
            while done < size:
                read = f.readinto(view[done:done + _READ_CHUNK])
                if not read:
                    break
                chunks.put(view[done:done + read])
                done += read
        finally:
            chunks.put(None)
            thread.join()
        if done < size:  # the file shrank meanwhile: these bytes cannot be its content
            return data[:done], digest(data[:done])
        return data, hasher.hexdigest()


# A bytes object of a given size whose content the caller writes before sharing it (what
# CPython's own file reads do): the checked read fills it in place, with no second copy.
_new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi))
