"""``convert``: a checkpoint to safetensors and back, tensor by tensor, written atomically.

To safetensors (DST ends in ``.safetensors``), from a single file or a sharded directory:

- Every tensor of the checkpoint (or of the part ``select`` names, whose keys then lose that
  prefix) is stored under its dotted name: nested keys joined by ``"."``, list items by index
  (``optimizer.state.0.exp_avg``). Two entries with the same dotted name are an error.
- Tied tensors (two names, one storage, same view) are stored once under the first name; the
  other names go into the ``lightweight_ckpt.aliases`` metadata. Safetensors refuses shared
  storage, and storing a copy would silently untie the weights after a load. A name whose tensor
  is a *different* view of a shared storage is stored as its own copy (reported).
- Plain values (numbers, strings, lists, dicts) and the nested structure are kept as JSON in the
  ``lightweight_ckpt.tree`` metadata. Values JSON cannot hold, and tensors safetensors cannot
  hold (complex or sparse ones), are left out and reported.
- A single file's CRC32s are all checked before the output is opened; a sharded checkpoint's
  pieces are checked for presence and size. A damaged source raises and writes nothing.

From safetensors (SRC is a safetensors file, DST anything else): one ``torch.load``-able file.
A file written by ``convert`` gets its structure, values and ties back; any other becomes a flat
``{name: tensor}`` state dict (with its aliases, if any, tied again).

Memory stays near the largest tensor: the header is written from shapes and dtypes alone, then
each tensor is read, written and freed in turn (local single files are read through a memory
map). The output goes through ``storage.staged_write``: whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightweight_ckpt.entries import (
    OpenCheckpoint,
    flat_leaves,
    layout_of,
    open_checkpoint,
    select,
)
from lightweight_ckpt.errors import CheckpointWriteError, InvalidCheckpointError
from lightweight_ckpt.formats import safetensors_file, torch_file, torch_writer
from lightweight_ckpt.progress import progress_bar
from lightweight_ckpt.state import iter_tensors
from lightweight_ckpt.storage import Sink, resolve, staged_write

if TYPE_CHECKING:
    from lightweight_ckpt.types import StorageOptions

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` wrote, and what it could not keep."""

    src: str
    dst: str
    direction: Literal["to_safetensors", "from_safetensors"]
    tensors: int
    nbytes: int
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied names stored once: ``{alias: stored name}``."""
    copied_views: list[str] = field(default_factory=list)
    """Names stored as their own copy although they share storage with another tensor."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Entries left out: ``{dotted name: why}``."""

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return {
            "src": self.src,
            "dst": self.dst,
            "direction": self.direction,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "aliases": self.aliases,
            "copied_views": self.copied_views,
            "dropped": self.dropped,
        }


