"""Local files being written: around the page cache where possible, else written behind.

The storage layer's writers for local disk; ``storage`` re-exports them, and only ``storage``
and the sharded format's piece streams use them.

- ``DirectFile``: bytes gather in page-aligned buffers and each full buffer goes to the disk in
  one ``O_DIRECT`` write by a writer thread, while the caller fills the next buffer. No page
  cache is allocated (on some machines the slowest part of a save) and none of the caller's
  cached data is evicted; the disk writes while tensors are still being serialized. The buffers
  go back to a small pool when the file closes (``_BufferPool``: two files' worth), so a run's
  later saves write from the same memory instead of mapping and faulting in new buffers. Buffers
  of 2 MiB or more sit on huge pages where the kernel allows (``_Buffer``): one request each.
- ``WriteBehind``: for a file that goes through the page cache (a filesystem that refuses
  ``O_DIRECT``, or ``LWCKPT_DIRECT_IO=off``), every ``write_behind_bytes`` the disk is asked to
  start on the new bytes, so the final fsync finds little left to write.

``create`` opens a new file, ``overwrite`` takes an existing one to write over in place (a
reused sharded piece); each picks direct I/O where it is on and the filesystem allows it.
Callers still fsync: none of this promises durability by itself.

Why reused pieces are written directly too: copying into the old file's pages beats a direct
write only while those pages are still cached (``benchmarks/sharded.py --overwrite`` at world
size 2: 0.20 s vs 0.29-0.32 s), and after a direct save they are not (0.71 s: the page cache must
be allocated again). Direct writes take the same time whatever the cache holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightweight_ckpt.config import settings

__all__ = ["DirectFile", "WriteBehind", "create", "overwrite"]


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
    """A local file written through ``WriteBehind``; ``cut_on_close``: truncate where writes end."""

    def __init__(self, fd: int, *, cut_on_close: bool) -> None:
        super().__init__(fd, "r+" if cut_on_close else "w")
        self._behind = WriteBehind(self)
        self._cut_on_close = cut_on_close

    def write(self, data: Any) -> int:
        count = super().write(data) or 0
        self._behind.wrote_up_to(self.tell())
        return count

    def close(self) -> None:
        if not self.closed and self._cut_on_close:
            self.truncate()
        super().close()


_DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes
_DIRECT_BUFFERS = 2  # one being filled by the caller, one being written by the writer thread


_HUGE_PAGE_BYTES = 2 << 20


class _Buffer:
    """One direct-I/O buffer: ``view`` is ``size`` page-aligned bytes of a private mapping.

    Private, so a forked child writes into copies of its own. A buffer of 2 MiB or more starts
    on a 2 MiB boundary (the mapping is 2 MiB longer; the spare tail is never touched) and asks
    for transparent huge pages (``MADV_HUGEPAGE``). A direct write is a list of the buffer's
    physical pages: from 4 KiB pages a 4 MiB write has 1,024 segments, which the block layer
    splits into several requests (``max_segments``: 254 on this project's virtio disk); from
    2 MiB pages it has two, one request. On that disk, 1.5 GB of 4 MiB direct writes took 1.4-2.6 s
    from 4 KiB pages and 0.51-0.55 s from huge pages. Where the kernel has no huge pages the
    advice fails and the buffer works as before.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        huge = size >= _HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE")
        spare = _HUGE_PAGE_BYTES if huge else 0
        self._mapping = mmap.mmap(-1, size + spare, flags=mmap.MAP_PRIVATE)
        start = -_address(self._mapping) % _HUGE_PAGE_BYTES if huge else 0
        if huge:
            with contextlib.suppress(OSError):  # a kernel without transparent huge pages
                self._mapping.madvise(mmap.MADV_HUGEPAGE, start, size)
        self._whole = memoryview(self._mapping)
        self.view = self._whole[start : start + size]

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        """Unmap; raises ``BufferError`` while a slice of ``view`` is still referenced."""
        self.view.release()
        self._whole.release()
        self._mapping.close()


def _address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the export, or the mapping could not be closed


def _map(size: int) -> _Buffer:
    """A new buffer of ``size`` bytes (``_Buffer``)."""
    return _Buffer(size)


class _BufferPool:
    """Direct-I/O buffers kept from one save for the next.

    A run saves every so often; without the pool each save maps its buffers afresh, faults in
    every page and unmaps them at the end, so a steady-state save adds their size to the
    process's memory each time instead of reusing it. At most ``kept`` buffers stay mapped (two
    files' worth: a single file's and a sharded piece's), the most recently returned first. A
    forked child starts with an empty pool (its copies of the parent's buffers are dropped).
    """

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._lock = threading.Lock()
        self._free: list[_Buffer] = []

    def take(self, size: int) -> _Buffer:
        """A kept buffer of ``size`` bytes, else a new one."""
        with self._lock:
            for index in range(len(self._free) - 1, -1, -1):
                if len(self._free[index]) == size:
                    return self._free.pop(index)
        return _map(size)

    def give(self, buffer: _Buffer) -> None:
        """Keep ``buffer`` for a later file; unmap the oldest beyond ``kept``."""
        with self._lock:
            self._free.append(buffer)
            dropped = self._free[: -self._kept]
            del self._free[: -self._kept]
        for old in dropped:
            with contextlib.suppress(BufferError):  # still referenced: the collector unmaps it
                old.close()

    def kept(self) -> list[_Buffer]:
        """The buffers kept now, oldest first."""
        with self._lock:
            return list(self._free)

    def forget(self) -> None:
        """Start empty (in a forked child, whose lock may have been held by another thread)."""
        self._lock = threading.Lock()
        self._free = []


_POOL = _BufferPool(kept=2 * _DIRECT_BUFFERS)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget)


