"""Reading the sharded (DCP) format safely: allowlisted metadata, verified items, safe values.

DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with
``weights_only=False``. Here:

- ``MetadataUnpickler`` reads ``.metadata`` through an allowlist of DCP's metadata classes;
- ``SafeReader`` (DCP's local file reader, or its fsspec reader elsewhere, from
  ``reader_for``) checks every stored item this rank reads against its CRC32 before any rank
  reads (``dcp_checksums``; on object stores ``dcp_remote`` fetches each item once, retried);
- ``SafeLoadPlanner`` loads non-tensor values with ``weights_only=True`` unless told otherwise;
- tensor items are read straight into their targets where ``dcp_items.read_tensor_item`` can
  (one copy; DCP's own path reads the rest);
- metadata parsed to plan a load is handed to the DCP pass of the same load (``keep_parsed`` /
  ``take_parsed``), so it is parsed once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from lightweight_ckpt.compat import dcp_metadata_path
from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import UnsafeCheckpointError
from lightweight_ckpt.formats import dcp_checksums, dcp_remote, dcp_versions
from lightweight_ckpt.formats.dcp_items import OffFastPathError, read_tensor_item
from lightweight_ckpt.storage import call_with_retries

if TYPE_CHECKING:
    import io
    from collections.abc import Iterator

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
        path = dcp_metadata_path(self, kwargs.get("rank"))
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

    def release(self) -> None:
        """Let go of what the load holds (pinned pieces); the load is over or abandoned."""


class SafeFileSystemReader(SafeReader):
    """DCP's local file reader, made safe; tensor items read straight into their targets.

    Every piece this rank reads is opened once, under a shared ``flock``, before its items are
    checked, and read through that descriptor: a later save cannot reuse it meanwhile
    (``dcp_versions.pin_piece``).
    """

    _pinned: dict[str, int] | None = None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Pin the pieces ``plan`` reads, then check their items (``SafeReader``)."""
        self.release()
        self._pinned = {}
        for relative in sorted(
            {self.storage_data[i.storage_index].relative_path for i in plan.items}
        ):
            path = os.path.join(self.path, relative)
            self._pinned[relative] = dcp_versions.pin_piece(path, self.location.url)
        return super().prepare_local_plan(plan)

    def release(self) -> None:
        """Close the pinned pieces (after the read, or when the load stops before it).

        The pieces stay pinned across ``read_data`` calls (values, then tensors) until this.
        """
        pinned, self._pinned = self._pinned or {}, None
        for descriptor in pinned.values():
            os.close(descriptor)

    def __del__(self) -> None:
        self.release()

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each stored tensor item from its piece into its target with one copy.

        DCP's reader copies each item into a buffer, ``torch.load``s it (a pickle per item, most
        of a warm load's time) and copies it again; here the item's zip directory and pickle
        are parsed (as a description only) and its bytes read into the target. Non-tensor
        values, transformed items and anything unusual go through DCP's own path.
        """
        values = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if values:  # first: a value weights_only refuses fails before any tensor is written
            super().read_data(dataclasses.replace(plan, items=values), planner).wait()
        slow: list[ReadItem] = []
        per_piece: dict[str, list[ReadItem]] = {}
        for request in plan.items:
            info = self.storage_data[request.storage_index]
            if request.type == LoadItemType.BYTE_IO:
                continue
            if getattr(info, "transform_descriptors", None):
                slow.append(request)
            else:
                per_piece.setdefault(info.relative_path, []).append(request)
        try:
            for relative, requests in per_piece.items():
                fd = (self._pinned or {}).get(relative)
                if fd is None:  # not planned through prepare_local_plan
                    self._pinned = self._pinned or {}
                    fd = self._pinned[relative] = os.open(
                        os.path.join(self.path, relative), os.O_RDONLY
                    )
                for request in requests:
                    info = self.storage_data[request.storage_index]
                    target = planner.resolve_tensor(request).detach()
                    try:
                        read_tensor_item(fd, int(info.offset), int(info.length), request, target)
                    except OffFastPathError:
                        slow.append(request)
                        continue
                    planner.commit_tensor(request, target)
        except BaseException:
            self.release()
            raise
        if slow:  # DCP's own path opens the piece by name: still pinned, so the same file
            return super().read_data(dataclasses.replace(plan, items=slow), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


class SafeFsspecReader(SafeReader, FsspecReader):
    """DCP's fsspec reader, made safe; items verified in parallel streams, fetched once.

    ``dcp_remote`` fetches and checks the items in ``prepare_local_plan`` and holds their bytes
    (a local spool, or memory); ``read_data`` copies each tensor's data from there straight into
    its target.
    """

    def __init__(self, location: Location) -> None:
        # not FsspecReader.__init__: it builds a client of its own from the URL
        FileSystemReader.__init__(self, location.url)
        self.fs = FsspecAdapter(location.fs)  # type: ignore[assignment]  # as FsspecReader does
        self.path = location.url

    _fetched: dcp_remote.FetchedItems | None = None

    def _items(self) -> dcp_remote.FetchedItems:
        if self._fetched is None:
            self._fetched = dcp_remote.FetchedItems(self.location)
        return self._fetched

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read ``.metadata`` through the allowlist, retried on transient faults."""
        if self.known_metadata is not None:
            return self.known_metadata
        read = super().read_metadata
        return call_with_retries(self.location.url, "reading", lambda: read(*args, **kwargs))

    def verify(self, items: list[tuple[Any, Any]]) -> None:
        """Fetch and check every item, held for ``read_data`` (a spool, or memory)."""
        self._items().verify(items)

    def release(self) -> None:
        """Drop the verified bytes this reader holds."""
        if self._fetched is not None:
            self._fetched.release()

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``: tensors straight into their targets, on ``io_threads``.

        Non-tensor values first: one that ``weights_only`` refuses fails before any tensor is
        written.
        """
        items = self._items()
        values = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        for request in values:
            info = self.storage_data[request.storage_index]
            data = items.take(info.relative_path, int(info.offset), int(info.length))
            dcp_remote.read_item(request, info, data, planner, self.transforms)
        tensors = [item for item in plan.items if item.type != LoadItemType.BYTE_IO]
        if tensors:
            threads = max(1, min(settings().io_threads, len(tensors)))
            with ThreadPoolExecutor(threads, thread_name_prefix="lwckpt-fill") as pool:
                for done in [pool.submit(self._read_tensor, items, r, planner) for r in tensors]:
                    done.result()
        finished: Future[None] = Future()
        finished.set_result(None)
        return finished

    def _read_tensor(
        self, items: dcp_remote.FetchedItems, request: ReadItem, planner: LoadPlanner
    ) -> None:
        info = self.storage_data[request.storage_index]
        relative, offset, length = info.relative_path, int(info.offset), int(info.length)
        held = items.held(relative, offset)
        data = held if held is not None else items.take(relative, offset, length)
        if not getattr(info, "transform_descriptors", None):
            target = planner.resolve_tensor(request).detach()
            try:
                read_tensor_item(data, offset, length, request, target)
            except OffFastPathError:
                pass  # DCP's own steps read it below
            else:
                planner.commit_tensor(request, target)
                return
        if isinstance(data, int):
            data = items.take(relative, offset, length)
        dcp_remote.read_item(request, info, data, planner, self.transforms)


class FsspecAdapter(FsspecFileSystem):
    """DCP's fsspec adapter on ``fs``, the client ``storage`` configured, with its caches.

    Every stream opens through ``fs`` (torch 2.4's adapter opened them with
    ``fsspec.open(url)``: a default client, without the storage options). A stream written
    to that fails is removed, as DCP's own does: an object store commits what a closed stream
    holds.
    """

    def __init__(self, fs: Any) -> None:
        super().__init__()
        self.fs = self.client = fs

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        """Open ``path`` through ``fs``."""
        path = os.fspath(path)
        with self.client.open(path, mode) as stream:
            try:
                yield stream
            except BaseException:
                if any(flag in mode for flag in "wa+"):
                    with contextlib.suppress(Exception):
                        self.client.rm(path)
                raise


def reader_for(location: Location) -> SafeReader:
    """DCP's plain file reader on local disk (no fsspec layer), its fsspec reader elsewhere.

    The fsspec reader reads through the client ``storage`` configured (endpoint, credentials,
    timeouts) and its caches; it never builds one of its own from the URL.
    """
    reader: SafeReader
    if location.is_local:
        reader = SafeFileSystemReader(location.path)
    else:
        reader = SafeFsspecReader(location)
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
