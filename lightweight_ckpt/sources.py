"""Random-access reads of one committed file: the ``Source`` protocol and its implementations.

Formats fetch exactly the byte ranges they need and read straight into tensor memory: on local
disk with ``preadv`` (or a private memory map), remotely through ranged GETs, each retried on its
own (``retries.call_with_retries``), counted on a progress bar (``progress.transfer_bar``).

Bulk remote reads are *streams* (``Source.stream``): one long byte span, read in pieces of the
caller's size. On S3 and GCS a stream is a single ranged GET whose body is read piece by piece as
it arrives, straight into the caller's buffer, so a load makes a few long-lived requests instead
of one per ``chunk_bytes`` (fewer round trips; on servers that read the whole object for every
ranged GET, such as moto, far less work) and holds no whole-range ``bytes`` beside that buffer. A
stream cut short (reset, stall, truncated body) reopens at the first byte it has not delivered,
within the retry policy. Other filesystems stream as successive ``cat_file`` ranges of the piece
size. Small reads (the zip directory, local headers, the pickle) come from 64 KiB read-ahead
blocks; the file's tail (the zip directory: 1/64 of the file, 64 KiB to 1 MiB) is fetched once.
``SourceFile`` wraps a ``Source`` as a seekable file object for ``zipfile`` and ``torch.load``.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from fsspec.asyn import sync

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointError,
)
from lightweight_ckpt.progress import transfer_bar
from lightweight_ckpt.retries import call_with_retries

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightweight_ckpt.location import Location


class RangeStream(Protocol):
    """Sequential reads of one byte span of a file (``Source.stream``)."""

    def readinto(self, buffer: memoryview) -> None:
        """Fill all of ``buffer`` with the span's next bytes.

        Raises:
            CorruptCheckpointError: the file ends before the span does.
            CheckpointReadError: the store failed for good (after retries).
        """

    def close(self) -> None:
        """Release the connection (a span may be abandoned before its end)."""


class Source(Protocol):
    """Random-access reads of one committed file."""

    url: str
    size: int

    def stream(self, offset: int, size: int) -> RangeStream:
        """Open ``size`` bytes from ``offset`` for sequential reads (one request where possible)."""

    def read_at(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes at ``offset`` (fewer only at the end of the file)."""

    def readinto_at(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``; raise ``CorruptCheckpointError`` if the file ends."""

    def map(self) -> mmap.mmap | None:
        """Return a private copy-on-write memory map of the whole file, or None if not local."""

    def current_size(self) -> int:
        """The file's size now: a mapped file that shrank would raise SIGBUS where it ended."""

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
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        status = os.fstat(self._fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(self._fd)
            raise InvalidCheckpointError(
                f"{url}: not a regular file ({_file_kind(status.st_mode)}); a checkpoint is a "
                "file, or a directory for a sharded checkpoint."
            )
        os.set_blocking(self._fd, True)
        self.size = status.st_size

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

    def stream(self, offset: int, size: int) -> RangeStream:
        return _PositionalStream(self, offset)

    def map(self) -> mmap.mmap | None:
        if self.size == 0:
            return None
        return mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)

    def current_size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


class _PositionalStream:
    """A stream as successive ``readinto_at`` calls (local files; stores without bodies)."""

    def __init__(self, source: _LocalSource | _FsspecSource, offset: int) -> None:
        self._source = source
        self._pos = offset

    def readinto(self, buffer: memoryview) -> None:
        self._source.readinto_at(self._pos, buffer)
        self._pos += len(buffer)

    def close(self) -> None:
        """Nothing is held between reads."""


_SMALL_READ_BYTES = 4096
_READ_AHEAD_BYTES = 64 * 1024
_CACHED_BLOCKS = 64  # 4 MiB: every local header of a checkpoint of a few hundred records
_TAIL_BYTES = (64 * 1024, 1 << 20)  # the zip directory: 1/64 of the file, within these bounds


class _FsspecSource:
    """Ranged reads through ``fs.cat_file``: no shared file position, so threads may share it.

    Small reads (the zip index: one header per record) are served from 64 KiB read-ahead
    blocks (the first one and the file's tail, ``_TAIL_BYTES``, are kept for the source's life,
    the others least recently used first). Each range is retried on its own
    (``call_with_retries``); ``readinto_at`` fetches a large buffer as ``chunk_bytes`` ranges
    on a pool of ``io_threads``, straight into its slices, so at most ``io_threads *
    chunk_bytes`` bytes are in flight whatever the buffer's size. ``stream`` opens one long
    ranged GET on S3 and GCS (``_S3Stream``, ``_GCSStream``), successive ranges elsewhere.
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
        self._tail: bytes | None = None
        tail = min(max(self.size // 64, _TAIL_BYTES[0]), _TAIL_BYTES[1])
        self._tail_start = max(0, self.size - tail)
        self._bar = contextlib.ExitStack()  # closed with the source
        self.advance = self._bar.enter_context(transfer_bar(f"loading {url}"))

    def read_at(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        if offset >= self._tail_start:
            return self._tail_block()[offset - self._tail_start : end - self._tail_start]
        block_start = offset - offset % _READ_AHEAD_BYTES
        if end - offset <= _SMALL_READ_BYTES and end <= block_start + _READ_AHEAD_BYTES:
            return self._block(block_start)[offset - block_start : end - block_start]
        return self._get(offset, end)

    def _get(self, start: int, end: int) -> bytes:
        data = bytes(
            call_with_retries(
                self.url, "reading", lambda: self._fs.cat_file(self._path, start=start, end=end)
            )
        )
        self.advance(len(data))
        return data

    def _tail_block(self) -> bytes:
        """The file's tail: the zip directory is read in several small reads."""
        if self._tail is None:
            tail = self._get(self._tail_start, self.size)
            with self._lock:
                self._tail = tail
        return self._tail

    def _block(self, start: int) -> bytes:
        """A cached read-ahead block: index reads (zip headers, directory) are many and tiny."""
        with self._lock:
            block = self._blocks.pop(start, None)
            if block is not None:
                self._blocks[start] = block  # most recently used last
        if block is None:
            block = self._get(start, min(start + _READ_AHEAD_BYTES, self.size))
            with self._lock:
                self._blocks[start] = block
                evictable = [key for key in self._blocks if key != 0]
                while len(self._blocks) > _CACHED_BLOCKS and evictable:
                    del self._blocks[evictable.pop(0)]
        return block

    def stream(self, offset: int, size: int) -> RangeStream:
        if _is_s3(self._fs):
            return _S3Stream(self, self._fs, self._path, offset, size)
        if _is_gcs(self._fs):
            return _GCSStream(self, self._fs, self._path, offset, size)
        return _PositionalStream(self, offset)

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

    def current_size(self) -> int:
        return self.size

    def close(self) -> None:
        """Stop the range pool and the progress bar; nothing else is held between reads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bar.close()


def _is_s3(fs: Any) -> bool:
    """True for an s3fs filesystem (it has the async ``_call_s3`` that ``_S3Stream`` needs)."""
    return bool({"s3", "s3a"} & _protocols(fs)) and hasattr(fs, "_call_s3")


def _is_gcs(fs: Any) -> bool:
    """True for a gcsfs filesystem (with the session and headers ``_GCSStream`` needs)."""
    needs = ("_set_session", "_get_headers", "_get_params", "url")
    return bool({"gs", "gcs"} & _protocols(fs)) and all(hasattr(fs, name) for name in needs)


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


class _BodyStream:
    """One ranged GET whose body is read piece by piece, resumed where it broke.

    The body is read on the client's event loop into the caller's buffer (aiohttp hands it over
    in small pieces and stops reading the socket while its own buffer is full), so the stream
    holds no more than the caller's buffer: no whole-range ``bytes`` as ``cat_file`` returns,
    built from a list of chunks and then copied. A failure mid-way (reset, read timeout, a body
    cut short) closes the response and, within the retry policy, opens a new GET for the bytes
    not yet delivered; so does an answer that is not the range asked for (a server, or a proxy on
    the way, sending the whole object), which is never read as the range. Subclasses open the GET
    (``_open``: the body to read, how to close it, and the answer's HTTP status).
    """

    def __init__(self, source: _FsspecSource, fs: Any, path: str, offset: int, size: int) -> None:
        self._source = source
        self._fs = fs
        self._path = path
        self._pos = offset
        self._end = offset + size
        self._body: Any = None
        self._close_body: Callable[[], object] | None = None

    def readinto(self, buffer: memoryview) -> None:
        if self._pos + len(buffer) > min(self._end, self._source.size):
            raise CorruptCheckpointError(
                f"{self._source.url}: truncated: the file ends at {self._source.size}"
            )
        rest = buffer

        def attempt() -> None:
            nonlocal rest
            done = [0]
            try:
                if self._body is None:
                    self._body, self._close_body, status = sync(self._fs.loop, self._open)
                    if status != _PARTIAL_CONTENT and self._pos != 0:
                        raise ConnectionResetError(  # noqa: TRY301 - retried like a reset
                            f"asked for bytes {self._pos}- and got status {status}, not a range"
                        )
                sync(self._fs.loop, _read_body, self._body, rest, done)
            except BaseException:
                self.close()  # the next attempt opens a new GET from the first byte not read
                raise
            finally:
                self._pos += done[0]
                self._source.advance(done[0])
                rest = rest[done[0] :]

        call_with_retries(self._source.url, "reading", attempt)

    async def _open(self) -> tuple[Any, Callable[[], object], int]:
        raise NotImplementedError

    def close(self) -> None:
        close, self._body, self._close_body = self._close_body, None, None
        if close is not None:
            with contextlib.suppress(Exception):
                close()


class _S3Stream(_BodyStream):
    """A stream as one ranged ``GetObject`` (s3fs's client, its retries and timeouts)."""

    async def _open(self) -> tuple[Any, Callable[[], object], int]:
        bucket, _, key = self._path.partition("/")
        response = await self._fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes={self._pos}-{self._end - 1}"
        )
        body = response["Body"]
        return body, body.close, int(response["ResponseMetadata"]["HTTPStatusCode"])


class _GCSStream(_BodyStream):
    """A stream as one ranged media download on gcsfs's own session, with its credentials.

    Read timeouts are per read (``sock_read``), never a total over the whole span, which a
    long span would exceed; the storage options' ``requests_timeout`` gives their length.
    """

    async def _open(self) -> tuple[Any, Callable[[], object], int]:
        fs = self._fs
        await fs._set_session()
        response = await fs.session.get(
            url=fs.url(self._path),
            params=fs._get_params({}),
            headers=fs._get_headers({"Range": f"bytes={self._pos}-{self._end - 1}"}),
            timeout=_stream_timeout(fs.requests_timeout),
        )
        if response.status >= 400:  # noqa: PLR2004 - HTTP errors: gcsfs's own exceptions
            from gcsfs.retry import validate_response  # noqa: PLC0415 - gcsfs is optional

            try:
                validate_response(response.status, await response.read(), self._path)
            finally:
                response.close()
        return response.content, response.close, response.status


def _stream_timeout(requests_timeout: Any) -> Any:
    """The aiohttp timeouts of a long download: gcsfs's connect and read limits, no total."""
    import aiohttp  # noqa: PLC0415 - gcsfs's transport, optional like gcsfs

    if isinstance(requests_timeout, aiohttp.ClientTimeout):
        return aiohttp.ClientTimeout(
            total=None,
            connect=requests_timeout.connect,
            sock_connect=requests_timeout.sock_connect,
            sock_read=requests_timeout.sock_read,
        )
    seconds = (
        float(requests_timeout)
        if isinstance(requests_timeout, int | float)
        else settings().request_timeout_s
    )
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


_PARTIAL_CONTENT = 206
_BODY_READ_BYTES = 1 << 20  # aiohttp joins what it buffered into one bytes object of this size


async def _read_body(body: Any, buffer: memoryview, done: list[int]) -> None:
    """Fill ``buffer`` from an aiobotocore body, counting delivered bytes in ``done[0]``."""
    while done[0] < len(buffer):
        chunk = await body.read(min(len(buffer) - done[0], _BODY_READ_BYTES))
        if not chunk:
            raise ConnectionResetError("the response body ended before the requested range")
        buffer[done[0] : done[0] + len(chunk)] = chunk
        done[0] += len(chunk)


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


def is_directory(location: Location) -> bool:
    """Return True if ``location`` is a directory (or an object-store prefix), with retries.

    Not ``fs.isdir``: fsspec answers False for any ``OSError`` (a timeout, a refused
    connection), so a store that is down looked like "no directory here" and the caller went on
    to the next request against it. Only a missing path means False here; other failures are
    retried and then raised as ours, naming the URL.
    """

    def probe() -> bool:
        try:
            info = location.fs.info(location.path)
        except FileNotFoundError:
            return False
        return bool(info.get("type") == "directory")

    return call_with_retries(location.url, "reading", probe)


def open_source(location: Location) -> Source:
    """Open the committed file at ``location`` for random-access reads.

    Raises:
        CheckpointNotFoundError: nothing exists at the path.
        InvalidCheckpointError: the path is a directory.
        CheckpointReadError: the store failed for good (after retries), or refused access.
    """
    fs = location.fs
    if is_directory(location):
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
