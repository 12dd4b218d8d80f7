"""Where bytes live: atomic staged writes, removal, and the storage layer's one import point.

This is the only module that opens a final checkpoint path for writing. A write is *staged* and
*committed*, so a checkpoint appears whole or not at all; how depends on the filesystem:

- local disk: a hidden temp file in the destination directory (never ``$TMPDIR``: renames across
  devices fail), fsync, ``os.replace`` over the target, fsync of the directory. While it is
  written, ``WriteBehind`` has the disk start on every few MiB, so the fsync finds little left;
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
        with io.BufferedWriter(_WriteBehindFile(temp, "xb"), 1024 * 1024) as sink:
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
