"""Where bytes live: fsspec URL → ``Location``; atomic staged writes; random-access read sources.

This is the only module that opens a final checkpoint path for writing. A write is *staged* and
*committed*, so a checkpoint appears whole or not at all; how depends on the filesystem:

- local disk: a hidden temp file in the destination directory (never ``$TMPDIR``: renames across
  devices fail), fsync, ``os.replace`` over the target, fsync of the directory;
- object stores that defer the commit of an upload (s3fs, gcsfs): ``open(..., autocommit=False)``,
  then ``commit()`` (completes the multipart upload) or ``discard()`` (aborts it);
- any other fsspec filesystem (``memory://``, ...): a hidden temp key beside the target, then a
  move onto the target.

Reads go through a ``Source`` (``read_at`` / ``readinto_at``), so formats can fetch exactly the
byte ranges they need and read straight into tensor memory.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lightweight_ckpt.types import StorageOptions, StrPath

_DEFERRED_COMMIT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


@dataclass(frozen=True)
class Location:
    """A resolved checkpoint path: the filesystem, its native path, and the URL the user gave."""

    fs: Any  # fsspec.AbstractFileSystem (untyped upstream)
    path: str
    url: str

    @property
    def is_local(self) -> bool:
        """True for the local disk, where rename and mmap are available."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def protocol(self) -> str:
        """The filesystem's primary protocol name (``file``, ``memory``, ``s3``, ...)."""
        protocol = self.fs.protocol
        return str(protocol if isinstance(protocol, str) else protocol[0])


def resolve(path: StrPath, storage_options: StorageOptions | None = None) -> Location:
    """Resolve a local path or fsspec URL to a ``Location``.

    Raises:
        ModuleNotFoundError: the URL's filesystem needs an extra that is not installed.
    """
    url = os.fspath(path)
    try:
        fs, fs_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        extra = _EXTRA_FOR_PROTOCOL.get(protocol)
        hint = f"pip install 'lightweight-ckpt[{extra}]'" if extra else str(err)
        raise ModuleNotFoundError(f"{url}: {protocol}:// paths need an extra: {hint}") from err
    return Location(fs=fs, path=fs_path, url=url)


def _sibling_temp(location: Location) -> str:
    parent, name = posixpath.split(location.path)
    return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_write(location: Location) -> Iterator[Sink]:
    """Yield a binary sink for ``location``; commit atomically on clean exit, discard on error.

    Raises:
        CheckpointWriteError: the target is a directory, or writing/committing failed. The previous
            checkpoint at the path is intact and no temp file is left behind.
    """
    if location.fs.isdir(location.path):
        raise CheckpointWriteError(
            f"{location.url}: is a directory; a single-file checkpoint cannot replace it. "
            "Choose another path or remove the directory."
        )
    if location.is_local:
        writer = _staged_local(location)
    elif location.protocol in _DEFERRED_COMMIT_PROTOCOLS:
        writer = _staged_deferred(location)
    else:
        writer = _staged_move(location)
    try:
        with writer as sink:
            yield sink
    except CheckpointWriteError:
        raise
    except OSError as err:
        raise CheckpointWriteError(f"{location.url}: write failed: {err}") from err


@contextlib.contextmanager
def _staged_local(location: Location) -> Iterator[Sink]:
    parent = posixpath.dirname(location.path)
    os.makedirs(parent or ".", exist_ok=True)
    temp = _sibling_temp(location)
    try:
        with open(temp, "xb", buffering=1024 * 1024) as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, location.path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(parent)


@contextlib.contextmanager
def _staged_deferred(location: Location) -> Iterator[Sink]:
    remote = location.fs.open(location.path, "wb", autocommit=False)
    try:
        yield _ChunkedWriter(remote)
        remote.close()
    except BaseException:
        with contextlib.suppress(Exception):
            remote.discard()  # aborts the multipart upload
        remote.closed = True  # or its __del__ would flush a new, orphan upload
        raise
    else:
        remote.commit()
    finally:
        _forget(location.fs, remote)


def _forget(fs: Any, remote: Any) -> None:
    """Fsspec files opened with ``autocommit=False`` join the fs's transaction list forever."""
    files = getattr(getattr(fs, "_transaction", None), "files", None)
    if files is not None and remote in files:
        files.remove(remote)


