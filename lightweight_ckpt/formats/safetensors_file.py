"""The safetensors format: header encoding and validation, streamed writes, ranged reads.

A safetensors file is ``<u64 little-endian header length><JSON header><tensor bytes>``. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative
to the first data byte) and may carry ``"__metadata__"``, a ``{str: str}`` map. Tensors are
stored once, contiguous, row-major, little-endian, back to back with no gaps.

We write the format ourselves rather than through the ``safetensors`` package: its writers take
every tensor at once, while ``write_header`` lets ``convert`` stream tensor by tensor into a
``storage.staged_write`` sink (memory near the largest tensor, atomic commit). The tests read
our files back with the reference library.

Our metadata convention (``lightweight_ckpt.*`` keys in ``__metadata__``):

- ``lightweight_ckpt.aliases``: JSON ``{alias: stored name}`` for tied tensors (two names, one
  storage), which safetensors cannot hold twice. The tensor is stored once under the first name;
  ``safetensors.torch.load_model`` re-ties such names through the model itself.
- ``lightweight_ckpt.tree``: JSON of the checkpoint's nested structure (``encode_tree``), with
  its plain values, so that a conversion back rebuilds the same keys, containers and values.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightweight_ckpt.errors import CorruptCheckpointError, InvalidCheckpointError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lightweight_ckpt.storage import Source

ALIASES_KEY = "lightweight_ckpt.aliases"
TREE_KEY = "lightweight_ckpt.tree"
MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses larger headers
_LENGTH = struct.Struct("<Q")
_ALIGN = 8

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes lie in the file (absolute offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order and the ``__metadata__`` map."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Return the byte size of a tensor of ``dtype`` and ``shape``."""
    return math.prod(shape) * dtype.itemsize