def convert(
    src: str,
    dst: str,
    src_options: StorageOptions | None = None,
    dst_options: StorageOptions | None = None,
    *,
    select_key: str | None = None,
    weights_only: bool = True,
    progress: bool = False,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` to safetensors at ``dst``, or a safetensors file back.

    Args:
        src: a single-file or sharded checkpoint, or a safetensors file (path or URL).
        dst: ``*.safetensors`` to write safetensors; any other name writes a ``torch.save``
            file (SRC must then be safetensors).
        src_options: fsspec options for ``src``.
        dst_options: fsspec options for ``dst``.
        select_key: convert only this part of the checkpoint (a dotted key such as ``"model"``);
            the names then start below it, as in a module's ``state_dict()``.
        weights_only: unpickle the source's plain values safely (False: trusted files only).
        progress: show a progress bar on stderr (needs tqdm).

    Raises:
        ValueError: the conversion is not one of the two above.
        CheckpointNotFoundError: nothing at ``src``.
        InvalidCheckpointError: ``src`` is no checkpoint, or is damaged
            (``CorruptCheckpointError``); ``dst`` is not written.
        CheckpointWriteError: writing ``dst`` failed; nothing is left at ``dst``.
    """
    layout = layout_of(src, src_options)
    to_safetensors = dst.lower().endswith(SUFFIX)
    if to_safetensors == (layout == "safetensors"):
        raise ValueError(
            f"{src} -> {dst}: convert writes {SUFFIX} from a checkpoint, or a checkpoint from a "
            f"{SUFFIX} file (this is a {layout}); a sharded checkpoint becomes one file with "
            "`consolidate`."
        )
    with open_checkpoint(src, src_options, weights_only=weights_only) as opened:
        tree = select(opened.tree, select_key, src) if select_key else opened.tree
        if to_safetensors:
            return _to_safetensors(opened, tree, dst, dst_options, progress)
        return _from_safetensors(opened, tree, dst, dst_options, progress)


@dataclass
class _Plan:
    stored: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> its name in the file
    aliases: dict[str, str] = field(default_factory=dict)
    copied_views: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def plan_tensors(leaves: dict[str, Any]) -> _Plan:
    """Decide which tensors to store, which are aliases of stored ones, and which to drop."""
    plan = _Plan()
    views: dict[tuple[Any, ...], str] = {}
    storages: dict[int, str] = {}
    for name, tensor in leaves.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        problem = _unsupported(tensor)
        if name == "__metadata__":  # the header's own key
            problem = "its name is reserved in safetensors headers"
        if problem:
            plan.dropped[name] = problem
            continue
        if id(tensor) in plan.names:  # the same object twice
            plan.aliases[name] = plan.names[id(tensor)]
            continue
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            view = (
                ptr,
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            if view in views:
                plan.aliases[name] = plan.names[id(tensor)] = views[view]
                continue
            if ptr in storages:
                plan.copied_views.append(f"{name} (a view of {storages[ptr]}'s storage)")
            storages.setdefault(ptr, name)
            views[view] = name
        plan.stored.append((name, tensor))
        plan.names[id(tensor)] = name
    return plan


def _unsupported(tensor: torch.Tensor) -> str | None:
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor (safetensors holds dense tensors only)"
    if tensor.is_quantized or tensor.dtype not in safetensors_file.DTYPE_NAMES:
        return f"dtype {tensor.dtype} (safetensors cannot hold it)"
    return None


def _to_safetensors(
    opened: OpenCheckpoint,
    tree: Any,
    dst: str,
    options: StorageOptions | None,
    progress: bool,
) -> ConvertReport:
    plan = plan_tensors(flat_leaves(tree, opened.url))
    metadata = {"format": "pt"}  # what transformers expects of a PyTorch safetensors file
    dropped = dict(plan.dropped)
    encoded = safetensors_file.encode_tree(tree, plan.names, dropped)
    metadata[safetensors_file.TREE_KEY] = json.dumps(encoded, separators=(",", ":"))
    if plan.aliases:
        metadata[safetensors_file.ALIASES_KEY] = json.dumps(plan.aliases, sort_keys=True)
    try:
        header = safetensors_file.encode_header(
            [(name, t.dtype, tuple(t.shape)) for name, t in plan.stored], metadata
        )
    except ValueError as err:
        raise InvalidCheckpointError(
            f"{opened.url}: cannot be written as safetensors: {err}"
        ) from err
    total = len(header) + sum(t.numel() * t.element_size() for _, t in plan.stored)
    with (
        progress_bar(total, "convert", progress) as advance,
        staged_write(resolve(dst, options)) as sink,
    ):
        sink.write(header)
        advance(len(header))
        for _, tensor in plan.stored:
            opened.load(tensor)
            advance(_write_tensor(sink, tensor))
            opened.release(tensor)
        if sink.tell() != total:
            raise CheckpointWriteError(f"{dst}: wrote {sink.tell()} bytes, expected {total}")
    return ConvertReport(
        opened.url,
        dst,
        "to_safetensors",
        len(plan.stored),
        total,
        plan.aliases,
        plan.copied_views,
        dropped,
    )


def _write_tensor(sink: Sink, tensor: torch.Tensor) -> int:
    """Write ``tensor``'s bytes, row-major; return the byte count."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        data = tensor if tensor.is_contiguous() else tensor.contiguous()
        start = data.storage_offset() * data.element_size()
        sink.write(torch_file.byte_view(data.untyped_storage())[start : start + nbytes])
    return nbytes


def _from_safetensors(
    opened: OpenCheckpoint,
    tree: Any,
    dst: str,
    options: StorageOptions | None,
    progress: bool,
) -> ConvertReport:
    by_storage: dict[int, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in iter_tensors(tree):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        if tensor.numel():
            by_storage[tensor.untyped_storage().data_ptr()] = tensor
    total = sum(t.numel() * t.element_size() for t in by_storage.values())

    with progress_bar(total, "convert", progress) as advance:

        def fill(storage: torch.UntypedStorage) -> None:
            tensor = by_storage.get(storage.data_ptr())
            if tensor is not None:
                opened.load(tensor)
                advance(storage.nbytes())

        with staged_write(resolve(dst, options)) as sink:
            torch_writer.write_streamed(tree, fill, sink)
            nbytes = sink.tell()
    return ConvertReport(opened.url, dst, "from_safetensors", len(first), nbytes, aliases)