@contextlib.contextmanager
def _staged_move(location: Location) -> Iterator[Sink]:
    fs = location.fs
    parent = posixpath.dirname(location.path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temp = _sibling_temp(location)
    try:
        with fs.open(temp, "wb") as remote:
            yield _ChunkedWriter(remote)
        fs.mv(temp, location.path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(temp)
        raise


class _ChunkedWriter:
    """Hand a buffered remote file at most ``chunk_bytes`` (a tunable) per write.

    fsspec's buffered files append a whole ``write`` to their buffer before uploading parts, so
    one 2 GB tensor would otherwise sit twice in memory.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        step = settings().chunk_bytes
        for start in range(0, len(view), step):
            self._file.write(view[start : start + step])
        return len(view)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return int(self._file.tell())


class Sink(Protocol):
    """Where a format writes a checkpoint's bytes: a binary file, local or remote."""

    def write(self, data: Any) -> int:
        """Write bytes-like ``data``; return the byte count."""

    def flush(self) -> None:
        """Push buffered bytes down."""

    def tell(self) -> int:
        """Return the number of bytes written so far."""


class Source(Protocol):
    """Random-access reads of one committed file."""

    url: str
    size: int

    def read_at(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes at ``offset`` (fewer only at the end of the file)."""

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``; raise ``CorruptCheckpointError`` if the file ends."""

    def map(self) -> mmap.mmap | None:
        """Return a private copy-on-write memory map of the whole file, or None if not local."""

    def close(self) -> None:
        """Release the file."""


def _preadv(fd: int, buffer: memoryview, offset: int) -> int:
    """Read into ``buffer`` without a Python-side copy where the OS has ``preadv``."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)  # pragma: no cover - platforms without preadv
    buffer[: len(data)] = data
    return len(data)


class _LocalSource:
    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            step = min(len(buffer) - done, 1 << 30)
            got = _preadv(self._fd, buffer[done : done + step], offset + done)
            if got == 0:
                raise CorruptCheckpointError(f"{self.url}: truncated: the file ends at {self.size}")
            done += got

    def map(self) -> mmap.mmap | None:
        if self.size == 0:
            return None
        return mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)

    def close(self) -> None:
        os.close(self._fd)


class _FsspecSource:
    """Ranged reads through ``fs.cat_file``: no shared file position, so threads may share it."""

    def __init__(self, url: str, fs: Any, path: str) -> None:
        self.url = url
        self._fs = fs
        self._path = path
        info = fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        self.size = int(info["size"])

    def read_at(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        return bytes(self._fs.cat_file(self._path, start=offset, end=end))

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        step = settings().chunk_bytes
        for start in range(0, len(buffer), step):
            piece = buffer[start : start + step]
            data = self.read_at(offset + start, len(piece))
            if len(data) != len(piece):
                raise CorruptCheckpointError(f"{self.url}: truncated: the file ends at {self.size}")
            piece[:] = data

    def map(self) -> mmap.mmap | None:
        return None

    def close(self) -> None:
        """Nothing is held open between reads."""


class SourceFile(io.RawIOBase):
    """A read-only, seekable file object over a ``Source`` (for ``zipfile`` and ``torch.load``)."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._pos = 0

    def readable(self) -> bool:
        """Return True."""
        return True

    def seekable(self) -> bool:
        """Return True."""
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        """Return the read position."""
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` at the position; return the byte count."""
        data = self._source.read_at(self._pos, len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_source(location: Location) -> Source:
    """Open the committed file at ``location`` for random-access reads.

    Raises:
        CheckpointNotFoundError: nothing exists at the path.
        InvalidCheckpointError: the path is a directory.
    """
    fs = location.fs
    if fs.isdir(location.path):
        raise InvalidCheckpointError(
            f"{location.url}: is a directory, not a single-file checkpoint. "
            "Sharded checkpoints load with a sharded strategy (FSDPStrategy)."
        )
    try:
        if location.is_local:
            return _LocalSource(location.url, location.path)
        return _FsspecSource(location.url, fs, location.path)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"{location.url}: no checkpoint exists at this path") from err
    except IsADirectoryError as err:
        raise InvalidCheckpointError(f"{location.url}: is a directory, not a file") from err


def remove(location: Location) -> None:
    """Delete the checkpoint (file or directory) at ``location``; a missing path is not an error."""
    with contextlib.suppress(FileNotFoundError):
        location.fs.rm(location.path, recursive=True)
