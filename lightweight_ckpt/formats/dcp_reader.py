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

import collections
import ctypes
import dataclasses
import functools
import io
import math
import os
import pickle
import posixpath
import struct
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import UnsafeCheckpointError
from lightweight_ckpt.formats import dcp_checksums, dcp_remote, dcp_versions
from lightweight_ckpt.storage import call_with_retries

if TYPE_CHECKING:
    from collections.abc import Sequence

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
                    except _OffFastPathError:
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
            except _OffFastPathError:
                pass  # DCP's own steps read it below
            else:
                planner.commit_tensor(request, target)
                return
        if isinstance(data, int):
            data = items.take(relative, offset, length)
        dcp_remote.read_item(request, info, data, planner, self.transforms)


def reader_for(location: Location, storage_options: Any) -> SafeReader:
    """DCP's plain file reader on local disk (no fsspec layer), its fsspec reader elsewhere."""
    reader: SafeReader
    if location.is_local:
        reader = SafeFileSystemReader(location.path)
    else:
        reader = SafeFsspecReader(location.url, **dict(storage_options or {}))
        dcp_fs: Any = reader.fs
        dcp_fs.fs = location.fs  # the client ``storage`` configured (timeouts), and its caches
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


# -- fast reads of stored tensor items (local disk) ---------------------------------------------

_EOCD = struct.Struct("<4s8xIIH")  # signature, (disk numbers, entry counts), cd size, cd offset
_CENTRAL = struct.Struct("<4s6xH8xIIHHH8xI")  # sig, method, sizes, name/extra/comment, offset
_LOCAL = struct.Struct("<4s22xHH")
_NO_ZIP64 = 0xFFFFFFFF


class _OffFastPathError(Exception):
    """A stored item this reader does not parse itself: DCP's own path (``torch.load``) reads it."""


