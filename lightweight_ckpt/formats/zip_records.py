"""The record index of a torch zip checkpoint, and CRC32 verification of its records.

``torch.save`` writes a zip archive of uncompressed ("stored") records and puts a CRC32 of each in
the central directory, but ``torch.load`` does not check them (and with ``mmap=True`` cannot), so
a flipped byte inside tensor data loads silently. We read the central directory, locate each
record's bytes, and verify every CRC before a load changes anything. The CRC32 comes from ISA-L
(``isal``, ~25 GB/s with carry-less multiply) and falls back to ``zlib`` (~4 GB/s).
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightweight_ckpt.errors import CorruptCheckpointError, InvalidCheckpointError
from lightweight_ckpt.storage import Source, SourceFile

if TYPE_CHECKING:
    from collections.abc import Callable
from typing import Any

crc32: Callable[[Any, int], int]
try:
    from isal.isal_zlib import crc32 as _isal_crc32

    crc32 = _isal_crc32
except ImportError:  # pragma: no cover - isal ships wheels for every common platform
    import zlib

    crc32 = zlib.crc32

_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_WINDOW_BYTES = 16 * 1024 * 1024
_FUSED_PIECE_BYTES = 1024 * 1024  # fits a core's L2 cache: hashed while still there
CRC_RECORD = ".data/lightweight_ckpt_crc32.json"
"""Our record of CRC32s (written when torch's own zip CRCs are switched off; see torch_writer)."""
OFFSETS_KEY = "__data_offsets__"
"""The key in ``CRC_RECORD`` under which the writer keeps where each record's bytes start."""
_MAX_EXTRA = 0xFFFF  # a local header's name and extra fields are at most this long each
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
"""How a pre-1.6 (non-zip) ``torch.save`` file starts."""


@dataclass(frozen=True)
class Record:
    """One stored record: where its bytes are in the file, how many, and their CRC32."""

    name: str
    offset: int
    size: int
    crc: int


def read_index(source: Source) -> dict[str, Record]:
    """Return ``{record name: Record}`` for a torch zip checkpoint.

    Raises:
        CorruptCheckpointError: the file is empty, truncated, or its directory is damaged.
        InvalidCheckpointError: the file is not a zip archive at all.
    """
    if source.size == 0:
        raise CorruptCheckpointError(f"{source.url}: the file is empty (0 bytes), not a checkpoint")
    try:
        infos = zipfile.ZipFile(SourceFile(source)).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        head = source.read_at(0, 4)
        if head == _LOCAL_SIGNATURE:
            raise CorruptCheckpointError(
                f"{source.url}: truncated or damaged: the archive's directory is unreadable ({err})"
            ) from err
        raise InvalidCheckpointError(
            f"{source.url}: not a torch checkpoint (no zip archive found; {source.size} bytes)"
        ) from err
    table, ours = _our_table(source, infos)
    hints = table.get(OFFSETS_KEY) if table else None
    hints = hints if isinstance(hints, dict) else {}
    records = {
        info.filename: ours
        if ours is not None and info.filename == ours.name
        else _locate(source, info, hints.get(info.filename))
        for info in infos
    }
    if not table:
        return records
    return {
        name: record
        if record.crc or name not in table
        else Record(name, record.offset, record.size, _crc_entry(source, table[name]))
        for name, record in records.items()
    }


def _our_table(
    source: Source, infos: list[zipfile.ZipInfo]
) -> tuple[dict[str, Any] | None, Record | None]:
    """Our CRC32 table (with record offsets) and its own record, if the archive has one."""
    info = next((i for i in infos if i.filename.endswith("/" + CRC_RECORD)), None)
    if info is None:
        return None, None
    ours = _locate(source, info)
    try:
        table = json.loads(source.read_at(ours.offset, ours.size))
    except ValueError as err:
        raise CorruptCheckpointError(f"{source.url}: the CRC32 table is damaged ({err})") from err
    if not isinstance(table, dict):
        raise CorruptCheckpointError(f"{source.url}: the CRC32 table is damaged")
    return table, ours


def _crc_entry(source: Source, value: Any) -> int:
    if not isinstance(value, int):
        raise CorruptCheckpointError(f"{source.url}: the CRC32 table is damaged")
    return value


def _locate(source: Source, info: zipfile.ZipInfo, hint: Any = None) -> Record:
    """Where ``info``'s bytes are: from our table's ``hint`` if it is plausible, else the header.

    A hint saves reading the record's local header (a request per record on object stores).
    A wrong one cannot pass: the bytes it points at must still match the record's CRC32.
    """
    if not 0 <= info.header_offset < source.size:
        raise CorruptCheckpointError(
            f"{source.url}: damaged archive directory: record {info.filename!r} is said to start "
            f"at byte {info.header_offset} of {source.size}"
        )
    if info.compress_type != zipfile.ZIP_STORED:
        raise CorruptCheckpointError(f"{source.url}: record {info.filename!r} has a bad header")
    lowest = info.header_offset + _LOCAL_HEADER.size + len(info.orig_filename.encode())
    if isinstance(hint, int) and lowest <= hint <= lowest + _MAX_EXTRA:
        offset = hint
    else:
        header = source.read_at(info.header_offset, _LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise CorruptCheckpointError(
                f"{source.url}: record {info.filename!r} lies past the end"
            )
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE:
            raise CorruptCheckpointError(f"{source.url}: record {info.filename!r} has a bad header")
        offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if offset + info.file_size > source.size:
        raise CorruptCheckpointError(
            f"{source.url}: truncated: record {info.filename!r} ends past the end of the file"
        )
    return Record(info.filename, offset, info.file_size, info.CRC)


def check_crc(url: str, record: Record, actual: int, entry: str | None = None) -> None:
    """Raise ``CorruptCheckpointError`` naming the record (and state entry) if the CRC differs."""
    if record.crc not in (actual, 0):  # 0: not recorded (torch with compute_crc32 off)
        where = f"record {record.name!r}" + (f" (state entry {entry!r})" if entry else "")
        raise CorruptCheckpointError(
            f"{url}: checksum mismatch in {where}: stored CRC32 {record.crc:08x}, "
            f"data has {actual:08x}. The file is corrupt; load an earlier checkpoint."
        )


def require_extent(source: Source, record: Record, end: int) -> None:
    """Raise unless the file still reaches ``end``: a mapped page past a new end is SIGBUS.

    Raises:
        CorruptCheckpointError: another writer truncated or rewrote the file in place.
    """
    if source.current_size() < end:
        raise CorruptCheckpointError(
            f"{source.url}: the file shrank to {source.current_size()} bytes while record "
            f"{record.name!r} was read: another writer truncated or rewrote it in place. "
            "Tensors already filled may hold partial data; load again once it is complete."
        )


def crc_of_map(source: Source, mapped: mmap.mmap, record: Record, release: bool) -> int:
    """CRC32 of a record of ``source`` read through its memory map, window by window.

    With ``release``, each window's pages are dropped from this process after hashing, so
    verifying data that is then read elsewhere does not grow the resident set. The file's size
    is checked before each window: a mapped page past a new end raises SIGBUS, which would kill
    the process, so a file truncated by another writer raises our error instead.

    Raises:
        CorruptCheckpointError: the file shrank below the record's end.
    """
    view = memoryview(mapped)
    value = 0
    try:
        for start in range(record.offset, record.offset + record.size, _WINDOW_BYTES):
            end = min(start + _WINDOW_BYTES, record.offset + record.size)
            require_extent(source, record, end)
            value = crc32(view[start:end], value)
            if release:
                aligned = start - start % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
    finally:
        view.release()
    return value


def crc_of_source(source: Source, record: Record, buffer: bytearray) -> int:
    """CRC32 of a record read through ``source`` with a reusable bounce ``buffer``."""
    value = 0
    view = memoryview(buffer)
    for start in range(record.offset, record.offset + record.size, len(buffer)):
        piece = view[: min(len(buffer), record.offset + record.size - start)]
        source.readinto_at(start, piece)
        value = crc32(piece, value)
    return value


def crc_into(source: Source, record: Record, view: memoryview) -> int:
    """Read a record into ``view`` and return its CRC32, in one pass over memory.

    Each piece is hashed right after it lands, while it is still in the CPU cache, so copying
    and verifying cost about one copy, not a copy plus a second pass over memory.
    """
    value = 0
    for start in range(0, record.size, _FUSED_PIECE_BYTES):
        piece = view[start : min(start + _FUSED_PIECE_BYTES, record.size)]
        source.readinto_at(record.offset + start, piece)
        value = crc32(piece, value)
    return value


def verify_records(source: Source) -> list[tuple[Record, str | None]]:
    """Check every record's CRC32, record by record, with bounded memory.

    Returns ``[(record, None if intact else the problem)]``.

    Raises:
        CorruptCheckpointError: the archive's directory itself is unreadable.
        InvalidCheckpointError: not a zip archive.
    """
    records = read_index(source)
    mapped = source.map()
    bounce = bytearray(min(_WINDOW_BYTES, max(r.size for r in records.values()) or 1))
    results: list[tuple[Record, str | None]] = []
    for record in records.values():
        if mapped is not None:
            actual = crc_of_map(source, mapped, record, release=True)
        else:
            actual = crc_of_source(source, record, bounce)
        problem = None
        if record.crc not in (actual, 0):
            problem = f"CRC32 mismatch: stored {record.crc:08x}, data has {actual:08x}"
        results.append((record, problem))
    if mapped is not None:
        mapped.close()
    return results
