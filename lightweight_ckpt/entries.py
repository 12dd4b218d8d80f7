"""A checkpoint of any layout, opened to be read tensor by tensor: ``open_checkpoint``.

``convert`` and ``diff`` walk a checkpoint's tree and touch one tensor at a time, so memory
stays near the largest tensor. What ``OpenCheckpoint.load`` does depends on the layout:

- ``file`` (a ``torch.save`` zip): every record's CRC32 is checked first, record by record
  (``verify_file_records``), so damage is found before anything is written anywhere. On local
  disk the tensors are views of a read-only memory map (pages come from the page cache on first
  touch; ``load`` does nothing). Elsewhere the reader has no per-record reads yet, so the file's
  tensors are read (and checked) whole at open: memory is then the checkpoint's size.
- ``sharded`` (a DCP directory): ``.metadata`` and the pieces' sizes are checked at open;
  ``load`` reads one tensor through DCP, ``release`` frees it.
- ``safetensors``: the header is validated at open; ``load`` reads the tensor's byte range,
  ``release`` frees it. A file written by ``convert`` gets its nested structure, plain values and
  tied tensors back (``formats.safetensors_file``); any other is a flat ``{name: tensor}``.

``flat_leaves`` names every leaf with its keys joined by ``"."`` (lists by index), the names
``inspect`` shows and ``convert`` writes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightweight_ckpt.errors import CorruptCheckpointError, InvalidCheckpointError
from lightweight_ckpt.formats import dcp_dir, safetensors_file, torch_file, zip_records
from lightweight_ckpt.progress import no_progress
from lightweight_ckpt.storage import Source, open_source, resolve

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from lightweight_ckpt.types import StorageOptions

Layout = Literal["file", "sharded", "safetensors"]
SEPARATOR = "."


class OpenCheckpoint:
    """One checkpoint's ``tree`` (tensors possibly unread) and how to read each tensor."""

    def __init__(
        self,
        url: str,
        layout: Layout,
        tree: Any,
        fill: Callable[[torch.Tensor], None] | None,
        source: Source | None = None,
    ) -> None:
        self.url = url
        self.layout: Layout = layout
        self.tree = tree
        self._fill = fill
        self._source = source

    def load(self, tensor: torch.Tensor) -> torch.Tensor:
        """Make ``tensor`` (a tensor of ``tree``) hold its data; return it."""
        if self._fill is not None and tensor.numel():
            storage = tensor.untyped_storage()
            needed = int(tensor.storage_offset() + tensor.numel()) * tensor.element_size()
            if storage.nbytes() < needed:
                storage.resize_(needed)  # released earlier: read it again
            self._fill(tensor)
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        """Free the memory ``load`` filled (a no-op where the data is a view of the file)."""
        if self._fill is not None:
            tensor.untyped_storage().resize_(0)

    def close(self) -> None:
        """Release the underlying file."""
        if self._source is not None:
            self._source.close()
            self._source = None

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_checkpoint(
    path: str,
    storage_options: StorageOptions | None = None,
    *,
    weights_only: bool = True,
    progress: Callable[[int], None] = no_progress,
) -> OpenCheckpoint:
    """Open the checkpoint at ``path`` (file, sharded directory or safetensors; local or URL).

    ``progress`` gets the bytes of each record checked at open (single files).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        InvalidCheckpointError: not a checkpoint; ``CorruptCheckpointError`` if damaged.
    """
    location = resolve(path, storage_options)
    if dcp_dir.is_sharded(location):
        return _open_sharded(path, storage_options, weights_only)
    source = open_source(location)
    try:
        if safetensors_file.looks_like_safetensors(source):
            return _open_safetensors(source)
        return _open_file(source, location.is_local, weights_only, progress)
    except BaseException:
        source.close()
        raise


