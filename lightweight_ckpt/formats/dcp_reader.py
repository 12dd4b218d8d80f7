"""Reading the sharded (DCP) format safely: allowlisted metadata, verified items, safe values.

DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with
``weights_only=False``. Here:

- ``MetadataUnpickler`` reads ``.metadata`` through an allowlist of DCP's metadata classes;
- ``SafeReader`` (DCP's local file reader, or its fsspec reader elsewhere, from
  ``reader_for``) checks every stored item this rank reads against its CRC32 before any rank
  reads (``dcp_checksums``; on object stores ``dcp_remote`` fetches each item once, retried);
- ``SafeLoadPlanner`` loads non-tensor values with ``weights_only=True`` unless told otherwise;
- metadata parsed to plan a load is handed to the DCP pass of the same load (``keep_parsed`` /
  ``take_parsed``), so it is parsed once.
"""

from __future__ import annotations

import os
import pickle
import posixpath
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future

from lightweight_ckpt.errors import UnsafeCheckpointError
from lightweight_ckpt.formats import dcp_checksums, dcp_remote

if TYPE_CHECKING:
    import io

    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

    from lightweight_ckpt.storage import Location

METADATA = ".metadata"


class MetadataUnpickler(pickle.Unpickler):
    """Unpickle ``.metadata`` allowing only what DCP metadata holds (DCP itself allows anything)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is on the allowlist."""
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}


_PARSED: dict[tuple[str, int, int, int], Metadata] = {}
"""Metadata that ``read_metadata`` parsed on local disk, by file identity (path, inode, size,
mtime), for the DCP pass of the same load (``read``) to take instead of parsing it again. A
commit replaces the file (a new inode), so an entry never stands for another file."""
_PARSED_MAX = 8
_PARSED_LOCK = threading.Lock()


def _file_identity(location: Location) -> tuple[str, int, int, int] | None:
    if not location.is_local:
        return None
    path = posixpath.join(location.path, METADATA)
    try:
        stat = os.stat(path)
    except OSError:
        return None  # the read raises the real error
    return path, stat.st_ino, stat.st_size, stat.st_mtime_ns


def keep_parsed(location: Location, metadata: Metadata) -> None:
    """Keep the metadata just parsed at ``location`` (local disk) for ``take_parsed``."""
    key = _file_identity(location)
    if key is None:
        return
    with _PARSED_LOCK:
        while len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = metadata


def take_parsed(location: Location) -> Metadata | None:
    """Return (once) what ``keep_parsed`` kept for this very ``.metadata`` file, or None."""
    key = _file_identity(location)
    if key is None:
        return None
    with _PARSED_LOCK:
        return _PARSED.pop(key, None)


class SafeReader(FileSystemReader):
    """DCP's reader, made safe: allowlisted metadata, items checked before they are read.

    ``.metadata`` goes through ``MetadataUnpickler``, never plain pickle, and every stored item
    this rank reads is checked against its CRC32 before any is read.
    """

    location: Location
    known_metadata: Metadata | None = None  # already read by the caller: not read again
    _checksummed = False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read ``.metadata`` through the allowlist (unless the caller passed it in)."""
        if self.known_metadata is not None:
            return self.known_metadata
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata: Metadata = MetadataUnpickler(stream).load()
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Note whether the checkpoint carries checksum records (``read_metadata`` logs if not)."""
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._checksummed = dcp_checksums.is_checksummed(metadata)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Verify the CRC32 of every stored item this rank will read.

        DCP gathers this step's failures from every rank before any rank reads data, so a
        damaged item fails the load on every rank with nothing changed.
        """
        if self._checksummed:
            items = [
                (item.storage_index, self.storage_data[item.storage_index]) for item in plan.items
            ]
            self.verify(items)
        return plan

    def verify(self, items: list[tuple[Any, Any]]) -> None:
        """Check the stored items' CRC32 (through a memory map of each piece on local disk)."""
        dcp_checksums.verify_items(self.location, items)


class SafeFileSystemReader(SafeReader):
    """DCP's local file reader, made safe."""


class SafeFsspecReader(SafeReader, FsspecReader):
    """DCP's fsspec reader, made safe; whole items, retried, downloaded once (``dcp_remote``)."""

    _fetched: dcp_remote.FetchedItems | None = None

    def _items(self) -> dcp_remote.FetchedItems:
        if self._fetched is None:
            self._fetched = dcp_remote.FetchedItems(self.location)
        return self._fetched

    def verify(self, items: list[tuple[Any, Any]]) -> None:
        """Fetch and check every item (kept for ``read_data`` within a memory budget)."""
        self._items().verify(items)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``, each with one retried ranged read (or the kept copy)."""
        items = self._items()
        for request in plan.items:
            info = self.storage_data[request.storage_index]
            data = items.take(info.relative_path, int(info.offset), int(info.length))
            dcp_remote.read_item(request, info, data, planner, self.transforms)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def reader_for(location: Location, storage_options: Any) -> SafeReader:
    """DCP's plain file reader on local disk (no fsspec layer), its fsspec reader elsewhere."""
    reader: SafeReader
    if location.is_local:
        reader = SafeFileSystemReader(location.path)
    else:
        reader = SafeFsspecReader(location.url, **dict(storage_options or {}))
    reader.location = location
    return reader


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values load with ``weights_only=True``."""

    def __init__(self, url: str, weights_only: bool) -> None:
        super().__init__()
        self._url = url
        self._weights_only = weights_only

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Unpickle one non-tensor value (safely unless ``weights_only=False``)."""
        try:
            loaded = torch.load(value, weights_only=self._weights_only)  # noqa: TID251 - DCP value
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{self._url}: weights_only=True refuses a value in this checkpoint ({err}). "
                "If you trust it, pass weights_only=False."
            ) from err
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
