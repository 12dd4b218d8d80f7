"""Reading zip records from remote sources as a few parallel streams, and the local spool.

A remote checkpoint (s3://, gs://, ...) is read as ranges of at most ``chunk_bytes``, whichever
records they belong to; neighbouring small records share one range (``plan_ranges``). The ranges
are then cut into about ``io_threads`` contiguous *spans* of equal size (``plan_spans``), and each
span is read by one thread as one stream (``Source.stream``: a single ranged GET on S3), range by
range into a reused ``chunk_bytes`` buffer, or straight into a target tensor's memory. So a load
makes a handful of requests whatever its size, and holds ``io_threads * chunk_bytes`` bytes
beyond its targets. Each record's CRC32 is combined from its ranges' (``crc32_combine``).
Bytes bound for the caller's tensors may go to a *spool*: an unnamed local temporary file
(``LWCKPT_SPOOL_DIR``) that holds verified bytes until every CRC passed, so each byte crosses the
network once without a second copy of the state in memory (``open_spool``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from lightweight_ckpt.config import settings
from lightweight_ckpt.formats.zip_records import Record, crc32

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from lightweight_ckpt.storage import RangeStream, Source

_CRC32_POLY = 0xEDB88320

_isal_combine: Callable[[int, int, int], int] | None
try:
    from isal.isal_zlib import crc32_combine as _isal_crc32_combine

    _isal_combine = _isal_crc32_combine
except ImportError:  # pragma: no cover - isal < 1.7
    _isal_combine = None


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def crc32_combine(first: int, second: int, second_len: int) -> int:
    """CRC32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    if _isal_combine is not None:
        return int(_isal_combine(first, second, second_len))
    return _crc32_combine_py(first, second, second_len)  # pragma: no cover


def _crc32_combine_py(first: int, second: int, second_len: int) -> int:  # pragma: no cover
    """Apply (zlib's ``crc32_combine``) ``second_len`` zero bytes to ``first`` by squaring."""
    odd = [_CRC32_POLY] + [1 << (n - 1) for n in range(1, 32)]
    even = [_gf2_times(odd, row) for row in odd]
    odd = [_gf2_times(even, row) for row in even]
    while second_len > 0:
        even = [_gf2_times(odd, row) for row in odd]
        if second_len & 1:
            first = _gf2_times(even, first)
        second_len >>= 1
        if not second_len:
            break
        odd = [_gf2_times(even, row) for row in even]
        if second_len & 1:
            first = _gf2_times(odd, first)
        second_len >>= 1
    return first ^ second


_GAP_BYTES = 64 * 1024  # records closer than this share a range (zip headers, small records)


@dataclass(frozen=True)
class _Piece:
    """Part of one record inside a fetched range: which record, where in it, how long."""

    index: int
    start: int
    size: int


def plan_ranges(
    records: Sequence[tuple[Record, memoryview | None]], step: int
) -> list[tuple[int, int, list[_Piece]]]:
    """Cover every record with ``(offset, size, pieces)`` ranges of at most ``step`` bytes.

    Large records are split; neighbouring small ones (a model's biases, AdamW's ``step``
    scalars) share one request, so a checkpoint of many small tensors costs few round trips.
    """
    ranges: list[tuple[int, int, list[_Piece]]] = []
    order = sorted(range(len(records)), key=lambda i: records[i][0].offset)
    for index in order:
        record = records[index][0]
        for start in range(0, record.size, step):
            size = min(step, record.size - start)
            offset = record.offset + start
            if ranges:
                first, length, pieces = ranges[-1]
                end = offset + size
                if 0 <= offset - (first + length) <= _GAP_BYTES and end - first <= step:
                    pieces.append(_Piece(index, start, size))
                    ranges[-1] = (first, end - first, pieces)
                    continue
            ranges.append((offset, size, [_Piece(index, start, size)]))
    return ranges


_SPAN_GAP_BYTES = 1 << 20  # a longer gap between wanted ranges starts a new request


