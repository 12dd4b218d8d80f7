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
  and load values with ``weights_only=True``, so a checkpoint cannot run code on load
  (``formats.dcp_reader``; on object stores items are verified as parallel streams, fetched
  once and copied straight into their targets: ``dcp_remote``).
- **Object stores.** Elsewhere than on local disk each piece and checksum record is a
  ``storage.staged_write`` (S3 multipart / GCS composite uploads: parallel parts, bounded
  memory, a progress bar, aborted on failure) instead of DCP's ``fs.open``; DCP's reader and
  writer use the ``Location``'s own client. Every metadata call (``.metadata``, the piece
  listing, records) is retried on transient faults (``storage.call_with_retries``).
- **Our errors.** DCP's ``CheckpointException`` (a ``BaseException``) becomes a
  ``CheckpointError`` naming the path: a store that failed for good is a
  ``CheckpointReadError``/``CheckpointWriteError`` (``storage.storage_error``), never damage
  (``formats.dcp_calls``).
- **Reads.** The tensors and values of a committed checkpoint are read into a tree by
  ``formats.dcp_load`` (one collective DCP pass, or this rank's part planned, checked and read
  in steps); its names are re-exported here.
- **No ``.metadata``, no checkpoint.** A folder without it (an interrupted first save) raises
  ``CheckpointNotFoundError``.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import posixpath
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StoragePrefix

from lightweight_ckpt.compat import DCP_VERSION, dcp_save, storage_meta
from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointError,
)
from lightweight_ckpt.formats import dcp_checksums, dcp_load, dcp_reader, dcp_staging, dcp_versions
from lightweight_ckpt.formats.dcp_calls import (
    distributed,
    single_process_ok,
    translate,
    without_torch_crc32,
)
from lightweight_ckpt.storage import (
    Location,
    Sink,
    call_with_retries,
    is_directory,
    staged_write,
    write_with_retries,
)

if TYPE_CHECKING:
    import contextlib

    from torch.distributed.checkpoint.metadata import (
        Metadata,
        StorageMeta,
    )
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future


log = logging.getLogger("lightweight_ckpt")

METADATA = dcp_reader.METADATA

# reads live in ``dcp_load`` and version folders in ``dcp_versions``; io, manager, strategies
# and tests use these names from here
VERSION_PREFIX = dcp_versions.VERSION_PREFIX
new_version = dcp_versions.new_version
prepare = dcp_versions.prepare
remove_stale_versions = dcp_versions.remove_stale_versions
PlannedRead = dcp_load.PlannedRead
plan_read = dcp_load.plan_read
read = dcp_load.read
read_items = dcp_load.read_items
read_values = dcp_load.read_values
skeleton = dcp_load.skeleton
tensors_of = dcp_load.tensors_of


def is_sharded(location: Location) -> bool:
    """Return True if ``location`` is a directory (a sharded checkpoint, committed or not).

    Retried; a store that fails for good raises ``CheckpointReadError`` naming the URL.
    """
    return is_directory(location)


