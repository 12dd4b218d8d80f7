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
byte ranges they need and read straight into tensor memory; remote ranges are fetched in
parallel (``io_threads`` GETs of at most ``chunk_bytes`` in flight, so memory stays bounded).

Transient failures. s3fs retries most transport errors itself (botocore retries connection
errors and 5xx, then s3fs's own wrapper 5 times over ~2 s; ``retries=`` and
``config_kwargs={"retries": ..., "read_timeout": ...}`` tune them), and gcsfs retries
connection errors, 408/429/5xx 6 times with 1-32 s backoffs (``requests_timeout=`` bounds each
request; without it a stalled read waits on aiohttp's default). What escapes them (an endpoint
down for longer than botocore's few attempts, a stall past the read timeout, a payload cut
short after the last retry) is retried here, per ranged read and per whole save (a save is
re-streamed from its first byte into a fresh upload: a failed upload is aborted, so no partial
object is ever published), with exponential backoff and full jitter, bounded by
``retry_attempts`` and ``retry_deadline_s`` (``config``). What is left is translated into our
errors naming the URL: ``CheckpointWriteError`` when writing, ``CheckpointReadError`` when
reading, never a raw client exception.

``incomplete_uploads`` / ``abort_incomplete_uploads`` list and abort the S3 multipart uploads a
killed save leaves behind (they are invisible, but are stored and billed until aborted).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import mmap
import os
import posixpath
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from lightweight_ckpt.types import StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")
_T = TypeVar("_T")

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


# -- transient failures: classification, retries with backoff, translation --------------------