def layout_of(path: str, storage_options: StorageOptions | None = None) -> Layout:
    """Return the layout at ``path`` from a directory listing or the first bytes, reading no data.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
    """
    location = resolve(path, storage_options)
    if dcp_dir.is_sharded(location):
        return "sharded"
    source = open_source(location)
    try:
        return "safetensors" if safetensors_file.looks_like_safetensors(source) else "file"
    finally:
        source.close()


def _open_sharded(
    path: str, storage_options: StorageOptions | None, weights_only: bool
) -> OpenCheckpoint:
    location = resolve(path, storage_options)
    metadata = dcp_dir.read_metadata(location)
    dcp_dir.require_pieces(location, metadata)
    tree = dcp_dir.skeleton(metadata)  # allocated, unread: not resident until read
    dcp_dir.read_values(location, metadata, tree, weights_only=weights_only)
    names = {id(tensor): fqn for fqn, tensor in dcp_dir.tensors_of(tree, metadata).items()}

    def fill(tensor: torch.Tensor) -> None:
        item = {names[id(tensor)]: tensor}
        dcp_dir.read_items(location, item, weights_only, metadata=metadata)

    return OpenCheckpoint(path, "sharded", tree, fill)


def _open_file(
    source: Source, is_local: bool, weights_only: bool, progress: Callable[[int], None]
) -> OpenCheckpoint:
    is_legacy = source.read_at(0, len(zip_records.LEGACY_MAGIC)) == zip_records.LEGACY_MAGIC
    if not is_legacy:
        problems = [
            f"{record.name}: {problem}"
            for record, problem in verify_file_records(source, progress)
            if problem
        ]
        if problems:
            raise CorruptCheckpointError(
                f"{source.url}: damaged records: {'; '.join(problems)}. Use an earlier checkpoint."
            )
    reader = torch_file.TorchFileReader(source, weights_only, None, mapped_storages=is_local)
    tree = reader.skeleton()
    if not is_local:
        reader.verify({})  # not local: read the tensors (and check them) here
    return OpenCheckpoint(source.url, "file", tree, None, source)


def _open_safetensors(source: Source) -> OpenCheckpoint:
    tree, infos = _safetensors_tree(source, "cpu")

    def fill(tensor: torch.Tensor) -> None:
        info = infos[id(tensor)]
        view = torch_file.byte_view(tensor.untyped_storage())
        source.readinto_at(info.begin, view[: info.end - info.begin])

    return OpenCheckpoint(source.url, "safetensors", tree, fill, source)


def _safetensors_tree(
    source: Source, device: str
) -> tuple[Any, dict[int, safetensors_file.TensorInfo]]:
    """Validate the header; return the tree (tensors unread on ``device``) and where each lies."""
    header = safetensors_file.read_header(source)
    infos: dict[int, safetensors_file.TensorInfo] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        tensors[name] = torch.empty(info.shape, dtype=info.dtype, device=device)  # unread
        infos[id(tensors[name])] = info
    aliases = _json_metadata(source.url, header.metadata, safetensors_file.ALIASES_KEY, {})
    for alias, target in dict(aliases).items():
        if target not in tensors:
            raise CorruptCheckpointError(f"{source.url}: alias {alias!r} names {target!r}, absent")
        tensors[alias] = tensors[target]
    encoded = _json_metadata(source.url, header.metadata, safetensors_file.TREE_KEY, None)
    tree = (
        tensors if encoded is None else safetensors_file.decode_tree(encoded, tensors, source.url)
    )
    return tree, infos


def read_skeleton(source: Source) -> tuple[Any, Layout]:
    """Return a single file's or safetensors file's tree without reading tensor data (inspect).

    Raises:
        InvalidCheckpointError: not a checkpoint; ``CorruptCheckpointError`` if damaged.
    """
    if safetensors_file.looks_like_safetensors(source):
        return _safetensors_tree(source, "meta")[0], "safetensors"
    return torch_file.TorchFileReader(source, True, None).skeleton(), "file"


