"""CRC32 records for sharded (DCP) checkpoints: one checksum per stored item, beside each piece.

DCP's pieces carry no checksums, so a flipped bit inside one would load silently. We add them
without changing the format (stock DCP readers ignore the extra files):

- **Write.** Every chunk a rank writes into a piece is CRC32'd as it goes (ISA-L, the same
  ``crc32`` as single files: ``formats.zip_records``); when the piece is complete the chunks are
  combined into one CRC per stored item (DCP's ``(offset, length)`` ranges) and written to
  ``<piece>.crc32`` (JSON) in the same version folder. This happens on every rank before the
  commit, so the records are published atomically with ``.metadata``. ``.metadata`` is marked
  (``storage_meta.modules`` holds ``MARKER``), so a missing record is damage, not an old
  checkpoint.
- **Load.** A rank verifies exactly the stored items it is about to read, before DCP reads any of
  them (``dcp_dir``'s reader does it in ``prepare_local_plan``; DCP gathers that step's failures
  from every rank before any rank reads data, so all ranks raise and nothing is loaded).
- **Old checkpoints** (no mark) load unverified; the reader logs that it could not verify them.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
from typing import TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CorruptCheckpointError
from lightweight_ckpt.formats.ranges import crc32_combine
from lightweight_ckpt.formats.zip_records import Record, crc32, crc_of_map, crc_of_source
from lightweight_ckpt.storage import (
    Location,
    call_with_retries,
    create_local_file,
    open_source,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from contextlib import AbstractContextManager

    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    from lightweight_ckpt.storage import Sink

MARKER = "lightweight_ckpt.crc32/1"
"""In ``Metadata.storage_meta.modules``: every piece of this checkpoint has a checksum record."""
SUFFIX = ".crc32"
_FORMAT = 1
_BOUNCE_BYTES = 16 * 1024 * 1024


def record_path(piece: str) -> str:
    """Return the path of ``piece``'s checksum record."""
    return piece + SUFFIX


def is_checksummed(metadata: Metadata) -> bool:
    """Return True if the checkpoint was written with checksum records."""
    storage_meta = getattr(metadata, "storage_meta", None)
    return MARKER in (getattr(storage_meta, "modules", None) or [])


# -- write --------------------------------------------------------------------------------------


class ChecksummedStream:
    """A binary stream that records ``(offset, length, CRC32)`` of every chunk written to it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._position = 0
        self.chunks: list[tuple[int, int, int]] = []
        self.seeked = False  # then chunk offsets are unknown: the record re-reads the piece

    def write(self, data: Any) -> int:
        """Write ``data`` and record its CRC32."""
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        written = self._stream.write(view)
        count = len(view) if written is None else int(written)
        self.chunks.append((self._position, count, crc32(view[:count], 0)))
        self._position += count
        return count

    def flush(self) -> None:
        """Do nothing: DCP flushes after every item, and a direct file's flush writes its tail.

        The bytes are pushed down once, by ``close``.
        """

    def close(self) -> None:
        """Push the written bytes down; the opener closes the stream (and commits or cuts it)."""
        self._stream.flush()

    def seek(self, *args: Any) -> int:
        """Seek (then the recorded chunks no longer give item CRCs)."""
        self.seeked = True
        return int(self._stream.seek(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _UploadStream:
    """A piece's staged upload as DCP's stream: DCP closes it inside the block, we commit after."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: Any) -> int:
        """Write ``data`` into the upload."""
        return self._sink.write(data)

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self._sink.tell()

    def flush(self) -> None:
        """Push buffered bytes down (full parts are already on their way)."""
        self._sink.flush()

    def close(self) -> None:
        """Do nothing: the upload commits when the stream's block exits cleanly."""


