"""Leftovers of killed saves: find them, and remove them once they are surely abandoned.

Atomic saves leave nothing half-written *in place* of a checkpoint, but a process killed
mid-save can leave, beside it:

- ``temp file``: ``.<name>.tmp-<12 hex>``, the staged file of ``storage.staged_write`` on local
  disk and on filesystems without deferred commits (on S3/GCS an interrupted save is an
  incomplete multipart upload instead, which a bucket lifecycle rule removes; not handled here);
- ``stale version``: a ``v-<12 hex>`` folder of a sharded checkpoint that its ``.metadata`` does
  not name: pieces of a save that died before its commit, or an old version whose removal after
  the commit was interrupted.

A save in progress looks the same, so only leftovers whose newest file is older than
``older_than_s`` (default one hour) are orphans; a sharded checkpoint whose ``.metadata`` cannot
be read is left alone (it may be under inspection). Entries whose age the filesystem does not
report are skipped. ``find_orphans`` only lists; ``remove_orphans`` deletes what it is given.
"""

from __future__ import annotations

import datetime
import posixpath
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightweight_ckpt.errors import CheckpointError, CheckpointNotFoundError, InvalidCheckpointError
from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.storage import Location, call_with_retries, remove, resolve

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightweight_ckpt.types import StorageOptions

DEFAULT_OLDER_THAN_S = 3600.0
TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")
VERSION_NAME = re.compile(rf"^{re.escape(dcp_dir.VERSION_PREFIX)}[0-9a-f]{{12}}$")


@dataclass(frozen=True)
class Orphan:
    """A leftover of a killed save."""

    path: str
    """Its URL (or local path), as ``find_orphans`` was given the directory."""
    kind: Literal["temp file", "stale version"]
    age_s: float
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        """Return the orphan as JSON-able data."""
        return {"path": self.path, "kind": self.kind, "age_s": self.age_s, "bytes": self.nbytes}


def find_orphans(
    path: str,
    storage_options: StorageOptions | None = None,
    older_than_s: float = DEFAULT_OLDER_THAN_S,
    clock: Callable[[], float] = time.time,
) -> list[Orphan]:
    """List the orphans under the directory ``path`` (recursively), oldest first.

    Raises:
        ValueError: ``older_than_s`` is negative.
        CheckpointNotFoundError: ``path`` does not exist.
        InvalidCheckpointError: ``path`` is a file.
        CheckpointReadError: the store failed for good (after retries), or refused access.
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    root = resolve(path, storage_options)
    fs = root.fs
    if not call_with_retries(path, "listing", lambda: fs.exists(root.path)):
        raise CheckpointNotFoundError(f"{path}: no such directory")
    if not call_with_retries(path, "listing", lambda: fs.isdir(root.path)):
        raise InvalidCheckpointError(f"{path}: is a file; orphans are looked for in a directory")
    entries: dict[str, dict[str, Any]] = call_with_retries(
        path, "listing", lambda: fs.find(root.path, withdirs=True, detail=True)
    )
    now = clock()
    found: list[Orphan] = []
    for name, info in sorted(entries.items()):
        base = posixpath.basename(name.rstrip("/"))
        if info.get("type") == "file" and TEMP_NAME.match(base):
            age = _age_s(now, info)
            if age is not None and age >= older_than_s:
                found.append(Orphan(_url(root, path, name), "temp file", age, int(info["size"])))
        elif info.get("type") == "directory" and VERSION_NAME.match(base):
            scan = _Scan(root, path, storage_options, now, older_than_s)
            orphan = _stale_version(scan, name, entries)
            if orphan is not None:
                found.append(orphan)
    return sorted(found, key=lambda orphan: -orphan.age_s)


def remove_orphans(
    orphans: list[Orphan], storage_options: StorageOptions | None = None
) -> list[str]:
    """Delete ``orphans`` (as ``find_orphans`` listed them); return the paths removed."""
    removed = []
    for orphan in orphans:
        remove(resolve(orphan.path, storage_options))
        removed.append(orphan.path)
    return removed


@dataclass(frozen=True)
class _Scan:
    root: Location
    path: str
    storage_options: StorageOptions | None
    now: float
    older_than_s: float


def _stale_version(scan: _Scan, folder: str, entries: dict[str, dict[str, Any]]) -> Orphan | None:
    root, path, now = scan.root, scan.path, scan.now
    checkpoint = posixpath.dirname(folder.rstrip("/"))
    location = Location(root.fs, checkpoint, _url(root, path, checkpoint))
    metadata_path = posixpath.join(checkpoint, dcp_dir.METADATA)
    if call_with_retries(path, "listing", lambda: root.fs.exists(metadata_path)):
        try:
            metadata = dcp_dir.read_metadata(location)
        except CheckpointError:
            return None  # damaged: leave it for inspection
        used = {
            info.relative_path.split("/", 1)[0] for info in (metadata.storage_data or {}).values()
        }
        if posixpath.basename(folder.rstrip("/")) in used:
            return None
    prefix = folder.rstrip("/") + "/"
    files = [i for n, i in entries.items() if n.startswith(prefix) and i.get("type") == "file"]
    file_ages = [_age_s(now, info) for info in files]
    own_age = _age_s(now, entries[folder])  # object stores have no folder times
    ages = [age for age in [*file_ages, own_age] if age is not None]
    if None in file_ages or not ages or min(ages) < scan.older_than_s:
        return None  # something in it is recent (or of unknown age): a save may be running
    nbytes = sum(int(info.get("size") or 0) for info in files)
    return Orphan(_url(root, path, folder), "stale version", min(ages), nbytes)


def _age_s(now: float, info: dict[str, Any]) -> float | None:
    """Seconds since the entry last changed, from whatever its filesystem reports."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return now - float(value)
        if isinstance(value, datetime.datetime):
            return now - value.timestamp()
        if isinstance(value, str):
            try:
                return (
                    now - datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                )
            except ValueError:
                continue
    return None


def _url(root: Location, path: str, native: str) -> str:
    """The URL of ``native`` (a path of ``root.fs``), spelled as the user spelled ``path``."""
    relative = posixpath.relpath(native, root.path)
    return posixpath.join(path.rstrip("/"), relative) if relative != "." else path
