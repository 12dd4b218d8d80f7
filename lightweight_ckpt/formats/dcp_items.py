"""Reading one stored DCP tensor item straight into its target: the fast path of a sharded load.

A DCP piece stores each tensor item as a small ``torch.save`` archive (a zip of a pickle and the
storage's bytes). DCP's own reader copies the item into a buffer, ``torch.load``s it and copies
it again. ``read_tensor_item`` parses the item's zip directory and pickle as a description only
(``_ItemUnpickler`` builds no object) and reads the wanted slice's bytes into the target with one
copy, from the piece's file descriptor or from bytes in memory. Anything unusual raises
``OffFastPathError`` and the caller lets DCP's own path read that item.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import io
import math
import os
import pickle
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch.distributed.checkpoint.planner import ReadItem

_EOCD = struct.Struct("<4s8xIIH")  # signature, (disk numbers, entry counts), cd size, cd offset
_CENTRAL = struct.Struct("<4s6xH8xIIHHH8xI")  # sig, method, sizes, name/extra/comment, offset
_LOCAL = struct.Struct("<4s22xHH")
_NO_ZIP64 = 0xFFFFFFFF


class OffFastPathError(Exception):
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
        raise OffFastPathError("tensor metadata")
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
        raise OffFastPathError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> tuple[torch.dtype, str, int]:
        """``('storage', dtype, key, location, elements)`` -> ``(dtype, key, elements)``."""
        try:
            kind, dtype, key, _, numel = pid
        except (TypeError, ValueError):
            raise OffFastPathError("persistent id") from None
        if kind != "storage":
            raise OffFastPathError("persistent id")
        if not isinstance(dtype, torch.dtype):
            raise OffFastPathError("storage type")
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
            raise OffFastPathError("short read")
        return data

    def readinto(self, offset: int, view: memoryview) -> None:
        if self._data is not None:
            view[:] = self._slice(offset, len(view))
            return
        fd, done = self._require_fd(), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OffFastPathError("short read")
            done += got

    def _slice(self, offset: int, size: int) -> memoryview:
        start = offset - self._base
        if self._data is None or start < 0 or start + size > len(self._data):
            raise OffFastPathError("short read")
        return self._data[start : start + size]

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OffFastPathError("no file")
        return self._fd


def _pread(src: _ItemBytes, size: int, offset: int) -> bytes:
    return src.pread(size, offset)


def _records(fd: _ItemBytes, start: int, length: int) -> dict[str, tuple[int, int]]:
    """``{record name: (absolute offset of its bytes, size)}`` of the zip at ``start``."""
    if length < _EOCD.size:
        raise OffFastPathError("too short")
    signature, cd_size, cd_offset, comment = _EOCD.unpack(
        _pread(fd, _EOCD.size, start + length - _EOCD.size)
    )
    if signature != b"PK\x05\x06" or comment or _NO_ZIP64 in (cd_size, cd_offset):
        raise OffFastPathError("zip directory")
    directory = _pread(fd, cd_size, start + cd_offset)
    found: dict[str, tuple[int, int]] = {}
    at = 0
    while at < cd_size:
        sig, method, csize, usize, nlen, xlen, clen, local = _CENTRAL.unpack_from(directory, at)
        name = directory[at + _CENTRAL.size : at + _CENTRAL.size + nlen].decode()
        if sig != b"PK\x01\x02" or method != 0 or csize != usize or _NO_ZIP64 in (usize, local):
            raise OffFastPathError("zip entry")
        found[name] = (start + local, usize)
        at += _CENTRAL.size + nlen + xlen + clen
    return found


def _record(fd: _ItemBytes, header: tuple[int, int]) -> tuple[int, int]:
    """The absolute offset and size of a record's bytes, from its local header."""
    at, size = header
    signature, nlen, xlen = _LOCAL.unpack(_pread(fd, _LOCAL.size, at))
    if signature != b"PK\x03\x04":
        raise OffFastPathError("local header")
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
        raise OffFastPathError("strided")
    if any(o < 0 or o + n > full for o, n, full in zip(offsets, lengths, stored.size, strict=True)):
        raise OffFastPathError("outside the stored tensor")
    narrowed = [
        d for d, (n, full) in enumerate(zip(lengths, stored.size, strict=True)) if n != full
    ]
    if narrowed and any(lengths[d] != 1 for d in range(narrowed[0])):
        raise OffFastPathError("not one block")
    if narrowed and any(lengths[d] != stored.size[d] for d in range(narrowed[0] + 1, len(lengths))):
        raise OffFastPathError("not one block")
    first = stored.offset + sum(o * s for o, s in zip(offsets, stored.stride, strict=True))
    return first, math.prod(lengths)


def _describe(fd: _ItemBytes, start: int, length: int) -> tuple[_StoredTensor, int]:
    """Describe the stored tensor of the ``torch.save`` archive at ``start``; where its data is."""
    records = _records(fd, start, length)
    prefix = next((n[: -len("data.pkl")] for n in records if n.endswith("data.pkl")), None)
    if prefix is None:
        raise OffFastPathError("no data.pkl")
    byteorder = records.get(prefix + "byteorder")
    if byteorder is not None:
        at, size = _record(fd, byteorder)
        if _pread(fd, size, at) != sys.byteorder.encode():
            raise OffFastPathError("byte order")
    at, size = _record(fd, records[prefix + "data.pkl"])
    try:
        stored = _ItemUnpickler(io.BytesIO(_pread(fd, size, at))).load()
    except OffFastPathError:
        raise
    except Exception as err:
        raise OffFastPathError("pickle") from err  # a pickle we cannot describe: DCP decides
    data = records.get(prefix + f"data/{getattr(stored, 'key', '')}")
    if not isinstance(stored, _StoredTensor) or data is None:
        raise OffFastPathError("not a tensor")
    data_at, data_size = _record(fd, data)
    if data_size != stored.numel * stored.dtype.itemsize:
        raise OffFastPathError("storage size")
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
        OffFastPathError: anything unusual (then DCP's own path reads the item).
    """
    src = _ItemBytes(fd=fd) if isinstance(fd, int) else _ItemBytes(data=fd, base=start)
    stored, data_at = _describe(src, start, length)
    first, count = _span(stored, request.storage_offsets, request.lengths)
    if first < 0 or first + count > stored.numel:
        raise OffFastPathError("out of the storage")
    if target.dtype != stored.dtype or tuple(target.shape) != tuple(request.lengths):
        raise OffFastPathError("target")
    direct = target.is_contiguous() and target.device.type == "cpu"
    sink = target if direct else torch.empty(tuple(request.lengths), dtype=stored.dtype)
    _read_into(src, data_at + first * stored.dtype.itemsize, sink)
    if not direct:
        target.copy_(sink)
