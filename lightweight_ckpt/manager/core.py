"""``CheckpointManager``: the public class; it saves, resumes, and wires the parts together.

It validates its arguments (``checks``), asks the ``SaveSchedule`` whether a save is due,
names the checkpoint, calls ``fabric.save`` / ``fabric.load``, and hands every save to the
``Recorder`` (committed, recorded, pruned), whose ``Manifest`` holds the records. Every rank
calls every method; rank 0's decisions are broadcast (``collectives.broadcast_object``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from lightweight_ckpt import collectives
from lightweight_ckpt.errors import InvalidCheckpointError
from lightweight_ckpt.manager.checks import (
    check_arguments,
    check_policy,
    checked_schedule,
    module_entries,
    plain_metrics,
    select_entries,
)
from lightweight_ckpt.manager.manifest import MANIFEST_NAME, POINTER_NAME, Manifest
from lightweight_ckpt.manager.orphans import (
    DEFAULT_OLDER_THAN_S,
    Orphan,
    find_orphans,
    remove_orphans,
)
from lightweight_ckpt.manager.policy import (
    CheckpointRecord,
    RetentionPolicy,
    SaveSchedule,
    checkpoint_name,
    clean_dir,
    expand_template,
)
from lightweight_ckpt.manager.recorder import CheckpointEvent, Recorder
from lightweight_ckpt.manager.resume import ResumeResult, load_newest, read_result

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from lightweight_ckpt.fabric import Fabric
    from lightweight_ckpt.types import FilterMap, State, StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")

_T = TypeVar("_T")


class CheckpointManager:
    """Save on a schedule, keep the right checkpoints, resume from the newest good one.

    Example:
        >>> manager = CheckpointManager(fabric, "s3://bucket/run", every_n_steps=500,
        ...                             monitor="val_loss", save_top_k=3, keep_last_k=2)
        >>> manager.resume(state)  # None on a fresh run
        >>> for step in ...:
        ...     manager.maybe_save(state, step=step, metrics={"val_loss": loss})
        >>> manager.close()

    Args:
        fabric: the ``Fabric`` that saves and loads (its strategy and checkpoint IO are used).
        dirpath: the run's directory, a local path or fsspec URL; one manager per directory.
        filename: a format template without suffix (``.ckpt`` is added): ``{epoch}``,
            ``{step}`` (alias ``{batch}``), ``{rank}`` and metric names, with format specs
            (``"sample-{epoch:02d}-{val_loss:.2f}"``). Default ``epoch=E-step=S``. A name in use
            gets ``-v1``, ``-v2``, ...
        auto_insert_metric_name: write ``{epoch}`` as ``epoch=3`` (Lightning). Pass False for
            Composer-style templates (``"ep{epoch}-ba{batch}-rank{rank}"``).
        every_n_steps: ``maybe_save`` saves when ``step`` is a positive multiple of it.
        every_n_epochs: ``maybe_save(..., epoch_end=True)`` saves after every n-th epoch
            (``(epoch + 1) % n == 0``, epochs counted from 0 as in Lightning).
        every_seconds: ``maybe_save`` saves when this much ``clock()`` time has passed since the
            last save (or since construction / resume). With no trigger: ``every_n_epochs=1``.
        monitor: the metric ranking checkpoints for ``save_top_k`` and ``best_path``.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        save_top_k: keep the k best by ``monitor`` (-1: all scored ones). Default 1 with a
            ``monitor``. Needs ``monitor``.
        keep_last_k: keep the k newest (-1: all). Default: all without ``monitor``, none with.
        save_last: always keep the newest checkpoint (what ``resume`` restores).
            With False and only ``save_top_k`` keeping, a save that would not enter the top k
            is not written at all.
        save_weights_only: save only the ``nn.Module`` entries of ``state`` (and the metadata);
            ``resume`` then restores only those.
        filter: passed to ``fabric.save`` (``{state key: callable(name, value) -> bool}``).
        hparams: plain values (str, numbers, bool, None, lists, tuples, dicts) stored in every
            checkpoint under ``METADATA_KEY``, readable with ``torch.load(weights_only=True)``.
        storage_options: fsspec options for ``dirpath``.
        clock: seconds for ``every_seconds`` (default ``time.monotonic``; tests inject one).

    Construct it on every rank: rank 0 reads the manifest and broadcasts it.

    Raises:
        TypeError: a wrong type (``fabric``, ``dirpath``, ``filter``, a non-plain ``hparams``
            value, which is named).
        ValueError: an invalid schedule, ``mode``, ``k`` or ``filename``.
    """

    def __init__(
        self,
        fabric: Fabric,
        dirpath: StrPath,
        *,
        filename: str | None = None,
        auto_insert_metric_name: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_top_k: int | None = None,
        keep_last_k: int | None = None,
        save_last: bool = True,
        save_weights_only: bool = False,
        filter: FilterMap | None = None,  # noqa: A002 - Lightning's name
        hparams: Mapping[str, Any] | None = None,
        storage_options: StorageOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_arguments(
            fabric=fabric,
            dirpath=dirpath,
            filename=filename,
            filter=filter,
            hparams=hparams,
            clock=clock,
        )
        self.schedule = checked_schedule(SaveSchedule(every_n_steps, every_n_epochs, every_seconds))
        self.policy = RetentionPolicy(monitor, mode, save_top_k, keep_last_k, save_last)
        check_policy(self.policy)
        self.dirpath = clean_dir(os.fspath(dirpath))
        self.hparams: dict[str, Any] = dict(hparams or {})
        self._fabric = fabric
        self._template = (
            None if filename is None else expand_template(filename, auto_insert_metric_name)
        )
        self._save_weights_only = save_weights_only
        self._clock = clock
        self._last_time = clock()
        self._saved_step: int | None = None
        self._saved_epoch_end: int | None = None  # the last epoch whose end was saved
        self._closed = False
        self._manifest = Manifest(self.dirpath, dict(storage_options or {}))
        self._recorder = Recorder(
            fabric, self._manifest, self.policy, self._event, hparams=self.hparams, filter=filter
        )
        records, deleting = self._agree(
            self._manifest.read() if fabric.is_global_zero else None
        ) or ([], [])
        self._manifest.load(records, deleting)

    # -- public API ----------------------------------------------------------------------------

    @property
    def records(self) -> tuple[CheckpointRecord, ...]:
        """The committed, kept, undamaged checkpoints, oldest first."""
        return self._manifest.live

    @property
    def paths(self) -> list[str]:
        """URLs of the committed, kept checkpoints, oldest first."""
        return [self.url(r.path) for r in self.records]

    @property
    def last_path(self) -> str | None:
        """URL of the newest committed checkpoint (what ``resume`` tries first), or None."""
        records = self.records
        return self.url(records[-1].path) if records else None

    @property
    def best_path(self) -> str | None:
        """URL of the committed checkpoint with the best ``monitor`` value, or None."""
        best = self._manifest.best(self.policy)
        return None if best is None else self.url(best.path)

    @property
    def best_score(self) -> float | None:
        """The best committed ``monitor`` value, or None."""
        best = self._manifest.best(self.policy)
        monitor = self.policy.monitor
        return None if best is None or monitor is None else best.metrics[monitor]

    @property
    def resumed_from(self) -> str | None:
        """URL of the checkpoint ``resume`` restored (kept for this whole run), or None."""
        name = self._recorder.resumed_from
        return None if name is None else self.url(name)

    def url(self, name: str) -> str:
        """Return the URL of ``name`` inside ``dirpath`` (joined with ``/``, never ``os.path``)."""
        return self._manifest.url(name)

    def maybe_save(
        self,
        state: State,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, object] | None = None,
        epoch_end: bool = False,
    ) -> str | None:
        """Save ``state`` if a trigger is due; record what became durable; prune.

        Call it on every rank with the same ``step`` / ``epoch``.

        Args:
            state: as for ``fabric.save``.
            step: optimizer steps done so far (for ``every_n_steps`` and ``{step}``).
            epoch: the current epoch, counted from 0 (for ``every_n_epochs`` and ``{epoch}``).
            metrics: numbers (or one-element tensors) for ``monitor`` and the filename.
            epoch_end: True on the call that ends ``epoch`` (for ``every_n_epochs``).

        Returns:
            The URL of the checkpoint written, or None.

        Raises:
            ValueError: a trigger needs ``step`` / ``epoch`` that was not passed, or the filename
                cannot be formatted.
            CheckpointWriteError: the save (or an earlier background save) failed.
        """
        self._check_open()
        values = plain_metrics(metrics)
        if self.schedule.every_n_steps is not None and step is None:
            raise ValueError("every_n_steps is set: pass step= to maybe_save")
        if epoch_end and epoch is None:
            raise ValueError("epoch_end=True needs epoch=")
        self._recorder.record_durable()
        due = self.schedule.is_due(
            step=step,
            epoch=epoch,
            epoch_end=epoch_end,
            seconds_since_save=self._clock() - self._last_time,
            saved_step=self._saved_step,
            saved_epoch_end=self._saved_epoch_end,
        )
        if self.schedule.every_seconds is not None or due:
            due = self._agree(due)  # rank 0's clock decides; every rank saves or none
        if not due:
            return None
        return self._save(state, step, epoch, values, epoch_end)

    def save(
        self,
        state: State,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, object] | None = None,
    ) -> str | None:
        """Save ``state`` now, whatever the schedule (the retention rules still apply).

        Returns:
            The URL of the checkpoint written, or None when ``save_last=False`` and the metric
            would not enter the top k (nothing is written).
        """
        self._check_open()
        return self._save(state, step, epoch, plain_metrics(metrics), epoch_end=False)

    def resume(
        self, state: State, *, strict: bool = True, weights_only: bool | None = None
    ) -> ResumeResult | None:
        """Restore ``state`` in place from the newest good checkpoint; None on a fresh run.

        A checkpoint that is missing or damaged is logged at WARNING (naming it), marked damaged
        in the manifest (its file is kept), and the next newest is tried. The one restored is
        never deleted during this run.

        Raises:
            InvalidCheckpointError: checkpoints are recorded but none of them loads.
            MissingKeysError, StateMismatchError, UnsafeCheckpointError: ``state`` does not fit
                the newest checkpoint (no fallback: older ones would not fit either).
        """
        self._check_open()
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of objects, got {type(state).__name__}")
        target = module_entries(state) if self._save_weights_only else state
        loaded, skipped = load_newest(
            self._fabric,
            self._manifest,
            target,
            strict=strict,
            weights_only=weights_only,
            storage_options=self._manifest.storage_options or None,
        )
        result = None if loaded is None else self._resumed(*loaded, tuple(skipped))
        if skipped:
            self._recorder.write_records()  # the damaged marks
        self._recorder.schedule_leftovers()
        if result is None and skipped:
            raise InvalidCheckpointError(
                f"{self.dirpath}: none of the recorded checkpoints loads ({skipped}); they are "
                f"marked damaged in {MANIFEST_NAME}. Restore them, or remove {MANIFEST_NAME} "
                f"and {POINTER_NAME} to start afresh."
            )
        if result is None:
            log.info("%s: no checkpoint to resume from; starting afresh", self.dirpath)
        return result

    def remove_orphans(
        self, *, older_than_s: float = DEFAULT_OLDER_THAN_S, dry_run: bool = False
    ) -> list[Orphan]:
        """Remove the leftovers of killed saves in ``dirpath``; return what was (to be) removed.

        Leftovers are staged temp files (``.<name>.tmp-<hex>``) and sharded version folders that
        their ``.metadata`` does not name, untouched for ``older_than_s`` seconds, so a save in
        progress (here or by another process) is never touched (``manager.orphans``). With
        ``dry_run`` nothing is removed. Rank 0 looks and removes; every rank must call it and
        gets rank 0's list.

        Raises:
            ValueError: ``older_than_s`` is negative.
        """
        self._check_open()
        if older_than_s < 0:  # before any collective
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        options = self._manifest.storage_options or None

        def collect() -> list[Orphan]:
            if not self._fabric.is_global_zero:
                return []
            found = find_orphans(self.dirpath, options, older_than_s)
            if not dry_run:
                remove_orphans(found, options)
            return found

        return self._agree(collectives.run_on_all_ranks("remove_orphans", collect))

    def wait(self) -> None:
        """Make every save durable, record it, and finish the deletions under way.

        Raises:
            CheckpointError: a background save failed (what committed is still recorded).
        """
        self._check_open()
        try:
            self._fabric.wait()
        except Exception:
            self._recorder.record_committed()
            raise
        self._recorder.settle()

    def close(self) -> None:
        """``wait()``, stop the deletion thread and meet the other ranks. Idempotent."""
        self._close(meet_ranks=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        # leaving on an error: the other ranks may not be here, so no barrier (no hang)
        self._close(meet_ranks=err is None)

    def on_checkpoint_event(self, event: CheckpointEvent, path: str) -> None:
        """Hook: called on rank 0 at each stage of a checkpoint's life; does nothing here.

        ``saved`` (``fabric.save`` returned), ``committed`` (durable, not yet recorded),
        ``manifest_written`` (the manifest names it, the pointer not yet), ``recorded`` (the
        pointer too; deletions not yet started), ``deleted`` (from the deletion thread).
        """

    # -- saving ----------------------------------------------------------------------------

    def _save(
        self,
        state: State,
        step: int | None,
        epoch: int | None,
        metrics: dict[str, float],
        epoch_end: bool,
    ) -> str | None:
        entries = select_entries(state, self._save_weights_only)  # errors before any collective
        rank = self._fabric.global_rank  # rank 0's name is used on every rank
        name = checkpoint_name(self._template, step, epoch, metrics, rank)
        step, epoch, metrics, name = self._agree((step, epoch, metrics, name))  # rank 0's
        self._mark_saved(step, epoch if epoch_end else None)
        if not self._recorder.worth_keeping(metrics):
            return None
        return self._recorder.save(
            entries, name, step=step, epoch=epoch, metrics=metrics, epoch_end=epoch_end
        )

    def _mark_saved(self, step: int | None, epoch_end: int | None) -> None:
        """Restart the clock; a step (and an epoch end) saved is not due again."""
        self._last_time = self._clock()
        self._saved_step = step
        if epoch_end is not None:
            self._saved_epoch_end = epoch_end

    # -- resuming ----------------------------------------------------------------------------

    def _resumed(
        self, record: CheckpointRecord, remainder: Mapping[str, Any], skipped: tuple[str, ...]
    ) -> ResumeResult:
        result, epoch_end = read_result(self.url(record.path), record, remainder, skipped)
        self._recorder.resumed_from = record.path
        self._mark_saved(result.step, result.epoch if epoch_end else None)
        if self._fabric.is_global_zero:
            log.info("resumed from %s (step %s, epoch %s)", result.path, result.step, result.epoch)
        return result

    # -- helpers ---------------------------------------------------------------------------

    def _close(self, meet_ranks: bool) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._recorder.shutdown()
        if meet_ranks:
            self._fabric.barrier()

    def _event(self, event: CheckpointEvent, name: str) -> None:
        if self._fabric.is_global_zero:
            self.on_checkpoint_event(event, self.url(name))

    def _agree(self, value: _T) -> _T:
        """Return rank 0's ``value`` on every rank (no-op in one process)."""
        return collectives.broadcast_object(value)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.dirpath}: this CheckpointManager is closed")