def plan_spans(
    ranges: Sequence[tuple[int, int, list[_Piece]]], streams: int
) -> list[list[tuple[int, int, list[_Piece]]]]:
    """Group sorted ``ranges`` into about ``streams`` contiguous spans of similar byte counts.

    A gap over ``_SPAN_GAP_BYTES`` between two ranges (records left out of the read) also
    starts a new span, so a stream never downloads much that nobody wants.
    """
    total = sum(size for _, size, _ in ranges)
    target = max(1, -(-total // max(1, streams)))
    spans: list[list[tuple[int, int, list[_Piece]]]] = []
    filled = 0
    for task in ranges:
        if spans:
            last_offset, last_size, _ = spans[-1][-1]
            gap = task[0] - (last_offset + last_size)
            if filled < target and 0 <= gap <= _SPAN_GAP_BYTES:
                spans[-1].append(task)
                filled += task[1]
                continue
        spans.append([task])
        filled = task[1]
    return spans


def ranged_crcs(
    source: Source,
    records: Sequence[tuple[Record, memoryview | None]],
    spool: tuple[int, set[int]] | None = None,
) -> list[int]:
    """CRC32 of each record, read as about ``io_threads`` streams of ``chunk_bytes`` pieces.

    A record with a view is copied into it (read straight into it where a range is one piece
    of it); one whose index is in ``spool``'s set is written to the spool file descriptor at its
    offset in the source; any other is hashed and its bytes dropped. Each stream holds one
    ``chunk_bytes`` buffer, whatever the records' sizes.
    """
    tunables = settings()
    step = tunables.chunk_bytes
    threads = max(1, tunables.io_threads)
    spans = plan_spans(plan_ranges(records, step), threads)

    def read_span(span: list[tuple[int, int, list[_Piece]]]) -> list[tuple[_Piece, int]]:
        start = span[0][0]
        stream = source.stream(start, span[-1][0] + span[-1][1] - start)
        buffer = memoryview(bytearray(min(step, max(size for _, size, _ in span))))
        out: list[tuple[_Piece, int]] = []
        try:
            position = start
            for offset, size, pieces in span:
                while position < offset:  # a gap: headers of records nobody asked for
                    skip = buffer[: min(len(buffer), offset - position)]
                    stream.readinto(skip)
                    position += len(skip)
                out += _read_range(stream, records, (offset, size, pieces), buffer, spool)
                position = offset + size
        finally:
            stream.close()
        return out

    pool = ThreadPoolExecutor(min(threads, len(spans)) or 1, thread_name_prefix="lwckpt-range")
    try:
        done = [part for parts in pool.map(read_span, spans) for part in parts]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    crcs = [0] * len(records)
    for piece, value in sorted(done, key=lambda pair: (pair[0].index, pair[0].start)):
        crcs[piece.index] = crc32_combine(crcs[piece.index], value, piece.size)
    return crcs


def _read_range(
    stream: RangeStream,
    records: Sequence[tuple[Record, memoryview | None]],
    task: tuple[int, int, list[_Piece]],
    buffer: memoryview,
    spool: tuple[int, set[int]] | None,
) -> list[tuple[_Piece, int]]:
    """Read one planned range from ``stream`` and hand each piece to its record's destination."""
    offset, size, pieces = task
    only = records[pieces[0].index][1] if len(pieces) == 1 else None
    if only is not None:  # one piece of a target: straight into its memory, no copy
        piece = pieces[0]
        target = only[piece.start : piece.start + piece.size]
        stream.readinto(target)
        return [(piece, crc32(target, 0))]
    data = buffer[:size]
    stream.readinto(data)
    out = []
    for piece in pieces:
        at = records[piece.index][0].offset + piece.start - offset
        chunk = data[at : at + piece.size]
        view = records[piece.index][1]
        if view is not None:
            view[piece.start : piece.start + piece.size] = chunk
        elif spool is not None and piece.index in spool[1]:
            pwrite_all(spool[0], chunk, offset + at)
        out.append((piece, crc32(chunk, 0)))
    return out


_RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


def _filesystem_type(directory: str) -> str:
    """The type of the filesystem ``directory`` lives on, from ``/proc/mounts`` ("" if unknown)."""
    best, kind = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        real = os.path.realpath(directory)
        for line in mounts:
            _device, point, fstype, *_ = [*line.split(), "", "", ""]
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if point and inside and len(point) > len(best):
                best, kind = point, fstype
    return kind


def open_spool(nbytes: int) -> IO[bytes] | None:
    """An unnamed temporary file for ``nbytes`` of verified data, or None where none fits."""
    configured = settings().spool_dir
    if configured.lower() == "none":
        return None
    directory = configured or tempfile.gettempdir()
    try:
        if _filesystem_type(directory) in _RAM_FILESYSTEMS:
            return None  # a spool there would be a second copy of the state in RAM
        if shutil.disk_usage(directory).free < nbytes + (256 << 20):
            return None
        return tempfile.TemporaryFile(dir=directory)
    except OSError:
        return None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def preadv_all(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill all of ``buffer`` from ``offset``; a spool that ends early is an ``OSError``."""
    while buffer:
        read = os.preadv(fd, [buffer], offset)
        if read <= 0:
            raise OSError(f"spool ended early at offset {offset}")
        buffer, offset = buffer[read:], offset + read