def verify_file(
    source: Source, progress: Callable[[int], None] = no_progress
) -> tuple[list[str], int, str]:
    """Check a single file or safetensors file; return ``(problems, items checked, what)``.

    Raises:
        InvalidCheckpointError: not a checkpoint at all.
    """
    if safetensors_file.looks_like_safetensors(source):
        what = "safetensors: header, offsets and length (the format has no checksums)"
        try:
            header = safetensors_file.read_header(source)
        except CorruptCheckpointError as err:
            return [str(err)], 0, what
        progress(source.size)
        return [], len(header.tensors), what
    results = verify_file_records(source, progress)
    problems = [f"{record.name}: {problem}" for record, problem in results if problem]
    return problems, len(results), "file: CRC32 of every record"


def _json_metadata(url: str, metadata: dict[str, str], key: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except ValueError as err:
        raise CorruptCheckpointError(f"{url}: safetensors metadata {key!r} is damaged") from err


def verify_file_records(
    source: Source, progress: Callable[[int], None] = no_progress
) -> list[tuple[zip_records.Record, str | None]]:
    """Check every record's CRC32 like ``zip_records.verify_records``, reporting progress.

    Returns ``[(record, None if intact else the problem)]``.
    """
    records = zip_records.read_index(source)
    mapped = source.map()
    bounce = bytearray(min(16 << 20, max((r.size for r in records.values()), default=1) or 1))
    results: list[tuple[zip_records.Record, str | None]] = []
    try:
        for record in records.values():
            if mapped is not None:
                actual = zip_records.crc_of_map(source, mapped, record, release=True)
            else:
                actual = zip_records.crc_of_source(source, record, bounce)
            problem = None
            if record.crc not in (actual, 0):
                problem = f"CRC32 mismatch: stored {record.crc:08x}, data has {actual:08x}"
            results.append((record, problem))
            progress(record.size)
    finally:
        if mapped is not None:
            mapped.close()
    return results


def flat_leaves(tree: Any, url: str) -> dict[str, Any]:
    """Return ``{dotted name: leaf}``: tensors, and plain values (scalars, lists of scalars).

    Raises:
        InvalidCheckpointError: two entries get the same dotted name (``{"a.b": x, "a": {"b":
            y}}``), naming both.
    """
    leaves: dict[str, Any] = {}
    origins: dict[str, tuple[object, ...]] = {}
    for path, value in _walk(tree, ()):
        name = SEPARATOR.join(map(str, path))
        if name in leaves:
            raise InvalidCheckpointError(
                f"{url}: entries {list(origins[name])} and {list(path)} both have the dotted "
                f"name {name!r}; select one part of the checkpoint."
            )
        leaves[name] = value
        origins[name] = path
    return leaves


def _walk(node: Any, path: tuple[object, ...]) -> list[tuple[tuple[object, ...], Any]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _walk(value, (*path, key))]
    if isinstance(node, list | tuple) and any(
        isinstance(value, dict | list | tuple | torch.Tensor) for value in node
    ):
        return [leaf for i, value in enumerate(node) for leaf in _walk(value, (*path, i))]
    return [(path, node)]


def select(tree: Any, key: str, url: str) -> Any:
    """Return the part of ``tree`` at the dotted ``key`` (keys may themselves hold dots).

    Raises:
        InvalidCheckpointError: no such part, naming the keys there are.
    """
    parts = key.split(SEPARATOR)
    node = tree
    while parts:
        for count in range(len(parts), 0, -1):
            name = SEPARATOR.join(parts[:count])
            found = _child(node, name)
            if found is not _MISSING:
                node, parts = found, parts[count:]
                break
        else:
            there = sorted(map(str, node)) if isinstance(node, dict) else []
            raise InvalidCheckpointError(
                f"{url}: no entry {key!r} in the checkpoint (keys there: {there[:20]})"
            )
    return node


_MISSING = object()


def _child(node: Any, name: str) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key) == name:
                return value
    if isinstance(node, list | tuple) and name.isdigit() and int(name) < len(node):
        return node[int(name)]
    return _MISSING
