"""Where bytes live: atomic staged writes, removal, and the storage layer's one import point.

This is the only module that opens a final checkpoint path for writing. A write is *staged* and
*committed*, so a checkpoint appears whole or not at all; how depends on the filesystem:

- local disk: a hidden temp file in the destination directory (never ``$TMPDIR``: renames across
  devices fail), fsync, ``os.replace`` over the target, fsync of the directory. The temp file is
  written around the page cache (``_DirectFile``, ``O_DIRECT``) where the filesystem allows it;
  otherwise (and for DCP's pieces) ``WriteBehind`` has the disk start on every few MiB, so the
  fsync finds little left;
- S3 and GCS: our own part writers (``uploads``), parts streamed with bounded memory, several
  in flight; ``commit()`` publishes the object in one request (S3: completes the multipart
  upload; GCS: composes the uploaded components), ``discard()`` removes what was uploaded;
- any other fsspec filesystem (``memory://``, ...): a hidden temp key beside the target, then a
  move onto the target.

A whole save is retried by ``write_with_retries``: after a transient failure it is re-streamed
from its first byte into a fresh upload (a failed upload is aborted, so no partial object is ever
published). The rest of the storage layer lives beside this module and is re-exported here:
``location`` (``resolve`` → ``Location``), ``retries`` (failure classification, retries with
backoff, translation into our errors), ``sources`` (random-access reads) and ``uploads``
(incomplete multipart uploads).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import mmap
import os
import posixpath
import sys
import uuid
from typing import IO, TYPE_CHECKING, Any, Protocol

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CheckpointError, CheckpointWriteError
from lightweight_ckpt.location import Location, resolve
from lightweight_ckpt.progress import transfer_bar
from lightweight_ckpt.retries import (
    REMEDIES,
    RetryPolicy,
    call_with_retries,
    classify_failure,
    storage_error,
)
from lightweight_ckpt.sources import RangeStream, Source, SourceFile, is_directory, open_source
from lightweight_ckpt.uploads import (
    GCSComposeWriter,
    IncompleteUpload,
    S3PartWriter,
    abort_incomplete_uploads,
    incomplete_uploads,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "IncompleteUpload",
    "Location",
    "RangeStream",
    "RetryPolicy",
    "Sink",
    "Source",
    "SourceFile",
    "WriteBehind",
    "abort_incomplete_uploads",
    "call_with_retries",
    "classify_failure",
    "incomplete_uploads",
    "is_directory",
    "open_source",
    "remove",
    "resolve",
    "staged_write",
    "storage_error",
    "write_with_retries",
]

_DEFERRED_COMMIT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})


def _sibling_temp(location: Location) -> str:
    parent, name = posixpath.split(location.path)
    return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _find_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _find_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


class WriteBehind:
    """Have the disk write a local file's bytes while later ones are still being produced.

    A save that writes everything and then calls fsync leaves the disk idle while tensors are
    serialized, then waits for all of it at once. Every ``write_behind_bytes`` (a tunable) of
    new bytes, this asks Linux to start writing them back (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``, which does not wait), so the two overlap. It promises no
    durability: the save's fsync still does that. Elsewhere, or for a stream with no file
    descriptor, it does nothing.
    """

    def __init__(self, stream: Any) -> None:
        self._step = settings().write_behind_bytes
        self._fd: int | None = None
        if self._step and _SYNC_FILE_RANGE is not None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                self._fd = int(stream.fileno())
        self._started = 0  # bytes before this offset have been handed to writeback

    def wrote_up_to(self, end: int) -> None:
        """Note that the bytes before offset ``end`` are written (to the kernel)."""
        if self._fd is None or end - self._started < self._step:
            return
        aligned = end - end % mmap.PAGESIZE  # a partly written page is left to the next range
        if (
            _SYNC_FILE_RANGE(
                self._fd, self._started, aligned - self._started, _SYNC_FILE_RANGE_WRITE
            )
            != 0
        ):
            self._fd = None  # unsupported here (a pipe, an odd filesystem): stop asking
        self._started = aligned


class _WriteBehindFile(io.FileIO):
    """A local file written through ``WriteBehind``."""

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self._behind = WriteBehind(self)

    def write(self, data: Any) -> int:
        count = super().write(data) or 0
        self._behind.wrote_up_to(self.tell())
        return count


_DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes


class _DirectFile:
    """A new local file written around the page cache (``O_DIRECT``) from one aligned buffer.

    A buffered write copies every byte into page cache that must first be allocated (on some
    machines the slowest part of a save) and then waits for all of it at the fsync. Here bytes
    gather in a ``chunk_bytes`` buffer, page-aligned, and each full buffer goes to the disk in one
    write; no page cache is taken, so a save does not evict the caller's cached data either.
    ``flush`` writes the partial tail padded to the alignment and cuts the file to its true
    length, keeping the tail buffered so later writes rewrite that block. Where the filesystem
    refuses ``O_DIRECT`` (tmpfs, some FUSE mounts), at open or at a write, the file carries on
    buffered, written behind (``WriteBehind``). The caller still fsyncs.
    """

    def __init__(self, path: str, chunk_bytes: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            self._direct = True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags, 0o666)
            self._direct = False
        self._behind = WriteBehind(self)  # only used once the file is buffered
        size = max(_DIRECT_ALIGN, chunk_bytes - chunk_bytes % _DIRECT_ALIGN)
        try:
            self._buffer = mmap.mmap(-1, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._buffer)
        self._filled = 0  # bytes in the buffer
        self._offset = 0  # where the buffer's first byte goes in the file (aligned)

    def fileno(self) -> int:
        """The file descriptor (for fsync)."""
        return self._fd

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self._offset + self._filled

    def write(self, data: Any) -> int:
        """Copy ``data`` into the buffer; write each buffer that fills up."""
        source = memoryview(data).cast("B")
        size = len(self._view)
        position = 0
        while position < len(source):
            take = min(len(source) - position, size - self._filled)
            self._view[self._filled : self._filled + take] = source[position : position + take]
            self._filled += take
            position += take
            if self._filled == size:
                self._write_out(size)
                self._offset += size
                self._filled = 0
        return len(source)

    def flush(self) -> None:
        """Write the buffered tail (padded to the alignment) and cut the file to its length."""
        if self._filled:
            padded = -(-self._filled // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._view[self._filled : padded] = bytes(padded - self._filled)
            self._write_out(padded)
        os.ftruncate(self._fd, self.tell())

    def _write_out(self, length: int) -> None:
        done = 0
        while done < length:
            done += self._pwrite(self._view[done:length], self._offset + done)
        if not self._direct:  # direct writes leave no dirty pages to write back
            self._behind.wrote_up_to(self._offset + length)

    def _pwrite(self, view: memoryview, offset: int) -> int:
        try:
            return os.pwrite(self._fd, view, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not self._direct:
                raise
        self._go_buffered()  # the filesystem took the open but refuses the writes
        return os.pwrite(self._fd, view, offset)

    def _go_buffered(self) -> None:
        import fcntl  # noqa: PLC0415 - POSIX only, like O_DIRECT itself

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def close(self) -> None:
        """Close the file and free the buffer."""
        os.close(self._fd)
        # a failed write's traceback may still hold a slice of the buffer: then the garbage
        # collector frees it once that traceback is gone
        with contextlib.suppress(BufferError):
            self._view.release()
            self._buffer.close()

    def __enter__(self) -> _DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_local(path: str) -> Any:
    """A new local file to stage a checkpoint in: direct I/O where on and possible."""
    tunables = settings()
    if tunables.direct_io and hasattr(os, "O_DIRECT"):
        return _DirectFile(path, tunables.chunk_bytes)
    return io.BufferedWriter(_WriteBehindFile(path, "xb"), 1024 * 1024)


@contextlib.contextmanager
def staged_write(location: Location, parts_in_flight: int | None = None) -> Iterator[Sink]:
    """Yield a binary sink for ``location``; commit atomically on clean exit, discard on error.

    ``parts_in_flight``: S3/GCS parts uploading at once (default: ``settings().parts_in_flight``).

    Raises:
        CheckpointWriteError: the target is a directory, or writing/committing failed (a
            transport, credential or permission failure is named as such). The previous
            checkpoint at the path is intact and no temp file is left behind.
    """
    try:
        _refuse_directory(location)
        if location.is_local:
            writer = _staged_local(location)
        elif location.protocol in _DEFERRED_COMMIT_PROTOCOLS:
            writer = _staged_deferred(location, parts_in_flight)
        else:
            writer = _staged_move(location)
        with writer as sink:
            yield sink
    except CheckpointError:
        raise
    except Exception as err:
        if classify_failure(err) is not None:
            raise storage_error(location.url, "writing", err) from err
        if isinstance(err, FileNotFoundError) and not location.is_local:
            raise CheckpointWriteError(
                f"{location.url}: writing failed ({type(err).__name__}: {err}). "
                f"{REMEDIES['no-bucket']}."
            ) from err
        if isinstance(err, OSError):
            raise CheckpointWriteError(f"{location.url}: write failed: {err}") from err
        raise


def _refuse_directory(location: Location) -> None:
    if location.fs.isdir(location.path):
        raise CheckpointWriteError(
            f"{location.url}: is a directory; a single-file checkpoint cannot replace it. "
            "Choose another path or remove the directory."
        )


def write_with_retries(location: Location, write: Callable[[Sink], None]) -> int:
    """Run ``write`` into a fresh ``staged_write`` per attempt; return the bytes written.

    A transient failure (see the module docstring) discards the attempt's upload, waits and
    starts over from the first byte, so ``write`` must be repeatable.

    Raises:
        CheckpointWriteError: every attempt failed, or one failed for a lasting reason.
    """

    def attempt() -> int:
        with staged_write(location) as sink:
            write(sink)
            return sink.tell()

    return call_with_retries(location.url, "writing", attempt)


@contextlib.contextmanager
def _staged_local(location: Location) -> Iterator[Sink]:
    parent = posixpath.dirname(location.path)
    os.makedirs(parent or ".", exist_ok=True)
    temp = _sibling_temp(location)
    try:
        with _open_local(temp) as sink:
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
def _staged_deferred(location: Location, parts_in_flight: int | None) -> Iterator[Sink]:
    tunables = settings()
    kind = S3PartWriter if location.protocol in _S3_PROTOCOLS else GCSComposeWriter
    in_flight = tunables.parts_in_flight if parts_in_flight is None else parts_in_flight
    with transfer_bar(f"saving {location.url}") as advance:
        writer = kind(location, tunables.part_bytes, in_flight, advance)
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.discard()  # removes what the upload stored; never raises
            raise


@contextlib.contextmanager
def _staged_move(location: Location) -> Iterator[Sink]:
    fs = location.fs
    parent = posixpath.dirname(location.path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temp = _sibling_temp(location)
    try:
        with transfer_bar(f"saving {location.url}") as advance, fs.open(temp, "wb") as remote:
            yield _ChunkedWriter(remote, advance)
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

    def __init__(self, file: IO[bytes], advance: Callable[[int], None]) -> None:
        self._file = file
        self._advance = advance

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        step = settings().chunk_bytes
        for start in range(0, len(view), step):
            self._file.write(view[start : start + step])
            self._advance(min(step, len(view) - start))
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


def remove(location: Location) -> None:
    """Delete the checkpoint (file or directory) at ``location``; a missing path is not an error."""
    with contextlib.suppress(FileNotFoundError):
        location.fs.rm(location.path, recursive=True)