@dataclass(frozen=True)
class _StoredTensor:
    """What a stored item's pickle says: its storage (dtype, key, elements) and its view."""

    dtype: torch.dtype
    key: str
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(  # noqa: PLR0917 - torch._utils._rebuild_tensor_v2's signature
    storage: tuple[torch.dtype, str, int],
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,  # noqa: ARG001
    backward_hooks: object,  # noqa: ARG001
    metadata: object = None,
) -> _StoredTensor:
    if metadata:
        raise _OffFastPathError("tensor metadata")
    dtype, key, numel = storage
    return _StoredTensor(dtype, key, int(numel), int(storage_offset), tuple(size), tuple(stride))


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    """``{"FloatStorage": torch.float32, ...}``: the typed storage classes a pickle may name."""
    found = {"UntypedStorage": torch.uint8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation, on reading ``.dtype``
        for name in dir(torch):
            dtype = (
                getattr(getattr(torch, name), "dtype", None) if name.endswith("Storage") else None
            )
            if isinstance(dtype, torch.dtype) and name != "Storage" and "Q" not in name:
                found[name] = dtype
    return found


class _ItemUnpickler(pickle.Unpickler):
    """The pickle of one stored tensor item, read as a description only (no object is built).

    Only ``_rebuild_tensor_v2`` (replaced by ``_rebuild``, which builds nothing), typed storage
    classes, ``torch.Size`` and ``OrderedDict`` resolve: stricter than ``weights_only=True``.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve the few globals a stored dense tensor's pickle names."""
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        raise _OffFastPathError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> tuple[torch.dtype, str, int]:
        """``('storage', dtype, key, location, elements)`` -> ``(dtype, key, elements)``."""
        try:
            kind, dtype, key, _, numel = pid
        except (TypeError, ValueError):
            raise _OffFastPathError("persistent id") from None
        if kind != "storage":
            raise _OffFastPathError("persistent id")
        if not isinstance(dtype, torch.dtype):
            raise _OffFastPathError("storage type")
        return dtype, str(key), int(numel)


class _ItemBytes:
    """A stored item's bytes where ``read_tensor_item`` reads them: a file, or memory.

    Offsets are the piece's: a file holds the item at its offset in the piece (the piece
    itself, or a spool), memory holds the item alone (``base`` is its offset in the piece).
    """

    def __init__(self, fd: int | None = None, data: memoryview | None = None, base: int = 0):
        self._fd = fd
        self._data = data
        self._base = base

    def pread(self, size: int, offset: int) -> bytes:
        if self._data is not None:
            return bytes(self._slice(offset, size))
        data = os.pread(self._require_fd(), size, offset)
        if len(data) != size:
            raise _OffFastPathError("short read")
        return data

    def readinto(self, offset: int, view: memoryview) -> None:
        if self._data is not None:
            view[:] = self._slice(offset, len(view))
            return
        fd, done = self._require_fd(), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise _OffFastPathError("short read")
            done += got

    def _slice(self, offset: int, size: int) -> memoryview:
        start = offset - self._base
        if self._data is None or start < 0 or start + size > len(self._data):
            raise _OffFastPathError("short read")
        return self._data[start : start + size]

    def _require_fd(self) -> int:
        if self._fd is None:
            raise _OffFastPathError("no file")
        return self._fd


def _pread(src: _ItemBytes, size: int, offset: int) -> bytes:
    return src.pread(size, offset)


def _records(fd: _ItemBytes, start: int, length: int) -> dict[str, tuple[int, int]]:
    """``{record name: (absolute offset of its bytes, size)}`` of the zip at ``start``."""
    if length < _EOCD.size:
        raise _OffFastPathError("too short")
    signature, cd_size, cd_offset, comment = _EOCD.unpack(
        _pread(fd, _EOCD.size, start + length - _EOCD.size)
    )
    if signature != b"PK\x05\x06" or comment or _NO_ZIP64 in (cd_size, cd_offset):
        raise _OffFastPathError("zip directory")
    directory = _pread(fd, cd_size, start + cd_offset)
    found: dict[str, tuple[int, int]] = {}
    at = 0
    while at < cd_size:
        sig, method, csize, usize, nlen, xlen, clen, local = _CENTRAL.unpack_from(directory, at)
        name = directory[at + _CENTRAL.size : at + _CENTRAL.size + nlen].decode()
        if sig != b"PK\x01\x02" or method != 0 or csize != usize or _NO_ZIP64 in (usize, local):
            raise _OffFastPathError("zip entry")
        found[name] = (start + local, usize)
        at += _CENTRAL.size + nlen + xlen + clen
    return found


def _record(fd: _ItemBytes, header: tuple[int, int]) -> tuple[int, int]:
    """The absolute offset and size of a record's bytes, from its local header."""
    at, size = header
    signature, nlen, xlen = _LOCAL.unpack(_pread(fd, _LOCAL.size, at))
    if signature != b"PK\x03\x04":
        raise _OffFastPathError("local header")
    return at + _LOCAL.size + nlen + xlen, size


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(size):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _span(stored: _StoredTensor, offsets: Sequence[int], lengths: Sequence[int]) -> tuple[int, int]:
    """First element and element count of ``stored[offsets : offsets + lengths]``, if contiguous."""
    if stored.stride != _contiguous_strides(stored.size) or len(offsets) != len(stored.size):
        raise _OffFastPathError("strided")
    if any(o < 0 or o + n > full for o, n, full in zip(offsets, lengths, stored.size, strict=True)):
        raise _OffFastPathError("outside the stored tensor")
    narrowed = [
        d for d, (n, full) in enumerate(zip(lengths, stored.size, strict=True)) if n != full
    ]
    if narrowed and any(lengths[d] != 1 for d in range(narrowed[0])):
        raise _OffFastPathError("not one block")
    if narrowed and any(lengths[d] != stored.size[d] for d in range(narrowed[0] + 1, len(lengths))):
        raise _OffFastPathError("not one block")
    first = stored.offset + sum(o * s for o, s in zip(offsets, stored.stride, strict=True))
    return first, math.prod(lengths)


def _describe(fd: _ItemBytes, start: int, length: int) -> tuple[_StoredTensor, int]:
    """Describe the stored tensor of the ``torch.save`` archive at ``start``; where its data is."""
    records = _records(fd, start, length)
    prefix = next((n[: -len("data.pkl")] for n in records if n.endswith("data.pkl")), None)
    if prefix is None:
        raise _OffFastPathError("no data.pkl")
    byteorder = records.get(prefix + "byteorder")
    if byteorder is not None:
        at, size = _record(fd, byteorder)
        if _pread(fd, size, at) != sys.byteorder.encode():
            raise _OffFastPathError("byte order")
    at, size = _record(fd, records[prefix + "data.pkl"])
    try:
        stored = _ItemUnpickler(io.BytesIO(_pread(fd, size, at))).load()
    except _OffFastPathError:
        raise
    except Exception as err:
        raise _OffFastPathError("pickle") from err  # a pickle we cannot describe: DCP decides
    data = records.get(prefix + f"data/{getattr(stored, 'key', '')}")
    if not isinstance(stored, _StoredTensor) or data is None:
        raise _OffFastPathError("not a tensor")
    data_at, data_size = _record(fd, data)
    if data_size != stored.numel * stored.dtype.itemsize:
        raise _OffFastPathError("storage size")
    return stored, data_at


def _read_into(src: _ItemBytes, offset: int, sink: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``sink`` with the item's bytes at ``offset``."""
    nbytes = sink.numel() * sink.element_size()
    if not nbytes:
        return
    view = memoryview((ctypes.c_char * nbytes).from_address(sink.data_ptr())).cast("B")
    src.readinto(offset, view)


def read_tensor_item(
    fd: int | memoryview, start: int, length: int, request: ReadItem, target: torch.Tensor
) -> None:
    """Read one stored tensor item straight into ``target`` (one copy).

    ``fd``: the piece (or a spool holding the item at the same offset), or the item's own bytes
    in memory; ``start``/``length``: the item's bytes in the piece (already CRC-checked). The
    item is one ``torch.save`` archive; its pickle is read as a description only.

    Raises:
        _OffFastPathError: anything unusual (then DCP's own path reads the item).
    """
    src = _ItemBytes(fd=fd) if isinstance(fd, int) else _ItemBytes(data=fd, base=start)
    stored, data_at = _describe(src, start, length)
    first, count = _span(stored, request.storage_offsets, request.lengths)
    if first < 0 or first + count > stored.numel:
        raise _OffFastPathError("out of the storage")
    if target.dtype != stored.dtype or tuple(target.shape) != tuple(request.lengths):
        raise _OffFastPathError("target")
    direct = target.is_contiguous() and target.device.type == "cpu"
    sink = target if direct else torch.empty(tuple(request.lengths), dtype=stored.dtype)
    _read_into(src, data_at + first * stored.dtype.itemsize, sink)
    if not direct:
        target.copy_(sink)