class _VersionedWriter(FsspecWriter):
    """DCP's fsspec writer: pieces in ``<version>/`` with checksum records, ``.metadata`` last."""

    def __init__(self, location: Location, version: str) -> None:
        # sync_files=False: write_records makes pieces and records durable together, one fsync
        # each; DCP's own would fsync a piece before its record exists (a second journal commit)
        url = location.url
        # FsspecWriter.__init__ would build a client of its own from the URL (on torch 2.4
        # without the storage options); DCP's fsspec adapter gets the client ``storage``
        # configured (endpoint, timeouts) and its caches instead.
        FileSystemWriter.__init__(self, url, sync_files=False, overwrite=True)
        self.fs = dcp_reader.FsspecAdapter(location.fs)
        self.path = url
        self._location = location
        self._url = url
        self._remote = not location.is_local
        self._version = version
        spare = dcp_versions.spare_for(location, version)
        reuse = None
        if spare is not None:  # overwrite the pieces of the version two saves back, in place
            folder = posixpath.join(location.path, spare)

            def reuse(piece: str) -> contextlib.AbstractContextManager[Any] | None:
                return dcp_versions.reuse_piece(
                    posixpath.join(folder, posixpath.basename(piece)), piece
                )

        upload = None
        if self._remote:  # our staged uploads (parallel parts, aborted on failure), not fs.open

            def upload(target: str) -> contextlib.AbstractContextManager[Sink]:
                # every rank of the node uploads its pieces now: share the parts in flight
                return staged_write(inside(location, target), settings().piece_parts_in_flight)

        self.fs: Any = dcp_checksums.ChecksumRecorder(self.fs, reuse, upload)

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

        Elsewhere than on local disk each piece and record is a ``storage.staged_write``: on
        S3 and GCS a multipart upload of parallel parts with bounded memory and a progress bar,
        published when whole and aborted on failure. The rank's pieces are retried as a whole
        on transient faults: nothing names this version yet, so writing them again is safe.
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
        return storage_meta(
            checkpoint_id=self.checkpoint_id,
            save_id=self.save_id,
            modules=[dcp_checksums.MARKER],
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Publish ``.metadata`` atomically, in one staged write (rank 0)."""
        if DCP_VERSION is not None:
            metadata.version = DCP_VERSION
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        metadata.storage_meta = self.storage_meta()
        target = inside(self._location, posixpath.join(self._url, METADATA))
        data = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        write_with_retries(target, lambda sink: _write_all(sink, data))


def _write_all(sink: Sink, data: bytes) -> None:
    sink.write(data)


def inside(location: Location, url: str) -> Location:
    """The ``Location`` of ``url``, a path under ``location``'s URL, on the same client."""
    relative = url[len(location.url) :].lstrip("/")
    return Location(location.fs, posixpath.join(location.path, relative), url)


def write(checkpoint: dict[str, Any], location: Location, version: str) -> None:
    """Save this rank's piece of ``checkpoint`` (a collective: every rank calls it)."""
    writer = _VersionedWriter(location, version)
    try:
        with single_process_ok(), without_torch_crc32():
            dcp_save(
                checkpoint,
                storage_writer=writer,
                process_group=dcp_staging.group_of_this_thread(),
                no_dist=not distributed(),
            )
    except CheckpointException as err:
        raise translate(location.url, err, writing=True) from err
    dcp_versions.note_committed(location, version)  # DCP returns on every rank after the commit


def read_metadata(location: Location) -> Metadata:
    """Return the committed checkpoint's DCP metadata.

    Raises:
        CheckpointNotFoundError: no committed ``.metadata`` but a version folder (a save died).
        InvalidCheckpointError: a directory that is no sharded checkpoint at all.
        CorruptCheckpointError: ``.metadata`` is unreadable.
    """
    dcp_versions.settle(location)  # a removal of replaced versions running here ends first
    if not location.is_local:  # another process may have committed since this fs listed it
        location.fs.invalidate_cache(location.path)
    fs, url = location.fs, location.url
    if not call_with_retries(url, "reading", lambda: fs.exists(_metadata_path(location))):
        entries = call_with_retries(url, "reading", lambda: fs.ls(location.path, detail=False))
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
        metadata: Metadata = dcp_reader.reader_for(location).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CorruptCheckpointError(f"{location.url}: {METADATA} is unreadable: {err}") from err
    dcp_reader.keep_parsed(location, metadata)
    if not dcp_checksums.is_checksummed(metadata) and (
        not distributed() or torch.distributed.get_rank() == 0
    ):
        log.warning(
            "%s: written without checksum records (before lightweight_ckpt added them); "
            "its pieces are read unverified",
            location.url,
        )
    return metadata


def _metadata_path(location: Location) -> str:
    return posixpath.join(location.path, METADATA)


def top_level_keys(metadata: Metadata) -> dict[str, list[str]]:
    """Return ``{state key: [flattened item names under it]}`` from DCP metadata."""
    keys: dict[str, list[str]] = {}
    mappings = metadata.planner_data or {}
    for fqn in metadata.state_dict_metadata:
        path = mappings.get(fqn, (fqn,))
        keys.setdefault(str(path[0]), []).append(fqn)
    return keys


def check_pieces(location: Location, metadata: Metadata | None = None) -> list[str]:
    """Return problems with the pieces ``.metadata`` names: missing or shorter than needed.

    The sizes come from one listing per version folder (retried on transient faults).

    Raises:
        CheckpointReadError: the store failed for good (after retries), or refused access.
    """
    metadata = metadata or read_metadata(location)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(relative) for relative in needed}):
        sizes.update(_sizes_in(location, folder))
    problems = []
    for relative, end in sorted(needed.items()):
        size = sizes.get(relative)
        if size is None:
            problems.append(f"{relative}: missing")
        elif size < end:
            problems.append(f"{relative}: truncated ({size} < {end} bytes)")
    return problems


def _sizes_in(location: Location, folder: str) -> dict[str, int]:
    """``{path relative to the checkpoint: size}`` of the files in one folder of it."""
    fs, path = location.fs, posixpath.join(location.path, folder).rstrip("/")
    if not location.is_local:
        fs.invalidate_cache(path)
    try:
        entries = call_with_retries(location.url, "reading", lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return {}
    return {
        posixpath.join(folder, posixpath.basename(entry["name"].rstrip("/"))): int(entry["size"])
        for entry in entries
        if entry.get("type") == "file"
    }


def require_pieces(location: Location, metadata: Metadata) -> None:
    """Raise before any data is read if a piece is missing or truncated (no partial loads).

    Raises:
        CorruptCheckpointError: naming the path and every damaged piece.
    """
    problems = check_pieces(location, metadata)
    if problems:
        raise CorruptCheckpointError(
            f"{location.url}: damaged sharded checkpoint: {'; '.join(problems)}. "
            "Load an earlier checkpoint."
        )


def verify(location: Location) -> tuple[list[str], int, str]:
    """Check every piece of a committed checkpoint: sizes, then every stored item's CRC32.

    Returns ``(problems, stored items checked, what was checked)``.
    """
    metadata = read_metadata(location)
    problems = check_pieces(location, metadata)
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
