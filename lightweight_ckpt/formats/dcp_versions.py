"""Version folders of a sharded checkpoint: naming, creating, and removing the replaced ones.

Every sharded save writes its pieces into a fresh ``<path>/v-<id>/`` folder and commits by
publishing ``.metadata`` (``formats.dcp_dir``). The folders the commit replaced are then removed
by rank 0, **off the save's critical path** on local disk: ``remove_stale_versions`` lists them
at once and hands the deletion to a background thread, so the save returns as soon as the commit
is durable (on object stores the batched delete is cheap and stays synchronous). What keeps that
safe:

- **Commit first.** Callers remove only after the commit (``.metadata`` names the new version),
  and the stale folders are listed when the removal is scheduled: a folder created later (the
  next save's) is never among them.
- **No race with the next operation on the path.** The next save (``prepare``), metadata read
  (every load, ``verify``, ``consolidate``) or removal at the same path in this process first
  waits for a pending removal there (``settle``). ``wait_for_removals`` waits for all of them
  (``Strategy.wait`` / ``teardown``, and at interpreter exit).
- **Crashes leave orphans only.** A process killed mid-removal leaves ``v-`` folders that
  ``.metadata`` does not name; ``gc`` (``manager.orphans``) finds them.
- **Failures are logged, not raised.** The save the removal follows has committed; a folder
  that could not be removed is an orphan for ``gc``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import posixpath
import threading
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CheckpointWriteError

if TYPE_CHECKING:
    from lightweight_ckpt.storage import Location

log = logging.getLogger("lightweight_ckpt")

VERSION_PREFIX = "v-"

_lock = threading.Lock()
_pending: dict[tuple[str, str], Future[None]] = {}


def new_version() -> str:
    """Return a fresh version folder name (rank 0 picks it; every rank must use the same)."""
    return f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"


def prepare(location: Location, version: str) -> None:
    """Create the version folder on this rank's view of the filesystem.

    A removal still running at this path (the previous save's) finishes first.
    """
    settle(location)
    if location.fs.isfile(location.path):
        raise CheckpointWriteError(
            f"{location.url}: a single-file checkpoint is there; a sharded checkpoint is a "
            "directory. Choose another path or remove the file."
        )
    location.fs.makedirs(posixpath.join(location.path, version), exist_ok=True)


def _key(location: Location) -> tuple[str, str]:
    return location.protocol, location.path.rstrip("/")


def settle(location: Location) -> None:
    """Wait until no removal scheduled in this process is running at ``location``."""
    with _lock:
        pending = _pending.get(_key(location))
    if pending is not None:
        pending.result()  # _remove never raises


def wait_for_removals() -> None:
    """Wait until every removal scheduled in this process has finished."""
    with _lock:
        pending = list(_pending.values())
    for future in pending:
        future.result()


def remove_stale_versions(location: Location, keep: str) -> None:
    """Remove the version folders other than ``keep`` (after the commit; rank 0 only).

    The folders are listed now. On local disk they are deleted on a background thread (unlinking
    large pieces drops their cached pages: tens of ms per 100 MB); elsewhere before this returns
    (an object store deletes a folder's objects in one or two batched requests).
    """
    settle(location)
    stale = [
        entry
        for entry in location.fs.ls(location.path, detail=False)
        if posixpath.basename(entry.rstrip("/")).startswith(VERSION_PREFIX)
        and posixpath.basename(entry.rstrip("/")) != keep
    ]
    if not stale:
        return
    if not location.is_local:
        _remove(location, stale)
        return
    key = _key(location)
    future: Future[None] = Future()
    future.add_done_callback(lambda done: _forget(key, done))
    with _lock:
        _pending[key] = future
    # a daemon thread (so it never counts as a leaked worker); ``wait_for_removals`` runs at
    # exit, so a normal exit still finishes the removal
    threading.Thread(
        target=_remove, args=(location, stale, future), name="lwckpt-cleanup", daemon=True
    ).start()


def _forget(key: tuple[str, str], done: Future[None]) -> None:
    with _lock:
        if _pending.get(key) is done:
            del _pending[key]


def _remove(location: Location, stale: list[str], done: Future[None] | None = None) -> None:
    """Delete ``stale`` folders; on local disk their files in parallel. Never raises.

    Unlinking a large piece drops its cached pages, which is most of the time spent here, so
    the files go in ``io_threads`` threads.
    """
    try:
        if location.is_local:
            _unlink_all([file for folder in stale for file in location.fs.find(folder)])
        with contextlib.suppress(FileNotFoundError):  # another process removed them first
            location.fs.rm(stale, recursive=True)
    except Exception as err:  # noqa: BLE001 - the save committed; leftovers are orphans for gc
        log.warning(
            "%s: could not remove replaced version folder(s) %s (%s: %s); "
            "`python -m lightweight_ckpt gc` removes them later",
            location.url,
            [posixpath.basename(folder.rstrip("/")) for folder in stale],
            type(err).__name__,
            err,
        )
    finally:
        if done is not None:
            done.set_result(None)


def _unlink_all(files: list[str]) -> None:
    """Unlink ``files`` in up to ``io_threads`` threads (daemons, like the removal's own)."""
    count = max(1, min(len(files), settings().io_threads))
    shares = [files[index::count] for index in range(count)]
    helpers = [threading.Thread(target=_unlink_each, args=(s,), daemon=True) for s in shares[1:]]
    for helper in helpers:
        helper.start()
    _unlink_each(shares[0])
    for helper in helpers:
        helper.join()


def _unlink_each(files: list[str]) -> None:
    for file in files:
        _unlink(file)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _after_fork_in_child() -> None:
    """A forked child has no removal threads: start afresh (its parent's removals are not its)."""
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()
    _pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(wait_for_removals)
