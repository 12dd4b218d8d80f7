"""Sharded (DCP) checkpoints on object stores: whole-item reads, retried, downloaded once.

DCP's fsspec reader streams each piece through one fsspec file, so a transient fault mid-load
failed the load (translated into our error, never retried), and verifying checksums before the
read downloaded every item a rank reads twice. Here, on every filesystem but the local disk:

- **Whole items.** Each stored item is fetched with one ranged read (``cat_file``) through
  ``storage.call_with_retries``: fetching a whole item again is always safe, and a fault costs
  one item, not the load.
- **Verified once.** Before any rank reads (DCP's ``prepare_local_plan`` step, whose failures
  reach every rank), the items are fetched and their CRC32 checked against the piece's record;
  up to ``KEEP_BYTES`` of them are kept, and the read then takes those instead of downloading
  them again. Items beyond that budget are fetched again when read (bounded memory).
- The read itself repeats DCP's ``FileSystemReader.read_data`` for one item from its bytes:
  load transforms, ``torch.load(weights_only=True)`` for tensors, the planner for the rest.

Writes: ``dcp_dir``'s writer wraps each rank's piece writes, and then its checksum records, in
``call_with_retries`` (a piece in a version folder nothing names yet is safe to write again).
"""

from __future__ import annotations

import http.client
import io
import posixpath
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType

from lightweight_ckpt.errors import CorruptCheckpointError
from lightweight_ckpt.formats.dcp_checksums import by_piece, read_record
from lightweight_ckpt.formats.zip_records import crc32
from lightweight_ckpt.storage import Location, call_with_retries

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

KEEP_BYTES = 256 << 20
"""Verified item bytes a rank keeps for its read (more are downloaded again when read)."""


class FetchedItems:
    """Whole stored items of one checkpoint on an object store: fetched, verified, kept."""

    def __init__(self, location: Location, keep_bytes: int = KEEP_BYTES) -> None:
        self.location = location
        self.keep_bytes = keep_bytes
        self._kept: dict[tuple[str, int], bytes] = {}
        self._kept_bytes = 0
        self.fetches = 0

    def fetch(self, relative: str, offset: int, length: int) -> bytes:
        """Download one stored item (retried on transient faults, a short body included).

        A piece shorter than its items is refused before any read (``require_pieces``), so a
        short body here is a connection cut short.
        """
        piece = posixpath.join(self.location.path, relative)

        def attempt() -> bytes:
            self.fetches += 1
            data: bytes = self.location.fs.cat_file(piece, start=offset, end=offset + length)
            if len(data) != length:
                raise http.client.IncompleteRead(data, length - len(data))
            return data

        return call_with_retries(self.location.url, "reading", attempt)

    def verify(self, items: Iterable[tuple[MetadataIndex, Any]]) -> None:
        """Fetch and check the CRC32 of every stored item in ``items``; keep what fits.

        Raises:
            CorruptCheckpointError: naming the path and every damaged piece and entry.
        """
        problems = []
        for relative, wanted in sorted(by_piece(items).items()):
            problems += self._verify_piece(relative, wanted)
        if problems:
            raise CorruptCheckpointError(
                f"{self.location.url}: damaged sharded checkpoint (checksum mismatch): "
                f"{'; '.join(problems)}. Load an earlier checkpoint."
            )

    def _verify_piece(self, relative: str, wanted: list[tuple[str, int, int]]) -> list[str]:
        record = read_record(self.location, relative)
        problems = []
        for name, offset, length in wanted:
            expected = record["items"].get(offset)
            if expected is None or expected[0] != length:
                problems.append(f"{relative}: entry {name!r} has no checksum (bytes {offset}+)")
                continue
            data = self.fetch(relative, offset, length)
            actual = crc32(data, 0)
            if actual != expected[1]:
                problems.append(
                    f"{relative}: entry {name!r} (bytes {offset}-{offset + length}): stored "
                    f"CRC32 {expected[1]:08x}, data has {actual:08x}"
                )
            elif self._kept_bytes + length <= self.keep_bytes:
                self._kept[relative, offset] = data
                self._kept_bytes += length
        return problems

    def take(self, relative: str, offset: int, length: int) -> bytes:
        """Return one item's bytes: the verified copy if kept, else a fresh download."""
        data = self._kept.pop((relative, offset), None)
        if data is None:
            return self.fetch(relative, offset, length)
        self._kept_bytes -= length
        return data


def read_item(
    request: ReadItem, info: Any, data: bytes, planner: LoadPlanner, transforms: Any
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