class ChecksumRecorder:
    """Wrap DCP's ``FileSystem``: every stream opened for writing records its chunks' CRCs.

    ``reuse(path)``: an existing file moved to ``path`` and opened for an in-place overwrite,
    or None (then a fresh file is written); closing it cuts it where the writes stopped.
    ``upload(path)``: a staged write of ``path`` (``storage.staged_write``), used instead of
    DCP's ``fs.open`` for every piece and record: committed when the block exits cleanly,
    discarded (an aborted upload) when it raises.
    """

    def __init__(
        self,
        fs: Any,
        reuse: Callable[[str], AbstractContextManager[Any] | None] | None = None,
        upload: Callable[[str], AbstractContextManager[Sink]] | None = None,
    ) -> None:
        self.inner = fs
        self._reuse = reuse
        self.upload = upload
        self._lock = threading.Lock()  # DCP may write pieces from several threads
        self.streams: dict[str, ChecksummedStream] = {}
        self.reused: list[str] = []

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        """Open ``path``; a stream for writing records its chunks' CRCs."""
        if "w" in mode and self.upload is not None:
            with self.upload(os.fspath(path)) as sink:
                yield self._recorded(path, _UploadStream(sink))
            return
        reused = self._reuse(os.fspath(path)) if self._reuse and "w" in mode else None
        if reused is not None:
            with reused:  # closing it cleanly cuts off the old file's tail
                yield self._recorded(path, reused)
            return
        if "w" in mode and isinstance(self.inner.fs, LocalFileSystem):
            # around the page cache where possible, else written behind (``storage``)
            buffer_bytes = settings().piece_buffer_bytes
            with create_local_file(
                os.fspath(path), exclusive=False, buffer_bytes=buffer_bytes
            ) as local:
                yield self._recorded(path, local)
                local.flush()  # no-op if DCP closed the stream (it does)
            return
        with self.inner.create_stream(path, mode) as stream:
            yield self._recorded(path, stream) if "w" in mode else stream

    def _recorded(self, path: Any, stream: Any) -> ChecksummedStream:
        recorded = ChecksummedStream(stream)
        with self._lock:
            self.streams[os.fspath(path)] = recorded
        return recorded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _combine(chunks: list[tuple[int, int, int]], start: int | None, length: int) -> int | None:
    """CRC32 of ``length`` bytes from chunk ``start`` on, if whole chunks tile them, else None."""
    if length == 0:
        return 0
    if start is None:
        return None
    value, covered = 0, 0
    for _, count, crc in chunks[start:]:
        if covered + count > length:
            return None
        value = crc if covered == 0 else crc32_combine(value, crc, count)
        covered += count
        if covered == length:
            return int(value)
    return None


def _crc_of_range(fs: Any, path: str, offset: int, length: int) -> int:
    value = 0
    for start in range(offset, offset + length, _BOUNCE_BYTES):
        end = min(start + _BOUNCE_BYTES, offset + length)
        value = crc32(fs.cat_file(path, start=start, end=end), value)
    return value


def write_records(recorder: ChecksumRecorder, root: Any, results: Iterable[WriteResult]) -> None:
    """Write ``<piece>.crc32`` for every piece in ``results`` (this rank's); make both durable.

    Records are written before anything is synced, so on local disk one journal commit (the
    first fsync) carries pieces and records alike and the later fsyncs find little to do.
    """
    items: dict[str, list[tuple[int, int]]] = {}
    for result in results:
        info = result.storage_data
        items.setdefault(info.relative_path, []).append((int(info.offset), int(info.length)))
    written = []
    for relative, ranges in items.items():
        path = os.fspath(recorder.concat_path(root, relative))
        data = json.dumps(_record(recorder, path, ranges)).encode()
        opener = recorder.upload or (lambda name: recorder.inner.create_stream(name, "wb"))
        with opener(record_path(path)) as sink:
            sink.write(data)
        written += [path, record_path(path)]
    if isinstance(recorder.fs, LocalFileSystem):  # object stores: durable once closed
        for path in written:
            _fsync(path)


def _record(recorder: ChecksumRecorder, path: str, ranges: list[tuple[int, int]]) -> Any:
    stream = recorder.streams.get(path)
    chunks = [] if stream is None or stream.seeked else stream.chunks
    first_chunk_at: dict[int, int] = {}
    for index, (position, _, _) in enumerate(chunks):
        first_chunk_at.setdefault(position, index)
    rows = []
    for offset, length in sorted(ranges):
        crc = _combine(chunks, first_chunk_at.get(offset), length)
        if crc is None:  # not recorded while writing: read it back
            crc = _crc_of_range(recorder.fs, path, offset, length)
        rows.append([offset, length, crc])
    size = sum(count for _, count, _ in chunks) if chunks else int(recorder.fs.size(path))
    return {"format": _FORMAT, "size": size, "items": rows}


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- verify -------------------------------------------------------------------------------------


_PARSED: dict[tuple[str, ...], dict[str, Any]] = {}
"""Parsed records by (filesystem, path, size, modification stamp): readers that fetch one tensor
per call (``consolidate``, entry by entry) would otherwise parse a whole record per tensor. A
changed file has a new stamp, so a stale entry is never used."""
_PARSED_MAX = 16
_PARSED_LOCK = threading.Lock()