# Matched by qualified name anywhere in an exception's MRO and its cause chain, so that no
# client library is imported here (s3fs and gcsfs are optional).
_TRANSIENT_TYPES = frozenset(
    {
        "builtins.ConnectionError",  # reset, refused, aborted, broken pipe
        "builtins.TimeoutError",  # socket/asyncio timeouts, aiohttp ServerTimeoutError
        "http.client.IncompleteRead",
        "botocore.exceptions.ConnectionError",  # EndpointConnectionError, ConnectTimeoutError
        "botocore.exceptions.HTTPClientError",  # ReadTimeoutError, ConnectionClosedError
        "botocore.exceptions.IncompleteReadError",
        "aiohttp.client_exceptions.ClientConnectionError",  # ServerDisconnectedError, ...
        "aiohttp.client_exceptions.ClientPayloadError",  # a body cut short
        "fsspec.exceptions.FSTimeoutError",
        "requests.exceptions.ConnectionError",  # gcsfs maps a 502 to ProxyError, a subclass
        "requests.exceptions.Timeout",
        "requests.exceptions.ChunkedEncodingError",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}
)  # fmt: skip
_CREDENTIAL_TYPES = frozenset(
    {
        "botocore.exceptions.NoCredentialsError",
        "botocore.exceptions.PartialCredentialsError",
        "botocore.exceptions.CredentialRetrievalError",
        "google.auth.exceptions.GoogleAuthError",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_MAX_BACKOFF_S = 30.0
_UNAUTHORIZED = 401
_FORBIDDEN = 403
_REMEDIES = {
    "transient": "The store did not answer reliably; check the endpoint and the network, or "
    "allow more with LWCKPT_RETRY_ATTEMPTS / LWCKPT_RETRY_DEADLINE_S",
    "credentials": "Credentials are missing or were refused; pass them in storage_options "
    "(key/secret, token) or set them up for the client",
    "denied": "Access denied; check these credentials' permissions on the bucket",
    "no-bucket": "The bucket does not exist; create it or correct the URL",
}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_and_code(err: BaseException) -> tuple[int | None, str]:
    """HTTP status and service error code of a botocore ``ClientError`` or gcsfs ``HttpError``."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), str(
            response.get("Error", {}).get("Code", "")
        )
    code = getattr(err, "code", None)
    if type(err).__module__.startswith("gcsfs") and isinstance(code, int):
        return code, ""
    return None, ""


def classify_failure(err: BaseException) -> tuple[str, BaseException] | None:
    """Say what kind of storage failure ``err`` is, and which exception in its chain shows it.

    Returns ``("transient" | "credentials" | "denied" | "no-bucket", cause)``, or None for
    anything else (a missing object, damaged bytes, a bug), which is not ours to judge here.
    """
    for cause in _chain(err):
        names = {f"{k.__module__}.{k.__qualname__}" for k in type(cause).__mro__}
        status, code = _status_and_code(cause)
        if names & _CREDENTIAL_TYPES or code in _CREDENTIAL_CODES or status == _UNAUTHORIZED:
            return "credentials", cause
        if code == "NoSuchBucket":
            return "no-bucket", cause
        if code == "AccessDenied" or status == _FORBIDDEN or isinstance(cause, PermissionError):
            return "denied", cause
        if str(cause).startswith("Forbidden"):  # gcsfs's 403
            return "denied", cause
        if names & _TRANSIENT_TYPES or status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return "transient", cause
    return None


def storage_error(url: str, action: str, err: BaseException, detail: str = "") -> CheckpointError:
    """Translate a failure while ``action`` (``"reading"``, ``"writing"``, ...) into our error.

    Writing gives ``CheckpointWriteError``, anything else ``CheckpointReadError``; the message
    names the URL, the problem, the client's own words and a remedy.
    """
    kind = classify_failure(err)
    cause = err if kind is None else kind[1]
    what = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
    remedy = _REMEDIES[kind[0]] if kind else "See the cause above"
    message = f"{url}: {action} failed{detail} ({what}). {remedy}."
    if action == "writing":
        return CheckpointWriteError(message)
    if kind is not None and kind[0] == "no-bucket":
        return CheckpointNotFoundError(message)
    return CheckpointReadError(message)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure (from ``config``)."""

    attempts: int
    backoff_s: float
    deadline_s: float

    @classmethod
    def current(cls) -> RetryPolicy:
        """The policy the tunables in force describe."""
        tunables = settings()
        return cls(tunables.retry_attempts, tunables.retry_backoff_s, tunables.retry_deadline_s)

    def delay_s(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1``: exponential, capped, full jitter."""
        ceiling = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography


def call_with_retries(url: str, action: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; retry transient storage failures with backoff; translate what is left.

    Failures that ``classify_failure`` does not know (a missing object, damaged bytes) and our
    own errors without a transient cause propagate unchanged.

    Raises:
        CheckpointWriteError: ``action`` is ``"writing"`` and it failed for good.
        CheckpointReadError: any other action failed for good.
    """
    policy = RetryPolicy.current()
    start = time.monotonic()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: PERF203 - the retry loop is the point
            kind = classify_failure(err)
            if kind is None:
                raise
            elapsed = time.monotonic() - start
            delay = policy.delay_s(attempt)
            if kind[0] != "transient" or attempt >= policy.attempts:
                raise _final(url, action, err, attempt, elapsed) from err
            if elapsed + delay > policy.deadline_s:
                raise _final(url, action, err, attempt, elapsed) from err
            log.warning(
                "%s: %s failed (attempt %d of %d: %s: %s); retrying in %.2f s",
                url, action, attempt, policy.attempts, type(kind[1]).__name__, kind[1], delay,
            )  # fmt: skip
            time.sleep(delay)
            attempt += 1


def _final(url: str, action: str, err: Exception, attempt: int, elapsed: float) -> CheckpointError:
    detail = f" after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f} s"
    return storage_error(url, action, err, detail)


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
        CheckpointWriteError: the target is a directory, or writing/committing failed (a
            transport, credential or permission failure is named as such). The previous
            checkpoint at the path is intact and no temp file is left behind.
    """
    try:
        _refuse_directory(location)
        if location.is_local:
            writer = _staged_local(location)
        elif location.protocol in _DEFERRED_COMMIT_PROTOCOLS:
            writer = _staged_deferred(location)
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
                f"{_REMEDIES['no-bucket']}."
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
        remote.commit()  # a failed commit is discarded below: no upload left in progress
    except BaseException:
        with contextlib.suppress(Exception):
            remote.discard()  # aborts the multipart upload
        remote.closed = True  # or its __del__ would flush a new, orphan upload
        raise
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


_SMALL_READ_BYTES = 4096
_READ_AHEAD_BYTES = 64 * 1024
_CACHED_BLOCKS = 16


class _FsspecSource:
    """Ranged reads through ``fs.cat_file``: no shared file position, so threads may share it.

    Small reads (the zip index: one header per record) are served from 64 KiB read-ahead
    blocks, a few kept. Each range is retried on its own (``call_with_retries``);
    ``readinto_at`` fetches a large buffer as ``chunk_bytes`` ranges on a pool of
    ``io_threads``, straight into its slices, so at most ``io_threads * chunk_bytes`` bytes are
    in flight whatever the buffer's size.
    """

    def __init__(self, url: str, fs: Any, path: str) -> None:
        self.url = url
        self._fs = fs
        self._path = path
        info = call_with_retries(url, "reading", lambda: fs.info(path))
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        self.size = int(info["size"])
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._blocks: dict[int, bytes] = {}

    def read_at(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        block_start = offset - offset % _READ_AHEAD_BYTES
        if end - offset <= _SMALL_READ_BYTES and end <= block_start + _READ_AHEAD_BYTES:
            return self._block(block_start)[offset - block_start : end - block_start]
        return self._get(offset, end)

    def _get(self, start: int, end: int) -> bytes:
        return bytes(
            call_with_retries(
                self.url, "reading", lambda: self._fs.cat_file(self._path, start=start, end=end)
            )
        )

    def _block(self, start: int) -> bytes:
        """A cached read-ahead block: index reads (zip headers, directory) are many and tiny."""
        with self._lock:
            block = self._blocks.get(start)
        if block is None:
            block = self._get(start, min(start + _READ_AHEAD_BYTES, self.size))
            with self._lock:
                self._blocks[start] = block
                while len(self._blocks) > _CACHED_BLOCKS:
                    del self._blocks[next(iter(self._blocks))]
        return block

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        step = settings().chunk_bytes
        starts = range(0, len(buffer), step)
        if len(starts) <= 1:
            self._fill(offset, buffer)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(settings().io_threads, thread_name_prefix="lwckpt-get")
        futures = [
            self._pool.submit(self._fill, offset + start, buffer[start : start + step])
            for start in starts
        ]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()

    def _fill(self, offset: int, piece: memoryview) -> None:
        data = self.read_at(offset, len(piece))
        if len(data) != len(piece):
            raise CorruptCheckpointError(f"{self.url}: truncated: the file ends at {self.size}")
        piece[:] = data

    def map(self) -> mmap.mmap | None:
        return None

    def close(self) -> None:
        """Stop the range pool; nothing else is held open between reads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
        CheckpointReadError: the store failed for good (after retries), or refused access.
    """
    fs = location.fs
    if call_with_retries(location.url, "reading", lambda: fs.isdir(location.path)):
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


# -- uploads a killed save left behind ---------------------------------------------------------


@dataclass(frozen=True)
class IncompleteUpload:
    """An S3 multipart upload that was neither completed nor aborted."""

    url: str
    upload_id: str
    initiated: datetime.datetime | None


def incomplete_uploads(location: Location, older_than_s: float = 0.0) -> list[IncompleteUpload]:
    """List the S3 multipart uploads in progress under ``location`` started ``older_than_s`` ago.

    The path is a plain key prefix (``s3://bucket/run`` also matches ``run2/...``; end it with
    ``/`` for one folder). A save that is still running has an incomplete upload too: the age
    spares it. Other filesystems have nothing to list: GCS resumable uploads are not listable
    and expire after a week; local and ``memory://`` saves leave temp files (``gc`` command).

    Raises:
        CheckpointReadError: the listing failed (after retries), or was refused.
    """
    if location.protocol not in ("s3", "s3a"):
        return []
    bucket, _, prefix = location.path.partition("/")
    params: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
    found: list[IncompleteUpload] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    while True:
        page = call_with_retries(
            location.url,
            "listing uploads",
            lambda: location.fs.call_s3("list_multipart_uploads", **params),
        )
        for upload in page.get("Uploads", []):
            started = upload.get("Initiated")
            if started is not None and (now - started).total_seconds() < older_than_s:
                continue
            found.append(
                IncompleteUpload(
                    f"{location.protocol}://{bucket}/{upload['Key']}",
                    str(upload["UploadId"]),
                    started,
                )
            )
        if not page.get("IsTruncated"):
            return found
        params["KeyMarker"] = str(page.get("NextKeyMarker", ""))
        params["UploadIdMarker"] = str(page.get("NextUploadIdMarker", ""))


def abort_incomplete_uploads(
    location: Location, older_than_s: float = 3600.0
) -> list[IncompleteUpload]:
    """Abort the uploads ``incomplete_uploads(location, older_than_s)`` lists; return them.

    An upload that completes or is aborted meanwhile is skipped.

    Raises:
        CheckpointReadError: the listing failed (after retries), or was refused.
        CheckpointWriteError: an abort failed (after retries), or was refused.
    """
    aborted = []
    for upload in incomplete_uploads(location, older_than_s):
        bucket, _, key = upload.url.split("://", 1)[1].partition("/")

        def abort(bucket: str = bucket, key: str = key, upload_id: str = upload.upload_id) -> Any:
            return location.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id
            )

        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: finished meanwhile
            call_with_retries(upload.url, "writing", abort)
            aborted.append(upload)
    return aborted
