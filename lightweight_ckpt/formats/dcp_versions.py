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

**Spares (local disk).** From the third save at a path in one process on, a save writes its
pieces over the files of the version *two* saves back instead of allocating new ones (on ext4
here, rewriting allocated blocks takes about half the time of a fresh file, and nothing large
is unlinked): rank 0 keeps the version a commit replaced as a *spare* instead of removing it,
and the next save renames each spare piece into its new version folder and overwrites it in
place (``spare_for``; ``dcp_checksums.ChecksumRecorder`` does the rename). What keeps that safe:

- **Never a committed version.** Every rank records the versions it committed at a path
  (``note_committed``, after DCP's save returned on every rank); the spare is the one before the
  last, which ``.metadata`` stopped naming one save ago. A failed save commits nothing and
  changes no record, so the next save picks the same spare (what was renamed away is simply
  written fresh).
- **Never under a reader.** Our readers hold a shared ``flock`` on each piece from the checksum
  check to the end of the read (``dcp_reader``); a piece is reused only under an exclusive
  ``flock`` taken without waiting, and a reader that finds its piece moved raises instead of
  reading it (stock DCP readers do not lock: a read that outlasts two newer saves is not safe
  for them, as with DCP's own in-place overwrites).
- **At rest, one version.** Spares are removed at ``Strategy.teardown`` and at interpreter exit
  (``release_spares``); ``gc`` may remove one at any time (the next save then writes fresh
  files).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import posixpath
import threading
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import CheckpointError, CheckpointReadError, CheckpointWriteError
from lightweight_ckpt.storage import call_with_retries, overwrite_local_file

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from lightweight_ckpt.storage import Location

log = logging.getLogger("lightweight_ckpt")

VERSION_PREFIX = "v-"
REUSE_SPARES = True
"""Keep the replaced version as a spare for the next save to overwrite (local disk; above).

Users switch it off with ``LWCKPT_REUSE_PIECES=0`` (``config.settings().reuse_pieces``)."""

_lock = threading.Lock()
_pending: dict[tuple[str, str], Future[None]] = {}
_committed: dict[tuple[str, str], list[str]] = {}
"""The last two versions this process committed at each path (every rank records its own)."""
_spares: dict[tuple[str, str], tuple[Location, str]] = {}
"""The replaced version rank 0 keeps at each path for the next save to reuse."""


def new_version() -> str:
    """Return a fresh version folder name (rank 0 picks it; every rank must use the same)."""
    return f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"


def prepare(location: Location, version: str) -> None:
    """Create the version folder on this rank's view of the filesystem.

    A removal still running at this path (the previous save's) finishes first. Remote calls
    are retried on transient faults.

    Raises:
        CheckpointWriteError: a file is at the path, or the store failed for good.
    """
    settle(location)
    fs, url = location.fs, location.url
    if call_with_retries(url, "writing", lambda: fs.isfile(location.path)):
        raise CheckpointWriteError(
            f"{location.url}: a single-file checkpoint is there; a sharded checkpoint is a "
            "directory. Choose another path or remove the file."
        )
    folder = posixpath.join(location.path, version)
    call_with_retries(url, "writing", lambda: fs.makedirs(folder, exist_ok=True))


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


def note_committed(location: Location, version: str) -> None:
    """Record that ``version`` is committed at ``location`` (every rank, after the commit)."""
    with _lock:
        history = _committed.setdefault(_key(location), [])
        history.append(version)
        del history[:-2]


def spare_for(location: Location, version: str) -> str | None:
    """Return the version folder whose pieces a save of ``version`` may overwrite, or None.

    The version committed before the last one at ``location`` in this process (local disk).
    Every rank computes the same answer from its own record.
    """
    if not location.is_local:
        return None
    spare = _before_last(location)
    with _lock:
        return None if version in _committed.get(_key(location), ()) else spare


def _before_last(location: Location) -> str | None:
    if not (REUSE_SPARES and settings().reuse_pieces):
        return None
    with _lock:
        history = _committed.get(_key(location), [])
        return history[0] if len(history) == 2 else None  # noqa: PLR2004 - two are kept


def reuse_piece(spare_piece: str, piece: str) -> AbstractContextManager[Any] | None:
    """Move a spare piece to ``piece`` and open it for an in-place overwrite, or return None.

    Taken only under an exclusive ``flock``, without waiting: a reader holding its shared lock
    (``pin_piece``) keeps the spare from being reused, and the save writes a fresh file. The
    lock is held until the returned file is closed, which cuts it where the writes stopped.
    """
    try:
        descriptor = os.open(spare_piece, os.O_RDWR)
    except OSError:
        return None  # no spare piece of that name (another world size, or gc removed it)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(spare_piece, piece)
    except OSError:  # being read, or no locks on this filesystem: write a fresh file
        os.close(descriptor)
        return None
    return overwrite_local_file(descriptor, buffer_bytes=settings().piece_buffer_bytes)


def pin_piece(piece: str, url: str) -> int:
    """Open ``piece`` for reading under a shared ``flock`` (no reuse while held); return its fd.

    Raises:
        CheckpointReadError: the piece was reused by a newer save since ``.metadata`` was read
            (the checkpoint was overwritten twice during this load); nothing was read from it.
    """
    moved = CheckpointReadError(
        f"{url}: piece {posixpath.basename(piece)} was reused by a newer save while this load "
        "read the checkpoint (it was overwritten twice meanwhile). Load again."
    )
    try:
        descriptor = os.open(piece, os.O_RDONLY)
    except FileNotFoundError:
        raise moved from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a save holds it, to reuse it
        os.close(descriptor)
        raise moved from None
    except OSError:  # no locks on this filesystem: then no save reuses pieces here either
        return descriptor
    try:
        same = os.fstat(descriptor).st_ino == os.stat(piece).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # reused (moved away) after this open
        os.close(descriptor)
        raise moved
    return descriptor


def release_spares() -> None:
    """Remove the spare versions kept for reuse (teardown, exit): one version at rest."""
    with _lock:
        spares = list(_spares.values())
        _spares.clear()
    for location, spare in spares:
        settle(location)
        folder = posixpath.join(location.path, spare)
        if location.fs.exists(folder):
            _remove(location, [folder])


def at_exit() -> None:
    """Release the spares and finish every removal (what a normal interpreter exit does)."""
    release_spares()
    wait_for_removals()


def remove_stale_versions(location: Location, keep: str) -> None:
    """Remove the version folders other than ``keep`` (after the commit; rank 0 only).

    The folders are listed now. On local disk the version ``keep`` replaced is kept as the
    next save's spare (see above), and the rest are deleted on a background thread (unlinking
    large pieces drops their cached pages: tens of ms per 100 MB); elsewhere before this returns
    (an object store deletes a folder's objects in one or two batched requests).
    """
    settle(location)
    fs = location.fs
    try:
        listed = call_with_retries(
            location.url, "reading", lambda: fs.ls(location.path, detail=False)
        )
    except CheckpointError as err:  # the save committed: leftovers are orphans for gc
        log.warning("%s: could not list replaced version folders (%s); `python -m "
                    "lightweight_ckpt gc` removes them later", location.url, err)  # fmt: skip
        return
    stale = [
        entry
        for entry in listed
        if posixpath.basename(entry.rstrip("/")).startswith(VERSION_PREFIX)
        and posixpath.basename(entry.rstrip("/")) != keep
    ]
    spare = _before_last(location) if location.is_local else None  # ``keep`` replaced it
    with _lock:
        _spares.pop(_key(location), None)
        if spare is not None and any(posixpath.basename(e.rstrip("/")) == spare for e in stale):
            _spares[_key(location)] = (location, spare)
            stale = [e for e in stale if posixpath.basename(e.rstrip("/")) != spare]
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
    _committed.clear()
    _spares.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(at_exit)