def encode_header(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> bytes:
    """Return the length prefix and JSON header for ``tensors``, stored in the order given.

    Raises:
        ValueError: a dtype safetensors cannot hold, or a header over the reference limit.
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise ValueError("safetensors data is little-endian; this machine is big-endian")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: safetensors cannot hold dtype {dtype}")
        end = offset + nbytes_of(dtype, shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + _LENGTH.size) % _ALIGN)  # first data byte 8-aligned
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"the safetensors header would be {len(text)} bytes (limit 100 MB)")
    return _LENGTH.pack(len(text)) + text


def looks_like_safetensors(source: Source) -> bool:
    """Return True if ``source`` starts like a safetensors file (a length, then ``{``)."""
    head = source.read_at(0, _LENGTH.size + 1)
    if len(head) < _LENGTH.size + 1:
        return False
    (length,) = _LENGTH.unpack(head[: _LENGTH.size])
    return head[-1:] == b"{" and _LENGTH.size + length <= source.size


def read_header(source: Source) -> Header:
    """Read and validate the header of the safetensors file ``source``.

    Raises:
        InvalidCheckpointError: the file is not a safetensors file.
        CorruptCheckpointError: the header is damaged or does not match the file's length.
    """
    url = source.url
    if not looks_like_safetensors(source):
        raise InvalidCheckpointError(f"{url}: not a safetensors file (no header found)")
    (length,) = _LENGTH.unpack(source.read_at(0, _LENGTH.size))
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{url}: safetensors header of {length} bytes (limit 100 MB)")
    try:
        raw = json.loads(source.read_at(_LENGTH.size, length))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{url}: the safetensors header is damaged: {err}") from err
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{url}: the safetensors header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpointError(f"{url}: safetensors __metadata__ is not a {{str: str}} map")
    start = _LENGTH.size + length
    tensors = sorted(
        (_tensor_info(url, name, entry, start) for name, entry in raw.items()),
        key=lambda info: (info.begin, info.end),
    )
    position = start
    for info in tensors:
        if info.begin != position:
            raise CorruptCheckpointError(
                f"{url}: safetensors entry {info.name!r} starts at byte {info.begin}, expected "
                f"{position} (gap or overlap)"
            )
        position = info.end
    if position != source.size:
        raise CorruptCheckpointError(
            f"{url}: truncated or padded: the safetensors header describes {position} bytes, "
            f"the file has {source.size}"
        )
    return Header({info.name: info for info in tensors}, metadata)


def _tensor_info(url: str, name: str, entry: Any, start: int) -> TensorInfo:
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(size) for size in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"{url}: safetensors entry {name!r} is malformed or has an unsupported dtype "
            f"({entry!r:.200})"
        ) from err
    if any(size < 0 for size in shape) or end - begin != nbytes_of(dtype, shape):
        raise CorruptCheckpointError(
            f"{url}: safetensors entry {name!r}: offsets [{begin}, {end}] do not fit "
            f"{entry['dtype']} {list(shape)}"
        )
    return TensorInfo(name, dtype, shape, start + begin, start + end)


# -- the nested structure of a checkpoint, as JSON in the metadata -----------------------------

_MARKERS = ("$tensor", "$dict", "$list", "$tuple", "$float", "$dropped")


def encode_tree(
    tree: Any, tensor_name: Mapping[int, str], dropped: dict[str, str], path: str = ""
) -> Any:
    """Return ``tree`` as JSON-able data; tensors become ``{"$tensor": name}``.

    ``tensor_name`` maps ``id(tensor)`` to its name in the file. Values JSON cannot hold, and
    tensors without a name, become ``{"$dropped": type name}``; ``dropped`` gets
    ``{dotted path: why}`` for each (a reason already there is kept).
    """
    if isinstance(tree, dict | list | tuple):
        encoded = _encode_container(tree, tensor_name, dropped, path)
        if encoded is not None:
            return encoded
    elif isinstance(tree, torch.Tensor) and id(tree) in tensor_name:
        return {"$tensor": tensor_name[id(tree)]}
    elif isinstance(tree, float) and not math.isfinite(tree):
        return {"$float": repr(tree)}
    elif tree is None or isinstance(tree, str | int | float | bool):
        return tree
    kind = "tensor" if isinstance(tree, torch.Tensor) else type(tree).__name__
    dropped.setdefault(path, f"a {kind} value, which the safetensors metadata cannot hold")
    return {"$dropped": kind}


def _encode_container(
    tree: dict[Any, Any] | list[Any] | tuple[Any, ...],
    tensor_name: Mapping[int, str],
    dropped: dict[str, str],
    path: str,
) -> Any:
    if isinstance(tree, list | tuple):
        nodes = [encode_tree(v, tensor_name, dropped, _join(path, i)) for i, v in enumerate(tree)]
        return {"$tuple" if isinstance(tree, tuple) else "$list": nodes}
    if not all(key is None or isinstance(key, str | int | float | bool) for key in tree):
        return None
    items = [
        (key, encode_tree(v, tensor_name, dropped, _join(path, key))) for key, v in tree.items()
    ]
    if all(isinstance(key, str) and not key.startswith("$") for key, _ in items):
        return dict(items)  # the common case stays readable JSON
    return {"$dict": [[key, value] for key, value in items]}


def decode_tree(node: Any, tensors: Mapping[str, torch.Tensor], url: str) -> Any:
    """Rebuild a tree from ``encode_tree``'s JSON; dropped dict entries are left out.

    A dropped list or tuple element becomes ``None``, so the others keep their positions.

    Raises:
        CorruptCheckpointError: a ``$tensor`` names no tensor of the file.
    """
    marker = next(iter(node)) if isinstance(node, dict) and len(node) == 1 else None
    if isinstance(node, dict) and marker not in _MARKERS:
        return {k: decode_tree(v, tensors, url) for k, v in node.items() if not _is_dropped(v)}
    if marker is None or marker in ("$float", "$dropped"):
        return _decode_scalar(node, marker)
    value = node[marker]
    if marker == "$tensor":
        if value not in tensors:
            raise CorruptCheckpointError(f"{url}: {TREE_KEY} names tensor {value!r}, absent")
        return tensors[value]
    if marker == "$dict":
        return {k: decode_tree(v, tensors, url) for k, v in value if not _is_dropped(v)}
    # a dropped list element becomes None, so that the others keep their positions
    items = [None if _is_dropped(v) else decode_tree(v, tensors, url) for v in value]
    return tuple(items) if marker == "$tuple" else items


def _decode_scalar(node: Any, marker: str | None) -> Any:
    if marker == "$float":
        return float(node[marker])
    return None if marker == "$dropped" else node


def _is_dropped(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and "$dropped" in node


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)
