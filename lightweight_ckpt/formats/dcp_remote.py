"""Sharded (DCP) checkpoints on object stores: items verified in parallel streams, fetched once.

DCP's fsspec reader streams each piece through one fsspec file, item after item. Here, on every
filesystem but the local disk (``dcp_reader.SafeFsspecReader``):

- **Verify first, in parallel.** Before any rank reads (DCP's ``prepare_local_plan`` step, whose
  failures reach every rank), the stored items a rank reads are fetched from each piece as about
  ``io_threads`` parallel streams (``formats.ranges``: one ranged GET per stream on S3,
  successive ``chunk_bytes`` ranges elsewhere; a stream cut short resumes where it broke, within
  the retry policy) and their CRC32 checked against the piece's record. A piece whose wanted
  items total at most ``chunk_bytes`` (while the memory budget ``KEEP_BYTES`` lasts) is fetched
  into memory in one retried ranged read of their span (or item by item, in parallel, where
  they lie far apart): no stream set-up for readers that fetch one item per call, such as
  ``consolidate``.
- **Fetched once.** The verified bytes go to a *spool*, an unnamed local temporary file per
  piece (``LWCKPT_SPOOL_DIR``; ``ranges.open_spool``), at their offsets in the piece. Where no
  spool can be had, up to ``KEEP_BYTES`` of them stay in memory and the rest are dropped and
  fetched again when read, CRC-checked again before they are used.
- **Straight into the targets.** The read then parses each tensor item from its verified bytes
  and copies its data into the target (``dcp_reader.read_tensor_item``: ``preadv`` from the
  spool), on ``io_threads`` threads; non-tensor values and unusual items go through DCP's own
  steps (``read_item``).

Writes: ``dcp_dir``'s writer streams each piece through ``storage.staged_write`` (parallel
multipart parts, bounded memory, aborted on failure) and retries a rank's pieces as a whole.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CorruptCheckpointError
from lightweight_ckpt.formats import ranges
from lightweight_ckpt.formats.dcp_checksums import by_piece, read_record
from lightweight_ckpt.formats.zip_records import Record, crc32
from lightweight_ckpt.storage import Location, call_with_retries, open_source

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

KEEP_BYTES = 256 << 20
"""Verified item bytes a rank holds in memory where no spool can be had (more: fetched again)."""


class FetchedItems:
    """Stored items of one checkpoint on an object store: fetched, verified, held for the read.

    ``held(relative, offset)`` says where an item's verified bytes are: a spool file descriptor
    (the bytes at their offset in the piece), the bytes themselves, or None (fetch again).
    """

    def __init__(self, location: Location, keep_bytes: int | None = None) -> None:
        self.location = location
        self.keep_bytes = KEEP_BYTES if keep_bytes is None else keep_bytes
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, int], memoryview] = {}
        self._kept_bytes = 0
        self._spools: dict[str, IO[bytes]] = {}
        self._spooled: dict[tuple[str, int], int] = {}
        self._crcs: dict[tuple[str, int], int] = {}
        self.fetches = 0

    def fetch(self, relative: str, offset: int, length: int) -> bytes:
        """Download one stored item (retried on transient faults, a short body included).

        A piece shorter than its items is refused before any read (``require_pieces``), so a
        short body here is a connection cut short.
        """
        piece = posixpath.join(self.location.path, relative)

        def attempt() -> bytes:
            with self._lock:
                self.fetches += 1
            data: bytes = self.location.fs.cat_file(piece, start=offset, end=offset + length)
            if len(data) != length:
                raise http.client.IncompleteRead(data, length - len(data))
            return data

        return call_with_retries(self.location.url, "reading", attempt)

    def verify(self, items: Iterable[tuple[MetadataIndex, Any]]) -> None:
        """Fetch and check the CRC32 of every stored item in ``items``; hold the bytes.

        Raises:
            CorruptCheckpointError: naming the path and every damaged piece and entry.
        """
        problems = []
        for relative, wanted in sorted(by_piece(items).items()):
            problems += self._verify_piece(relative, wanted)
        if problems:
            self.release()
            raise CorruptCheckpointError(
                f"{self.location.url}: damaged sharded checkpoint (checksum mismatch): "
                f"{'; '.join(problems)}. Load an earlier checkpoint."
            )

    def _verify_piece(self, relative: str, wanted: list[tuple[str, int, int]]) -> list[str]:
        record = read_record(self.location, relative)
        problems: list[str] = []
        checked: list[Record] = []
        for name, offset, length in wanted:
            expected = record["items"].get(offset)
            if expected is None or expected[0] != length:
                problems.append(f"{relative}: entry {name!r} has no checksum (bytes {offset}+)")
                continue
            checked.append(Record(name, offset, length, expected[1]))
            self._crcs[relative, offset] = expected[1]
        actual: list[int | None]
        total = sum(item.size for item in checked)
        if checked and total <= settings().chunk_bytes and self._fits(total):
            actual = self._fetch_small(relative, checked)
        else:
            actual = self._stream_piece(relative, checked, record["size"], problems)
        for item, crc in zip(checked, actual, strict=True):
            if crc is not None and crc != item.crc:
                self._forget(relative, item.offset)
                problems.append(
                    f"{relative}: entry {item.name!r} (bytes {item.offset}-"
                    f"{item.offset + item.size}): stored CRC32 {item.crc:08x}, data has {crc:08x}"
                )
        return problems

    def _fetch_small(self, relative: str, checked: list[Record]) -> list[int | None]:
        """Fetch a few small items: their span in one read, or each on its own, in parallel."""
        start = min(item.offset for item in checked)
        end = max(item.offset + item.size for item in checked)
        if end - start <= 2 * sum(item.size for item in checked):  # neighbours (the usual case)
            span = memoryview(self.fetch(relative, start, end - start))
            views = [span[i.offset - start : i.offset - start + i.size] for i in checked]
        else:
            threads = max(1, min(settings().io_threads, len(checked)))
            with ThreadPoolExecutor(threads, thread_name_prefix="lwckpt-get") as pool:
                views = list(
                    pool.map(lambda i: memoryview(self.fetch(relative, i.offset, i.size)), checked)
                )
        for item, view in zip(checked, views, strict=True):
            self._keep(relative, item.offset, view)
        return [crc32(view, 0) for view in views]

    def _stream_piece(
        self, relative: str, checked: list[Record], recorded_size: int, problems: list[str]
    ) -> list[int | None]:
        """Stream one piece's ``checked`` items through their CRC32 (into a spool, or memory)."""
        piece = Location(
            self.location.fs,
            posixpath.join(self.location.path, relative),
            posixpath.join(self.location.url, relative),
        )
        source = open_source(piece)
        try:
            if source.size != recorded_size:
                problems.append(
                    f"{relative}: {source.size} bytes, its checksum record says {recorded_size}"
                )
                return [None] * len(checked)
            spool = ranges.open_spool(sum(item.size for item in checked))
            views: list[memoryview | None] = [None] * len(checked)
            if spool is None:  # hold what fits in memory; the rest is fetched again when read
                for index, item in enumerate(checked):
                    if self._fits(item.size):
                        view = memoryview(bytearray(item.size))
                        views[index] = view
                        self._keep(relative, item.offset, view)
            else:
                self._spools[relative] = spool
                for item in checked:
                    self._spooled[relative, item.offset] = spool.fileno()
            everything = (spool.fileno(), set(range(len(checked)))) if spool else None
            crcs = ranges.ranged_crcs(source, list(zip(checked, views, strict=True)), everything)
        finally:
            source.close()
        return list(crcs)

    def _fits(self, nbytes: int) -> bool:
        with self._lock:
            return self._kept_bytes + nbytes <= self.keep_bytes

    def _keep(self, relative: str, offset: int, data: memoryview) -> None:
        with self._lock:
            self._kept[relative, offset] = data
            self._kept_bytes += len(data)

    def _forget(self, relative: str, offset: int) -> None:
        with self._lock:
            data = self._kept.pop((relative, offset), None)
            self._kept_bytes -= 0 if data is None else len(data)
            self._spooled.pop((relative, offset), None)

    def held(self, relative: str, offset: int) -> int | memoryview | None:
        """Where the verified bytes of one item are: a spool's descriptor, the bytes, or None."""
        with self._lock:
            fd = self._spooled.get((relative, offset))
            return fd if fd is not None else self._kept.get((relative, offset))

    def take(self, relative: str, offset: int, length: int) -> memoryview:
        """Return one item's verified bytes: held (spool or memory), else fetched and checked.

        Raises:
            CorruptCheckpointError: an item fetched again no longer matches its CRC32 (the
                piece changed since it was verified).
        """
        where = self.held(relative, offset)
        if isinstance(where, int):
            data = memoryview(bytearray(length))
            ranges.preadv_all(where, data, offset)
            return data
        if where is not None:
            return where
        data = memoryview(self.fetch(relative, offset, length))
        expected = self._crcs.get((relative, offset))
        actual = crc32(data, 0)
        if expected is not None and actual != expected:
            raise CorruptCheckpointError(
                f"{self.location.url}: piece {relative} changed while it was loaded (entry at "
                f"bytes {offset}-{offset + length}: CRC32 {expected:08x} when verified, "
                f"{actual:08x} now). Some tensors may hold its data; load again."
            )
        return data

    def release(self) -> None:
        """Drop every held byte (after the read, or when the load is abandoned)."""
        with self._lock:
            spools = list(self._spools.values())
            self._spools.clear()
            self._spooled.clear()
            self._kept.clear()
            self._kept_bytes = 0
        for spool in spools:
            with contextlib.suppress(OSError):
                spool.close()

    def __del__(self) -> None:
        self.release()


def read_item(
    request: ReadItem, info: Any, data: Any, planner: LoadPlanner, transforms: Any
) -> None:
    """Hand one stored item's bytes to the planner, as DCP's ``read_data`` does for each item."""
    stream = transforms.transform_load_stream(
        request, getattr(info, "transform_descriptors", None) or (), io.BytesIO(data)
    )
    if request.type == LoadItemType.BYTE_IO:
        planner.load_bytes(request, io.BytesIO(stream.read(-1)))
        return
    seekable = stream if stream.seekable() else io.BytesIO(stream.read(-1))
    tensor = torch.load(seekable, map_location="cpu", weights_only=True)  # noqa: TID251 - a stored item, as DCP reads it
    tensor = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
    target = planner.resolve_tensor(request).detach()
    if target.size() != tensor.size():
        raise CorruptCheckpointError(
            f"stored item {request.storage_index} has shape {tuple(tensor.size())}, "
            f"the checkpoint's metadata says {tuple(target.size())}"
        )
    target.copy_(tensor)
    planner.commit_tensor(request, target)
