"""A checkpoint's life from ``fabric.save`` on: saved, committed, recorded, pruned (``Recorder``).

``Recorder.save`` claims the name, adds the ``METADATA_KEY`` entry and calls ``fabric.save``.
It then holds the saves not yet known to be durable (``pending``, oldest first). With
``AsyncCheckpointIO`` they become durable in order (one writer, first in first out): the oldest
``len(pending) - io.pending`` are done, and each must exist, since a write that failed is not
pending either. Without blocking, it records those in the ``Manifest``, moves what the
``RetentionPolicy`` no longer keeps to ``deleting``, writes the manifest, then the pointer, and
hands the victims to one background thread (``lwckpt-prune``) that deletes them; the next
manifest write forgets what is gone. Rank 0 writes and deletes; the other ranks only keep the
same records. Each stage is reported through the ``event`` callback (``CheckpointEvent``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from lightweight_ckpt.io import AsyncCheckpointIO
from lightweight_ckpt.manager.policy import (
    FORMAT_VERSION,
    METADATA_KEY,
    CheckpointRecord,
    enters_top_k,
    select_kept,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from lightweight_ckpt.fabric import Fabric
    from lightweight_ckpt.manager.manifest import Manifest
    from lightweight_ckpt.manager.policy import RetentionPolicy
    from lightweight_ckpt.types import FilterMap, State

log = logging.getLogger("lightweight_ckpt")

CheckpointEvent = Literal["saved", "committed", "manifest_written", "recorded", "deleted"]


class _Deleter:
    """One background thread that deletes, off the training loop; it remembers what it removed."""

    def __init__(self, delete: Callable[[str], bool]) -> None:
        self._delete = delete
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._removed: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, names: Sequence[str]) -> None:
        if not names:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lwckpt-prune")
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(self._run, list(names)))

    def _run(self, names: list[str]) -> None:
        for name in names:
            if self._delete(name):
                with self._lock:
                    self._removed.add(name)

    def removed(self) -> set[str]:
        with self._lock:
            return set(self._removed)

    def join(self) -> None:
        for future in self._futures:
            future.result()
        self._futures = []

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Recorder:
    """Write the saves of one ``CheckpointManager``, record each once durable, prune the rest.

    Args:
        fabric: the manager's ``Fabric`` (its rank and checkpoint IO).
        manifest: the records to extend and the files to write.
        policy: what to keep.
        event: called with each stage of a checkpoint's life and its name.
        hparams: stored in every checkpoint's ``METADATA_KEY`` entry.
        filter: passed to ``fabric.save``.
    """

    def __init__(
        self,
        fabric: Fabric,
        manifest: Manifest,
        policy: RetentionPolicy,
        event: Callable[[CheckpointEvent, str], None],
        *,
        hparams: dict[str, Any],
        filter: FilterMap | None,  # noqa: A002 - Lightning's name
    ) -> None:
        self.policy = policy
        self.hparams = hparams
        self.filter = filter
        self.pending: list[CheckpointRecord] = []
        """Saves ``fabric.save`` returned from, not yet known to be committed; oldest first."""
        self.resumed_from: str | None = None
        """The name ``resume`` restored: kept for this whole run."""
        self._fabric = fabric
        self._manifest = manifest
        self._event = event
        self._deleter = _Deleter(self._delete)
        self._leftovers_scheduled = False
        self._warned_unscored = False

    def worth_keeping(self, metrics: Mapping[str, float]) -> bool:
        """False when only ``save_top_k`` would keep this save and it would not enter the top."""
        policy = self.policy
        if policy.monitor is None or policy.save_last or policy.keep_last_k is not None:
            return True
        if policy.monitor not in metrics:
            if not self._warned_unscored:
                self._warned_unscored = True
                log.warning(
                    "%s: a save without metrics[%r] is skipped: only save_top_k keeps "
                    "checkpoints here. Pass the metric, or set save_last / keep_last_k.",
                    self._manifest.dirpath,
                    policy.monitor,
                )
            return False
        known = [*self._manifest.records, *self.pending]
        return enters_top_k(known, policy, metrics, self._manifest.next_seq)

    def save(
        self,
        entries: State,
        name: str,
        *,
        step: int | None,
        epoch: int | None,
        metrics: dict[str, float],
        epoch_end: bool,
    ) -> str:
        """Save ``entries`` as ``name`` (or its next free version); record what became durable.

        Returns:
            The URL of the checkpoint written.

        Raises:
            CheckpointWriteError: the save (or an earlier background save) failed.
        """
        manifest = self._manifest
        name = manifest.claim(name)
        record = CheckpointRecord(name, manifest.next_seq, step, epoch, metrics, time.time())
        entries[METADATA_KEY] = {
            "version": FORMAT_VERSION,
            "seq": record.seq,
            "step": step,
            "epoch": epoch,
            "metrics": dict(metrics),
            "epoch_end": epoch_end,
            "hparams": self.hparams,
        }
        url = manifest.url(name)
        try:
            self._fabric.save(
                url, entries, self.filter, storage_options=manifest.storage_options or None
            )
        except Exception:
            self.record_committed()
            raise
        manifest.next_seq += 1
        self.pending.append(record)
        if self._fabric.is_global_zero:
            log.info("saved %s (step %s, epoch %s, metrics %s)", url, step, epoch, metrics)
        self._event("saved", name)
        self.record_durable()
        return url

    def record_durable(self) -> None:
        """Record the pending saves known to be committed, without blocking."""
        self._finalize(self._take_durable())

    def record_committed(self) -> None:
        """Record every pending save whose file exists (after a failure: the rest failed)."""
        self._finalize(self._take_committed(len(self.pending)))

    def settle(self) -> None:
        """Record every pending save (``fabric.wait()`` returned) and finish the deletions."""
        pending, self.pending = self.pending, []
        self._finalize(pending)  # wait() returned: every one of them is committed
        self._deleter.join()
        if set(self._manifest.deleting) & self._deleter.removed():
            self.write_records()  # forget what is gone

    def write_records(self, newest: str | None = None) -> None:
        """Rank 0: write the manifest, then (``newest`` given) the pointer."""
        if not self._fabric.is_global_zero:
            return
        self._manifest.forget(self._deleter.removed())
        self._manifest.write()
        if newest is None:
            return
        self._event("manifest_written", newest)
        self._manifest.write_pointer(newest)
        self._event("recorded", newest)

    def schedule_leftovers(self) -> None:
        """Once per run, on rank 0: finish the deletions a previous run left in the manifest."""
        if self._leftovers_scheduled or not self._fabric.is_global_zero:
            return
        self._leftovers_scheduled = True
        self._deleter.submit(list(self._manifest.deleting))

    def shutdown(self) -> None:
        """Stop the deletion thread (after the deletions submitted)."""
        self._deleter.shutdown()

    def _take_durable(self) -> list[CheckpointRecord]:
        """Take the pending saves known to be committed, without blocking.

        Sync IO (and ranks other than 0, which write nothing of their own): all of them. Async
        IO: the oldest ``len(pending) - io.pending`` (one writer, first in first out), each
        checked to exist, since a background write that failed is not in flight either.
        """
        io = self._fabric.strategy.checkpoint_io
        if not self._fabric.is_global_zero or not isinstance(io, AsyncCheckpointIO):
            done, self.pending = self.pending, []
            return done
        return self._take_committed(len(self.pending) - io.pending)

    def _take_committed(self, count: int) -> list[CheckpointRecord]:
        """Take the ``count`` oldest pending saves; return those whose file exists (committed).

        A write commits atomically, so its file exists only once it is complete. The ones that
        do not exist failed: their error is raised by the IO (next save, ``wait()``).
        """
        if count <= 0:
            return []
        done, self.pending = self.pending[:count], self.pending[count:]
        committed = [r for r in done if self._manifest.exists(r.path)]
        lost = [self._manifest.url(r.path) for r in done if r not in committed]
        if lost:
            log.error("saves that did not commit, not recorded: %s", lost)
        return committed

    def _finalize(self, done: list[CheckpointRecord]) -> None:
        """Record ``done`` (committed), prune what no rule keeps, write manifest and pointer."""
        if not done:
            return
        for record in done:
            self._event("committed", record.path)
        self._manifest.records.extend(done)
        self.schedule_leftovers()
        kept = select_kept(self._manifest.records, self.policy)
        if self.resumed_from is not None:
            kept.add(self.resumed_from)
        victims = self._manifest.prune(kept)
        live = self._manifest.live
        self.write_records(live[-1].path if live else None)
        if self._fabric.is_global_zero:
            self._deleter.submit(victims)

    def _delete(self, name: str) -> bool:
        """On the deletion thread: remove one checkpoint; a failure is logged, retried next run."""
        url = self._manifest.url(name)
        try:
            self._manifest.remove(name)
        except OSError as err:
            log.warning("%s: could not delete (%s); the next run retries", url, err)
            return False
        self._event("deleted", name)
        return True