def read_record(location: Location, relative: str) -> dict[str, Any]:
    """Return the checksum record of the piece at ``relative`` (to the checkpoint's root).

    Remote reads are retried on transient faults.

    Raises:
        CorruptCheckpointError: the record is missing or unreadable.
        CheckpointReadError: the store failed for good (after retries), or refused access.
    """
    path = record_path(posixpath.join(location.path, relative))
    try:
        info = call_with_retries(location.url, "reading", lambda: location.fs.info(path))
        stamp = info.get("mtime", info.get("ETag", info.get("LastModified", info.get("created"))))
        key = (location.protocol, path, str(info.get("size")), str(stamp))
        if stamp is not None and key in _PARSED:
            return _PARSED[key]
        record = json.loads(
            call_with_retries(location.url, "reading", lambda: _read(location, path))
        )
        rows = {int(offset): (int(length), int(crc)) for offset, length, crc in record["items"]}
        parsed = {"size": int(record["size"]), "items": rows}
    except FileNotFoundError as err:
        raise CorruptCheckpointError(
            f"{location.url}: the checksum record of piece {relative} is missing "
            f"({record_path(relative)}); the checkpoint is damaged. Load an earlier checkpoint."
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(
            f"{location.url}: the checksum record of piece {relative} is unreadable: {err}"
        ) from err
    if stamp is not None:
        with _PARSED_LOCK:
            while len(_PARSED) >= _PARSED_MAX:
                _PARSED.pop(next(iter(_PARSED)))
            _PARSED[key] = parsed
    return parsed


def _read(location: Location, path: str) -> bytes:
    with location.fs.open(path, "rb") as file:
        return bytes(file.read())


def check_items(location: Location, relative: str, wanted: list[tuple[str, int, int]]) -> list[str]:
    """Return problems with the stored items ``[(name, offset, length)]`` of one piece.

    Raises:
        CorruptCheckpointError: the piece's checksum record is missing or unreadable.
    """
    record = read_record(location, relative)
    piece = Location(location.fs, posixpath.join(location.path, relative), location.url)
    source = open_source(piece)
    problems = []
    try:
        if source.size != record["size"]:
            problems.append(
                f"{relative}: {source.size} bytes, its checksum record says {record['size']}"
            )
        mapped = source.map()
        bounce = None if mapped is not None else bytearray(_BOUNCE_BYTES)
        for name, offset, length in wanted:
            expected = record["items"].get(offset)
            if expected is None or expected[0] != length:
                problems.append(f"{relative}: entry {name!r} has no checksum (bytes {offset}+)")
                continue
            if offset + length > source.size:
                problems.append(f"{relative}: entry {name!r} is cut off (truncated piece)")
                continue
            stored = Record(relative, offset, length, expected[1])
            if mapped is not None:
                actual = crc_of_map(source, mapped, stored, release=True)
            else:
                actual = crc_of_source(source, stored, bounce or bytearray(_BOUNCE_BYTES))
            if actual != stored.crc:
                problems.append(
                    f"{relative}: entry {name!r} (bytes {offset}-{offset + length}): stored "
                    f"CRC32 {stored.crc:08x}, data has {actual:08x}"
                )
        if mapped is not None:
            mapped.close()
    finally:
        source.close()
    return problems


def by_piece(items: Iterable[tuple[MetadataIndex, Any]]) -> dict[str, list[tuple[str, int, int]]]:
    """Group stored items ``[(index, storage info)]`` as ``{piece: [(name, offset, length)]}``."""
    pieces: dict[str, dict[int, tuple[str, int, int]]] = {}
    for index, info in items:
        entry = (str(index.fqn), int(info.offset), int(info.length))
        pieces.setdefault(info.relative_path, {}).setdefault(entry[1], entry)
    return {
        relative: sorted(rows.values(), key=lambda row: row[1]) for relative, rows in pieces.items()
    }


def verify_items(location: Location, items: Iterable[tuple[MetadataIndex, Any]]) -> None:
    """Check the CRC32 of the stored items ``[(index, storage info)]`` before they are read.

    Raises:
        CorruptCheckpointError: naming the path and every damaged piece and entry.
    """
    problems = []
    for relative, wanted in sorted(by_piece(items).items()):
        problems += check_items(location, relative, wanted)
    if problems:
        raise CorruptCheckpointError(
            f"{location.url}: damaged sharded checkpoint (checksum mismatch): "
            f"{'; '.join(problems)}. Load an earlier checkpoint."
        )


def check_all(location: Location, storage_data: Mapping[MetadataIndex, Any]) -> list[str]:
    """Return problems with every stored item in ``storage_data`` (for ``verify``)."""
    problems = []
    for relative, wanted in sorted(by_piece(storage_data.items()).items()):
        problems += _problems_of(location, relative, wanted)
    return problems


def _problems_of(
    location: Location, relative: str, wanted: list[tuple[str, int, int]]
) -> list[str]:
    try:
        return check_items(location, relative, wanted)
    except (CorruptCheckpointError, FileNotFoundError) as err:
        return [f"{relative}: {err}"]
