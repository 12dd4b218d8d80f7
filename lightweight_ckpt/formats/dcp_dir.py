"""The sharded format: a directory in the ``torch.distributed.checkpoint`` (DCP) layout.

Stock ``torch.distributed.checkpoint.load`` and ``format_utils`` read it. We add what DCP's own
fsspec writer lacks, without changing the format:

- **Atomic commit.** DCP names pieces ``__<rank>_<n>.distcp`` and, on overwrite, deletes the old
  ``.metadata`` before renaming the new one, so a crash mid-save leaves nothing loadable. We write
  every save's pieces into a fresh version folder (``<path>/v-<id>/__<rank>_<n>.distcp``; the
  metadata records that relative path, so stock readers resolve it) and publish ``.metadata``
  last through ``storage.staged_write`` (an atomic replace on every filesystem). Until then the
  previous checkpoint is intact; afterwards rank 0 removes the replaced version folders on a
  background thread (``formats.dcp_versions``).
- **Safe loads.** DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with
  ``weights_only=False``; we read ``.metadata`` through an allowlist of DCP's metadata classes
  and load values with ``weights_only=True``, so a checkpoint cannot run code on load.
- **Our errors.** DCP's ``CheckpointException`` (a ``BaseException``) becomes a
  ``CheckpointError`` naming the path.
- **No ``.metadata``, no checkpoint.** A folder without it (an interrupted first save) raises
  ``CheckpointNotFoundError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import posixpath
import threading
import warnings
from typing import IO, TYPE_CHECKING, Any, cast

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import (
    CURRENT_DCP_VERSION,
    FileSystemReader,
    _StoragePrefix,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.futures import Future

from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from lightweight_ckpt.formats import dcp_checksums, dcp_remote, dcp_staging, dcp_versions
from lightweight_ckpt.storage import Location, call_with_retries, resolve, staged_write

if TYPE_CHECKING:
    import io
    from collections.abc import Iterator

    from torch.distributed.checkpoint.planner import (
        LoadPlan,
        LoadPlanner,
        ReadItem,
        SavePlan,
        SavePlanner,
    )
    from torch.distributed.checkpoint.storage import WriteResult

    from lightweight_ckpt.types import StorageOptions

log = logging.getLogger("lightweight_ckpt")

METADATA = ".metadata"

# version folders live in ``dcp_versions``; io, manager and tests use these names from here
VERSION_PREFIX = dcp_versions.VERSION_PREFIX
new_version = dcp_versions.new_version
prepare = dcp_versions.prepare
remove_stale_versions = dcp_versions.remove_stale_versions


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


def is_sharded(location: Location) -> bool:
    """Return True if ``location`` is a directory (a sharded checkpoint, committed or not)."""
    return bool(location.fs.isdir(location.path))


class _VersionedWriter(FsspecWriter):
    """DCP's fsspec writer: pieces in ``<version>/`` with checksum records, ``.metadata`` last."""

    def __init__(
        self, location: Location, version: str, storage_options: StorageOptions | None
    ) -> None:
        # sync_files=False: write_records makes pieces and records durable together, one fsync
        # each; DCP's own would fsync a piece before its record exists (a second journal commit)
        url = location.url
        super().__init__(url, sync_files=False, overwrite=True, **dict(storage_options or {}))
        self._url = url
        self._remote = not location.is_local
        self._version = version
        self._storage_options = storage_options
        self.fs: Any = dcp_checksums.ChecksumRecorder(self.fs)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Skip DCP's mkdir and ``.metadata`` probe: ``prepare`` made the version folder."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Name every rank's pieces ``<version>/__<rank>_<n>.distcp``."""
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"{self._version}/__{i}_"))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's pieces and their checksum records, durably (before any commit).

        On object stores each is retried on transient faults: nothing names this version yet,
        so writing a piece or a record again is safe (``dcp_remote``).
        """
        if not self._remote:
            written = super().write_data(plan, planner)
            dcp_checksums.write_records(self.fs, self.path, written.wait())
            return written
        write = super().write_data
        written = call_with_retries(self._url, "writing", lambda: write(plan, planner))
        results = written.wait()
        call_with_retries(
            self._url,
            "writing",
            lambda: dcp_checksums.write_records(self.fs, self.path, results),
        )
        return written

    def storage_meta(self) -> StorageMeta | None:
        """Mark the checkpoint as checksummed (a missing record is then damage)."""
        return StorageMeta(
            checkpoint_id=self.checkpoint_id,
            save_id=self.save_id,
            modules=[dcp_checksums.MARKER],
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Publish ``.metadata`` atomically, in one staged write (rank 0)."""
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        metadata.storage_meta = self.storage_meta()
        target = resolve(posixpath.join(self._url, METADATA), self._storage_options)
        with staged_write(target) as sink:
            pickle.dump(metadata, cast("IO[bytes]", sink), protocol=pickle.HIGHEST_PROTOCOL)


def write(
    checkpoint: dict[str, Any], location: Location, version: str, storage_options: Any
) -> None:
    """Save this rank's piece of ``checkpoint`` (a collective: every rank calls it)."""
    writer = _VersionedWriter(location, version, storage_options)
    try:
        with _single_process_ok():
            dcp_save(
                checkpoint,
                storage_writer=writer,
                process_group=dcp_staging.group_of_this_thread(),
                no_dist=not _distributed(),
            )
    except CheckpointException as err:
        raise _translate(location.url, err, writing=True) from err


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickle ``.metadata`` allowing only what DCP metadata holds (DCP itself allows anything)."""

    def find_class(self, module: str, name: str) -> Any:
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


def _keep_parsed(location: Location, metadata: Metadata) -> None:
    key = _file_identity(location)
    if key is None:
        return
    with _PARSED_LOCK:
        while len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = metadata


def _take_parsed(location: Location) -> Metadata | None:
    key = _file_identity(location)
    if key is None:
        return None
    with _PARSED_LOCK:
        return _PARSED.pop(key, None)


class _SafeReader(FileSystemReader):
    """DCP's reader, made safe: allowlisted metadata, items checked before they are read.

    ``.metadata`` goes through ``_MetadataUnpickler``, never plain pickle, and every stored item
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
            metadata: Metadata = _MetadataUnpickler(stream).load()
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


class _SafeFileSystemReader(_SafeReader):
    """DCP's local file reader, made safe."""


class _SafeFsspecReader(_SafeReader, FsspecReader):
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


def _reader(location: Location, storage_options: Any) -> _SafeReader:
    """DCP's plain file reader on local disk (no fsspec layer), its fsspec reader elsewhere."""
    reader: _SafeReader
    if location.is_local:
        reader = _SafeFileSystemReader(location.path)
    else:
        reader = _SafeFsspecReader(location.url, **dict(storage_options or {}))
    reader.location = location
    return reader


def _translate(url: str, err: CheckpointException, writing: bool) -> Exception:
    """Turn DCP's ``CheckpointException`` (a BaseException!) into one of our errors."""
    failures = [
        wrapped[0] if isinstance(wrapped, tuple) else wrapped
        for wrapped in getattr(err, "failures", {}).values()
    ]
    for failure in failures:
        if isinstance(failure, CheckpointError):
            return failure
    ranks = sorted(getattr(err, "failures", {}))
    detail = "; ".join(f"{type(f).__name__}: {f}" for f in failures) or str(err)
    if writing:
        return CheckpointWriteError(f"{url}: sharded save failed on rank(s) {ranks}: {detail}")
    if "Missing key in checkpoint state_dict" in detail:
        return StateMismatchError(f"{url}: the sharded checkpoint lacks entries: {detail}")
    if any(isinstance(f, FileNotFoundError) for f in failures):
        return CorruptCheckpointError(
            f"{url}: a piece of the sharded checkpoint is missing: {detail}"
        )
    return CorruptCheckpointError(f"{url}: the sharded checkpoint is unreadable: {detail}")


def read_metadata(location: Location, storage_options: Any) -> Metadata:
    """Return the committed checkpoint's DCP metadata.

    Raises:
        CheckpointNotFoundError: no committed ``.metadata`` but a version folder (a save died).
        InvalidCheckpointError: a directory that is no sharded checkpoint at all.
        CorruptCheckpointError: ``.metadata`` is unreadable.
    """
    dcp_versions.settle(location)  # a removal of replaced versions running here ends first
    if not location.is_local:  # another process may have committed since this fs listed it
        location.fs.invalidate_cache(location.path)
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
        metadata: Metadata = _reader(location, storage_options).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CorruptCheckpointError(f"{location.url}: {METADATA} is unreadable: {err}") from err
    _keep_parsed(location, metadata)
    if not dcp_checksums.is_checksummed(metadata) and (
        not _distributed() or torch.distributed.get_rank() == 0
    ):
        log.warning(
            "%s: written without checksum records (before lightweight_ckpt added them); "
            "its pieces are read unverified",
            location.url,
        )
    return metadata


def top_level_keys(metadata: Metadata) -> dict[str, list[str]]:
    """Return ``{state key: [flattened item names under it]}`` from DCP metadata."""
    keys: dict[str, list[str]] = {}
    mappings = metadata.planner_data or {}
    for fqn in metadata.state_dict_metadata:
        path = mappings.get(fqn, (fqn,))
        keys.setdefault(str(path[0]), []).append(fqn)
    return keys


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


def read(
    template: dict[str, Any], location: Location, storage_options: Any, weights_only: bool
) -> None:
    """Fill ``template`` in place from the checkpoint (a collective: every rank calls it).

    The metadata ``read_metadata`` parsed for this load is not parsed again (local disk).
    """
    reader = _reader(location, storage_options)
    reader.known_metadata = _take_parsed(location)
    try:
        with _single_process_ok():
            dcp_load(
                template,
                storage_reader=reader,
                planner=_SafeLoadPlanner(location.url, weights_only),
                no_dist=not _distributed(),
            )
    except CheckpointException as err:
        raise _translate(location.url, err, writing=False) from err


def skeleton(metadata: Metadata, keys: set[str] | None = None) -> dict[str, Any]:
    """Build the checkpoint's tree (or its top-level ``keys``) for DCP to fill.

    Tensors are full-size, allocated but unread (untouched memory is not resident); non-tensor
    values are ``None`` placeholders that the load replaces.
    """
    tree: dict[str, Any] = {}
    mappings = metadata.planner_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        path = mappings.get(fqn, (fqn,))
        if keys is not None and str(path[0]) not in keys:
            continue
        value = None
        if isinstance(item, TensorStorageMetadata):
            value = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        set_element(tree, path, value)
    return tree


def tensors_of(tree: Any, metadata: Metadata) -> dict[str, torch.Tensor]:
    """Map each tensor item's name in ``metadata`` to its tensor in a ``skeleton`` tree."""
    found: dict[str, torch.Tensor] = {}
    mappings = metadata.planner_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            node = tree
            for part in mappings.get(fqn, (fqn,)):
                node = node[part]
            found[fqn] = node
    return found


def read_items(
    location: Location,
    storage_options: Any,
    items: dict[str, Any],
    weights_only: bool,
    *,
    metadata: Metadata | None = None,
) -> None:
    """Fill ``{item name: tensor or None}`` in place from the checkpoint, in this process only.

    Pass the checkpoint's ``metadata`` when reading item by item: DCP otherwise reads and
    unpickles ``.metadata`` again on every call (90% of a 600-tensor consolidate).
    """
    reader = _reader(location, storage_options)
    reader.known_metadata = metadata
    try:
        _load_state_dict(
            items,
            storage_reader=reader,
            planner=_SafeLoadPlanner(location.url, weights_only),
            no_dist=True,
        )
    except CheckpointException as err:
        raise _translate(location.url, err, writing=False) from err


def read_values(
    location: Location,
    storage_options: Any,
    metadata: Metadata,
    tree: dict[str, Any],
    *,
    weights_only: bool,
) -> None:
    """Read every non-tensor item and put it into ``tree`` where it belongs."""
    mappings = metadata.planner_data or {}
    names = [
        fqn
        for fqn, item in metadata.state_dict_metadata.items()
        if isinstance(item, BytesStorageMetadata)
    ]
    values: dict[str, Any] = dict.fromkeys(names)
    read_items(location, storage_options, values, weights_only, metadata=metadata)
    for name, value in values.items():
        set_element(tree, mappings.get(name, (name,)), value)


def check_pieces(
    location: Location, storage_options: Any, metadata: Metadata | None = None
) -> list[str]:
    """Return problems with the pieces ``.metadata`` names: missing or shorter than needed."""
    metadata = metadata or read_metadata(location, storage_options)
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


def require_pieces(location: Location, storage_options: Any, metadata: Metadata) -> None:
    """Raise before any data is read if a piece is missing or truncated (no partial loads).

    Raises:
        CorruptCheckpointError: naming the path and every damaged piece.
    """
    problems = check_pieces(location, storage_options, metadata)
    if problems:
        raise CorruptCheckpointError(
            f"{location.url}: damaged sharded checkpoint: {'; '.join(problems)}. "
            "Load an earlier checkpoint."
        )


def verify(location: Location, storage_options: Any) -> tuple[list[str], int, str]:
    """Check every piece of a committed checkpoint: sizes, then every stored item's CRC32.

    Returns ``(problems, stored items checked, what was checked)``.
    """
    metadata = read_metadata(location, storage_options)
    problems = check_pieces(location, storage_options, metadata)
    checked = len(metadata.storage_data or {})
    if not dcp_checksums.is_checksummed(metadata):
        return problems, checked, "sharded: metadata and piece sizes (no checksum records)"
    damaged = {problem.split(":", 1)[0] for problem in problems}
    stored = {
        index: info
        for index, info in (metadata.storage_data or {}).items()
        if info.relative_path not in damaged
    }
    problems += dcp_checksums.check_all(location, stored)
    return problems, checked, "sharded: metadata, piece sizes and every stored item's CRC32"
