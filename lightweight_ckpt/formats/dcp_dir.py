"""The sharded format: a directory in the ``torch.distributed.checkpoint`` (DCP) layout.

Stock ``torch.distributed.checkpoint.load`` and ``format_utils`` read it. We add what DCP's own
fsspec writer lacks, without changing the format:

- **Atomic commit.** DCP names pieces ``__<rank>_<n>.distcp`` and, on overwrite, deletes the old
  ``.metadata`` before renaming the new one, so a crash mid-save leaves nothing loadable. We write
  every save's pieces into a fresh version folder (``<path>/v-<id>/__<rank>_<n>.distcp``; the
  metadata records that relative path, so stock readers resolve it) and publish ``.metadata``
  last through ``storage.staged_write`` (an atomic replace on every filesystem). Until then the
  previous checkpoint is intact; afterwards rank 0 removes the previous version's folder.
- **Safe loads.** DCP unpickles non-tensor values with ``weights_only=False``; our load planner
  uses ``weights_only=True``, so a checkpoint cannot run code on load.
- **No ``.metadata``, no checkpoint.** A folder without it (an interrupted first save) raises
  ``CheckpointNotFoundError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import posixpath
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from lightweight_ckpt.storage import Location, resolve, staged_write

if TYPE_CHECKING:
    import io
    from collections.abc import Iterator

    from torch.distributed.checkpoint.planner import ReadItem, SavePlan

    from lightweight_ckpt.types import StorageOptions

METADATA = ".metadata"
VERSION_PREFIX = "v-"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        # pieces go to a fresh version folder; overwriting is our own commit, by design
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")
        yield


def new_version() -> str:
    """Return a fresh version folder name (rank 0 picks it; every rank must use the same)."""
    return f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"


def is_sharded(location: Location) -> bool:
    """Return True if ``location`` is a directory (a sharded checkpoint, committed or not)."""
    return bool(location.fs.isdir(location.path))


class _VersionedWriter(FsspecWriter):
    """DCP's fsspec writer, with pieces in ``<version>/`` and ``.metadata`` committed last."""

    def __init__(self, url: str, version: str, storage_options: StorageOptions | None) -> None:
        super().__init__(url, sync_files=True, overwrite=True, **dict(storage_options or {}))
        self._url = url
        self._version = version
        self._storage_options = storage_options

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Name every rank's pieces ``<version>/__<rank>_<n>.distcp``."""
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"{self._version}/__{i}_"))
            for i, plan in enumerate(plans)
        ]

    def finish(self, metadata: Metadata, results: list[Any]) -> None:
        """Write ``.metadata`` into the version folder, then publish it atomically (rank 0)."""
        final: Any = self.path
        self.path = self.fs.concat_path(final, self._version)
        try:
            super().finish(metadata, results)
        finally:
            self.path = final
        staged = resolve(posixpath.join(self._url, self._version, METADATA), self._storage_options)
        data = staged.fs.cat_file(staged.path)
        with staged_write(
            resolve(posixpath.join(self._url, METADATA), self._storage_options)
        ) as sink:
            sink.write(data)
        staged.fs.rm(staged.path)


def prepare(location: Location, version: str) -> None:
    """Create the version folder on this rank's view of the filesystem."""
    if location.fs.isfile(location.path):
        raise CheckpointWriteError(
            f"{location.url}: a single-file checkpoint is there; a sharded checkpoint is a "
            "directory. Choose another path or remove the file."
        )
    location.fs.makedirs(posixpath.join(location.path, version), exist_ok=True)


def write(
    checkpoint: dict[str, Any], location: Location, version: str, storage_options: Any
) -> None:
    """Save this rank's piece of ``checkpoint`` (a collective: every rank calls it)."""
    writer = _VersionedWriter(location.url, version, storage_options)
    with _single_process_ok():
        dcp_save(checkpoint, storage_writer=writer, no_dist=not _distributed())


