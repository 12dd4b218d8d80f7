"""Random-access reads of one committed file: the ``Source`` protocol and its implementations.

Formats fetch exactly the byte ranges they need and read straight into tensor memory: on local
disk with ``preadv`` (or a private memory map), remotely through ``fs.cat_file`` ranges fetched
in parallel (``io_threads`` GETs of at most ``chunk_bytes`` in flight, so memory stays bounded),
each retried on its own (``retries.call_with_retries``), counted on a progress bar
(``progress.transfer_bar``). ``SourceFile`` wraps a ``Source`` as a
seekable file object for ``zipfile`` and ``torch.load``.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointError,
)
from lightweight_ckpt.progress import transfer_bar
from lightweight_ckpt.retries import call_with_retries

if TYPE_CHECKING:
    from lightweight_ckpt.location import Location


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
        self._bar = contextlib.ExitStack()  # closed with the source
        self._advance = self._bar.enter_context(transfer_bar(f"loading {url}"))

    def read_at(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
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
        self._advance(len(data))
        return data

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
        """Stop the range pool and the progress bar; nothing else is held between reads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._bar.close()


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