class DirectFile:
    """A local file written around the page cache (``O_DIRECT``) from aligned buffers.

    ``write`` copies bytes into one of two page-aligned ``buffer_bytes`` buffers; each full one is
    handed to a writer thread for one ``pwrite`` (which releases the GIL), and the caller goes
    on filling the other. So serializing a checkpoint and writing it overlap, and a save costs
    about the larger of the two rather than their sum. A failed write raises at the caller's
    next ``write``, ``flush`` or ``close``. ``flush`` waits for the writer, writes the partial
    tail padded to the alignment and cuts the file to its true length, keeping the tail buffered
    so later writes rewrite that block. Where the filesystem refuses ``O_DIRECT`` (at a write:
    EINVAL), the file carries on through the page cache, written behind (``WriteBehind``).

    ``cut_on_close``: the file existed (a reused piece) and is written over from offset 0;
    closing it flushes and cuts off what is left of the old content.
    """

    def __init__(self, fd: int, buffer_bytes: int, *, cut_on_close: bool = False) -> None:
        self._fd = fd
        self._direct = _set_direct(fd)
        self._cut_on_close = cut_on_close
        self._behind = WriteBehind(self)  # only used once the file is buffered
        self._size = max(_DIRECT_ALIGN, buffer_bytes - buffer_bytes % _DIRECT_ALIGN)
        self._buffers: list[_Buffer] = []  # allocated as needed: a small file uses one
        self._writes: list[Future[None] | None] = [None] * _DIRECT_BUFFERS
        self._writer: ThreadPoolExecutor | None = None  # started when a first buffer fills
        self._current = 0  # the buffer being filled
        self._filled = 0  # bytes in it
        self._offset = 0  # where its first byte goes in the file (aligned)
        self._closed = False
        self._unflushed = cut_on_close  # a reused file must be cut even if nothing is written
        try:
            self._view_of(0)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        """The file descriptor (for fsync)."""
        return self._fd

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self._offset + self._filled

    def write(self, data: Any) -> int:
        """Copy ``data`` into the buffers; hand each one that fills up to the writer."""
        source = memoryview(data).cast("B")
        self._unflushed = self._unflushed or len(source) > 0
        view = self._buffers[self._current].view
        position = 0
        while position < len(source):
            take = min(len(source) - position, self._size - self._filled)
            view[self._filled : self._filled + take] = source[position : position + take]
            self._filled += take
            position += take
            if self._filled == self._size:
                self._hand_over()
                view = self._view_of(self._current)
        return len(source)

    def flush(self) -> None:
        """Wait for the writer, write the tail (padded to the alignment), cut to the length."""
        if not self._unflushed:
            return  # nothing new: a second flush must not rewrite the tail after an fsync
        self._unflushed = False
        self._wait_all()
        if self._filled:
            view = self._buffers[self._current].view
            padded = -(-self._filled // _DIRECT_ALIGN) * _DIRECT_ALIGN
            view[self._filled : padded] = bytes(padded - self._filled)
            self._write_out(view, padded, self._offset)
        os.ftruncate(self._fd, self.tell())

    def close(self) -> None:
        """Close the file (a file ``cut_on_close`` is flushed and cut first); free the buffers."""
        self._close(finish=self._cut_on_close)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        # after an error nothing more is written: the file is being abandoned
        self._close(finish=kind is None and self._cut_on_close)

    def _close(self, *, finish: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if finish:
                self.flush()
        finally:
            # a write still in flight uses the descriptor and a buffer: let it end first
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            os.close(self._fd)
            self._free()

    def _view_of(self, index: int) -> memoryview:
        """The buffer ``index``, allocated on first use and free of any write in flight."""
        pending = self._writes[index]
        if pending is not None:
            self._writes[index] = None
            pending.result()  # raises the writer's error here, in the caller
        if index == len(self._buffers):
            self._buffers.append(_POOL.take(self._size))
        return self._buffers[index].view

    def _hand_over(self) -> None:
        """Queue the full current buffer for writing; move on to the next one."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="lwckpt-direct-write")
        index = self._current
        self._writes[index] = self._writer.submit(
            self._write_out, self._buffers[index].view, self._size, self._offset
        )
        self._offset += self._size
        self._filled = 0
        self._current = (index + 1) % _DIRECT_BUFFERS

    def _wait_all(self) -> None:
        for index, pending in enumerate(self._writes):
            if pending is not None:
                self._writes[index] = None
                pending.result()

    def _write_out(self, view: memoryview, length: int, offset: int) -> None:
        done = 0
        while done < length:
            done += self._pwrite(view[done:length], offset + done)
        if not self._direct:  # direct writes leave no dirty pages to write back
            self._behind.wrote_up_to(offset + length)

    def _pwrite(self, view: memoryview, offset: int) -> int:
        try:
            return os.pwrite(self._fd, view, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not self._direct:
                raise
        self._go_buffered()  # the filesystem took the flag but refuses the writes
        return os.pwrite(self._fd, view, offset)

    def _go_buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, _flags(self._fd) & ~os.O_DIRECT)
        self._direct = False

    def _free(self) -> None:
        # back to the pool for the next file (no write is in flight any more: ``_close`` waited)
        for buffer in self._buffers:
            _POOL.give(buffer)
        self._buffers.clear()


def _flags(fd: int) -> int:
    return int(fcntl.fcntl(fd, fcntl.F_GETFL))


def _set_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` on for ``fd`` (if not on yet); False where the filesystem refuses it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, _flags(fd) | os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False
    return True


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def create(
    path: str, *, exclusive: bool = True, buffer_bytes: int | None = None
) -> DirectFile | io.BufferedWriter:
    """A new local file to write a checkpoint (or a piece of one) into; the caller fsyncs.

    Direct I/O where ``settings().direct_io`` is on and the filesystem allows it, else buffered
    and written behind. ``exclusive``: fail if ``path`` exists (a temp file's unique name);
    otherwise an existing file is truncated. ``buffer_bytes``: the size of each direct buffer
    (default ``settings().direct_buffer_bytes``).
    """
    flags = _WRITE_FLAGS | (os.O_EXCL if exclusive else os.O_TRUNC)
    if _use_direct():
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o666)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags, 0o666)  # the filesystem refuses O_DIRECT at open
        return DirectFile(fd, buffer_bytes or settings().direct_buffer_bytes)
    file = _WriteBehindFile(os.open(path, flags, 0o666), cut_on_close=False)
    return io.BufferedWriter(file, 1 << 20)


def overwrite(fd: int, *, buffer_bytes: int | None = None) -> DirectFile | io.BufferedRandom:
    """Take ``fd``, an existing file opened read-write, to write over from offset 0.

    Closing the returned file cuts off what is left of the old content; the caller fsyncs.
    ``buffer_bytes`` as for ``create``.
    """
    if _use_direct():
        return DirectFile(fd, buffer_bytes or settings().direct_buffer_bytes, cut_on_close=True)
    return io.BufferedRandom(_WriteBehindFile(fd, cut_on_close=True), 1 << 20)


def _use_direct() -> bool:
    return settings().direct_io and hasattr(os, "O_DIRECT")
