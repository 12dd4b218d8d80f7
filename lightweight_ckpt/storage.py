"""Where bytes live: atomic staged writes, removal, and the storage layer's one import point.

This is the only module that opens a final checkpoint path for writing. A write is *staged* and
*committed*, so a checkpoint appears whole or not at all; how depends on the filesystem:

- local disk: a hidden temp file in the destination directory (never ``$TMPDIR``: renames across
  devices fail), fsync, ``os.replace`` over the target, fsync of the directory. The temp file is
  written around the page cache (``local_files.DirectFile``, ``O_DIRECT``) where the filesystem
  allows it, otherwise written behind (``local_files.WriteBehind``: the disk starts on every few
  MiB, so the fsync finds little left);
- S3 and GCS: our own part writers (``uploads``), parts streamed with bounded memory, several
  in flight; ``commit()`` publishes the object in one request (S3: completes the multipart
  upload; GCS: composes the uploaded components), ``discard()`` removes what was uploaded;
- any other fsspec filesystem (``memory://``, ...): a hidden temp key beside the target, then a
  move onto the target.

A whole save is retried by ``write_with_retries``: after a transient failure it is re-streamed
from its first byte into a fresh upload (a failed upload is aborted, so no partial object is ever
published). The rest of the storage layer lives beside this module and is re-exported here:
``location`` (``resolve`` → ``Location``), ``retries`` (failure classification, retries with
backoff, translation into our errors), ``sources`` (random-access reads), ``uploads``
(incomplete multipart uploads) and ``local_files`` (local files being written).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import IO, TYPE_CHECKING, Any, Protocol

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CheckpointError, CheckpointWriteError
from lightweight_ckpt.local_files import create as create_local_file
from lightweight_ckpt.local_files import overwrite as overwrite_local_file
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
    "abort_incomplete_uploads",
    "call_with_retries",
    "classify_failure",
    "create_local_file",
    "incomplete_uploads",
    "is_directory",
    "open_source",
    "overwrite_local_file",
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
        with create_local_file(temp) as sink:
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
