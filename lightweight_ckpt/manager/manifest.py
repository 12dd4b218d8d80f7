"""The run directory's bookkeeping: ``Manifest``, its records and its two small files.

``Manifest`` holds in memory every committed checkpoint of one directory (``CheckpointRecord``),
the names whose deletion is under way and the names already used. It reads and writes:

- ``checkpoints.json`` (``MANIFEST_NAME``): ``format``, ``checkpoints`` (the records, by ``seq``)
  and ``deleting``;
- ``latest`` (``POINTER_NAME``): the newest committed record, for filesystems without symlinks.

Both are written whole or not at all with ``storage.staged_write``; an unreadable one is logged
and ignored. ``Manifest`` knows no ranks and no ``Fabric``: ``CheckpointManager`` decides who
reads (rank 0, then a broadcast) and ``Recorder`` who writes (rank 0 only).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.errors import CheckpointNotFoundError, InvalidCheckpointError
from lightweight_ckpt.manager.policy import (
    FORMAT_VERSION,
    SUFFIX,
    CheckpointRecord,
    RetentionPolicy,
    rank_by_score,
)
from lightweight_ckpt.storage import open_source, remove, resolve, staged_write

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

log = logging.getLogger("lightweight_ckpt")

MANIFEST_NAME = "checkpoints.json"
POINTER_NAME = "latest"


class Manifest:
    """The checkpoints of one directory (a local path or fsspec URL) and their manifest files.

    Args:
        dirpath: the directory, without a trailing slash (except a root).
        storage_options: fsspec options for ``dirpath``.
    """

    def __init__(self, dirpath: str, storage_options: Mapping[str, Any]) -> None:
        self.dirpath = dirpath
        self.storage_options = storage_options
        self.records: list[CheckpointRecord] = []
        """Committed checkpoints, kept or damaged, in the order they were recorded."""
        self.deleting: list[str] = []
        """Names whose deletion is under way."""
        self.taken: set[str] = set()
        self.next_seq = 1

    def load(self, records: list[CheckpointRecord], deleting: list[str]) -> None:
        """Take ``records`` and ``deleting`` (as ``read`` returned them) as the known state."""
        self.records = records
        self.deleting = deleting
        self.taken = {r.path for r in records} | set(deleting)
        self.next_seq = max((r.seq for r in records), default=0) + 1

    @property
    def live(self) -> tuple[CheckpointRecord, ...]:
        """The committed, kept, undamaged checkpoints, oldest first."""
        return tuple(r for r in sorted(self.records, key=lambda r: r.seq) if r.damaged is None)

    def best(self, policy: RetentionPolicy) -> CheckpointRecord | None:
        """Return the record with the best ``policy.monitor`` value, or None."""
        ranked = rank_by_score(self.records, policy)
        return next(r for r in self.records if r.path == ranked[0]) if ranked else None

    def url(self, name: str) -> str:
        """Return the URL of ``name`` inside ``dirpath`` (joined with ``/``, never ``os.path``)."""
        return self.dirpath + name if self.dirpath.endswith("/") else f"{self.dirpath}/{name}"

    # -- names and records -------------------------------------------------------------------

    def claim(self, name: str) -> str:
        """Return ``name``, or ``<stem>-vN.ckpt`` if the manifest or this run already used it."""
        stem, version = name[: -len(SUFFIX)], 0
        while name in self.taken:
            version += 1
            name = f"{stem}-v{version}{SUFFIX}"
        self.taken.add(name)
        return name

    def prune(self, kept: set[str]) -> list[str]:
        """Move the undamaged records not in ``kept`` to ``deleting``; return their names."""
        victims = sorted(r.path for r in self.records if r.damaged is None and r.path not in kept)
        self.records = [r for r in self.records if r.path not in victims]
        self.deleting.extend(victims)
        return victims

    def forget(self, removed: set[str]) -> None:
        """Drop from ``deleting`` the names that are gone."""
        self.deleting = [n for n in self.deleting if n not in removed]

    def candidates(self) -> list[CheckpointRecord]:
        """Recorded, undamaged checkpoints, newest first; the pointer if the manifest lacks it."""
        candidates = [r for r in self.records if r.damaged is None]
        pointer = self.read_pointer()
        known = {r.path for r in self.records} | set(self.deleting)
        if pointer is not None and pointer.path not in known:
            candidates.append(pointer)
        return sorted(candidates, key=lambda r: r.seq, reverse=True)

    def adopt(self, candidates: Sequence[CheckpointRecord]) -> None:
        """Record a checkpoint only the pointer named (the manifest was lost or damaged)."""
        known = {r.path for r in self.records}
        for record in candidates:
            if record.path not in known:
                self.records.append(record)
                self.taken.add(record.path)
                self.next_seq = max(self.next_seq, record.seq + 1)

    def mark_damaged(self, name: str, reason: str) -> None:
        """Mark the record ``name`` damaged with ``reason`` (its file is kept)."""
        self.records = [
            CheckpointRecord(r.path, r.seq, r.step, r.epoch, r.metrics, r.time, reason)
            if r.path == name
            else r
            for r in self.records
        ]

    # -- files -------------------------------------------------------------------------------

    def read(self) -> tuple[list[CheckpointRecord], list[str]]:
        """Return the records and ``deleting`` of the manifest file; empty if absent or bad."""
        url = self.url(MANIFEST_NAME)
        try:
            manifest = self._read_json(MANIFEST_NAME)
            if manifest is None:
                return [], []
            records = [CheckpointRecord.from_json(e) for e in manifest["checkpoints"]]
            deleting = [str(name) for name in manifest.get("deleting", [])]
        except (ValueError, TypeError, KeyError, InvalidCheckpointError) as err:
            log.warning(
                "%s: unreadable manifest (%s: %s); ignoring it: resume uses the %r pointer "
                "and older checkpoints are no longer pruned",
                url,
                type(err).__name__,
                err,
                POINTER_NAME,
            )
            return [], []
        return records, deleting

    def read_pointer(self) -> CheckpointRecord | None:
        """Return the record the pointer file names; None if absent or unreadable."""
        try:
            pointer = self._read_json(POINTER_NAME)
            return None if pointer is None else CheckpointRecord.from_json(pointer)
        except (ValueError, TypeError, KeyError, InvalidCheckpointError) as err:
            log.warning(
                "%s: unreadable pointer (%s: %s); ignoring it",
                self.url(POINTER_NAME),
                type(err).__name__,
                err,
            )
            return None

    def write(self) -> None:
        """Write the manifest file (atomic)."""
        manifest = {
            "format": FORMAT_VERSION,
            "checkpoints": [r.to_json() for r in sorted(self.records, key=lambda r: r.seq)],
            "deleting": self.deleting,
        }
        self._write_json(MANIFEST_NAME, manifest)

    def write_pointer(self, newest: str) -> None:
        """Write the pointer file naming the record ``newest`` (atomic)."""
        record = next(r for r in self.records if r.path == newest)
        pointer = {"format": FORMAT_VERSION, **record.to_json()}
        self._write_json(POINTER_NAME, pointer)

    def exists(self, name: str) -> bool:
        """Return True if the file ``name`` exists (a committed write)."""
        location = resolve(self.url(name), self.storage_options)
        return bool(location.fs.exists(location.path))

    def remove(self, name: str) -> None:
        """Delete the checkpoint ``name``; raise ``OSError`` if that fails."""
        remove(resolve(self.url(name), self.storage_options))

    def _write_json(self, name: str, data: Mapping[str, Any]) -> None:
        payload = json.dumps(data, indent=1, sort_keys=True).encode()
        with staged_write(resolve(self.url(name), self.storage_options)) as sink:
            sink.write(payload)

    def _read_json(self, name: str) -> Any:
        """Return the parsed file, or None if it does not exist."""
        location = resolve(self.url(name), self.storage_options)
        try:
            source = open_source(location)
        except CheckpointNotFoundError:
            return None
        try:
            data = source.read_at(0, source.size)
        finally:
            source.close()
        return json.loads(data)