def remove_stale_versions(location: Location, keep: str) -> None:
    """Delete version folders other than ``keep`` (after the commit; rank 0 only)."""
    for entry in location.fs.ls(location.path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith(VERSION_PREFIX) and name != keep:
            location.fs.rm(entry, recursive=True)


def read_metadata(location: Location, storage_options: Any) -> Metadata:
    """Return the committed checkpoint's DCP metadata.

    Raises:
        CheckpointNotFoundError: no committed ``.metadata`` but a version folder (a save died).
        InvalidCheckpointError: a directory that is no sharded checkpoint at all.
        CorruptCheckpointError: ``.metadata`` is unreadable.
    """
    if not location.fs.exists(posixpath.join(location.path, METADATA)):
        entries = location.fs.ls(location.path, detail=False)
        names = [posixpath.basename(entry.rstrip("/")) for entry in entries]
        if any(name.startswith(VERSION_PREFIX) for name in names):
            raise CheckpointNotFoundError(
                f"{location.url}: no committed sharded checkpoint here (no {METADATA}); a save "
                "was interrupted before its commit."
            )
        raise InvalidCheckpointError(
            f"{location.url}: is a directory but not a sharded checkpoint (no {METADATA})"
        )
    try:
        reader = FsspecReader(location.url, **dict(storage_options or {}))
        metadata: Metadata = reader.read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CorruptCheckpointError(f"{location.url}: {METADATA} is unreadable: {err}") from err
    return metadata


def top_level_keys(metadata: Metadata) -> dict[str, list[str]]:
    """Return ``{state key: [flattened item names under it]}`` from DCP metadata."""
    keys: dict[str, list[str]] = {}
    mappings = metadata.planner_data or {}
    for fqn in metadata.state_dict_metadata:
        path = mappings.get(fqn, (fqn,))
        keys.setdefault(str(path[0]), []).append(fqn)
    return keys


def plain_values(metadata: Metadata) -> set[str]:
    """Return the state keys whose values are stored as pickled bytes (not tensors)."""
    mappings = metadata.planner_data or {}
    return {
        str(mappings.get(fqn, (fqn,))[0])
        for fqn, item in metadata.state_dict_metadata.items()
        if isinstance(item, BytesStorageMetadata) and len(mappings.get(fqn, (fqn,))) == 1
    }


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values load with ``weights_only=True``."""

    def __init__(self, url: str, weights_only: bool) -> None:
        super().__init__()
        self._url = url
        self._weights_only = weights_only

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Unpickle one non-tensor value (safely unless ``weights_only=False``)."""
        try:
            loaded = torch.load(value, weights_only=self._weights_only)
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


class _SafeReadAllPlanner(_SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """Load every item (or those under ``keys``) as full tensors / values, non-tensors safely."""

    def __init__(self, url: str, weights_only: bool, keys: set[str] | None) -> None:
        super().__init__(url, weights_only)
        self.keys = keys


def read(
    template: dict[str, Any], location: Location, storage_options: Any, weights_only: bool
) -> None:
    """Fill ``template`` in place from the checkpoint (a collective: every rank calls it)."""
    with _single_process_ok():
        dcp_load(
            template,
            storage_reader=FsspecReader(location.url, **dict(storage_options or {})),
            planner=_SafeLoadPlanner(location.url, weights_only),
            no_dist=not _distributed(),
        )


def read_all(
    location: Location, storage_options: Any, weights_only: bool, keys: set[str] | None = None
) -> dict[str, Any]:
    """Return the checkpoint (or its top-level ``keys``) with full tensors, in this process only."""
    checkpoint: dict[str, Any] = {}
    if keys is not None and not keys:
        return checkpoint
    # The private loader, as torch's own format_utils does: the public one copies the dict, so
    # a planner that builds the state from the metadata would fill a copy we never see.
    _load_state_dict(
        checkpoint,
        storage_reader=FsspecReader(location.url, **dict(storage_options or {})),
        planner=_SafeReadAllPlanner(location.url, weights_only, keys),
        no_dist=True,
    )
    return checkpoint


def skeleton(metadata: Metadata) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """Build the checkpoint's tree with full-size tensors that are allocated but not read.

    Returns ``(tree, {item name: tensor}, [names of non-tensor items])``. Untouched tensor
    memory is not resident, so this costs next to nothing until the tensors are filled.
    """
    tree: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    values: list[str] = []
    mappings = metadata.planner_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        path = mappings.get(fqn, (fqn,))
        if isinstance(item, TensorStorageMetadata):
            tensors[fqn] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
            set_element(tree, path, tensors[fqn])
        else:
            values.append(fqn)
    return tree, tensors, values


def read_items(
    location: Location, storage_options: Any, items: dict[str, Any], weights_only: bool
) -> None:
    """Fill ``{item name: tensor or None}`` in place from the checkpoint, in this process only."""
    _load_state_dict(
        items,
        storage_reader=FsspecReader(location.url, **dict(storage_options or {})),
        planner=_SafeLoadPlanner(location.url, weights_only),
        no_dist=True,
    )


def read_values(
    location: Location,
    storage_options: Any,
    metadata: Metadata,
    tree: dict[str, Any],
    names: list[str],
    *,
    weights_only: bool,
) -> None:
    """Read the non-tensor items ``names`` and put them into ``tree`` where they belong."""
    values: dict[str, Any] = dict.fromkeys(names)
    read_items(location, storage_options, values, weights_only)
    mappings = metadata.planner_data or {}
    for name, value in values.items():
        set_element(tree, mappings.get(name, (name,)), value)


def check_pieces(location: Location, storage_options: Any) -> list[str]:
    """Return problems with the pieces ``.metadata`` names: missing or shorter than needed."""
    metadata = read_metadata(location, storage_options)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for relative, end in sorted(needed.items()):
        piece = posixpath.join(location.path, relative)
        if not location.fs.exists(piece):
            problems.append(f"{relative}: missing")
        elif int(location.fs.size(piece)) < end:
            problems.append(f"{relative}: truncated ({location.fs.size(piece)} < {end} bytes)")
    return problems
