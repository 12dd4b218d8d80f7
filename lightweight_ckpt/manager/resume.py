"""Resuming: try the recorded checkpoints newest first, marking the damaged ones on the way.

``load_newest`` takes the candidates from rank 0's ``Manifest`` (the pointer too, if the manifest
lacks it), loads each with ``fabric.load`` until one succeeds, and marks every checkpoint that is
missing or unreadable (agreed on every rank) damaged in the manifest. A
checkpoint that does not fit the user's state raises at once: older ones would not fit either.
``read_result`` reads what was restored from the checkpoint's ``METADATA_KEY`` entry into the
``ResumeResult`` that ``CheckpointManager.resume`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping  # noqa: TC003 - ResumeResult's hints resolve at runtime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightweight_ckpt import collectives
from lightweight_ckpt.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from lightweight_ckpt.manager.policy import METADATA_KEY

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lightweight_ckpt.fabric import Fabric
    from lightweight_ckpt.manager.manifest import Manifest
    from lightweight_ckpt.manager.policy import CheckpointRecord
    from lightweight_ckpt.types import State, StorageOptions

log = logging.getLogger("lightweight_ckpt")


@dataclass(frozen=True)
class ResumeResult:
    """What ``resume`` restored: the checkpoint's URL, its step/epoch/metrics and hparams."""

    path: str
    step: int | None
    epoch: int | None
    metrics: Mapping[str, float]
    hparams: Mapping[str, Any]
    skipped: tuple[str, ...] = ()
    """Newer checkpoints that could not be loaded (missing or damaged), newest first."""


def read_result(
    url: str, record: CheckpointRecord, remainder: Mapping[str, Any], skipped: tuple[str, ...]
) -> tuple[ResumeResult, bool]:
    """Return what ``record`` restored and whether it was saved at the end of its epoch.

    Step, epoch and metrics come from the checkpoint's metadata, else from ``record``.
    """
    meta = remainder.get(METADATA_KEY)
    meta = meta if isinstance(meta, dict) else {}
    step = meta.get("step", record.step)
    epoch = meta.get("epoch", record.epoch)
    metrics = dict(meta.get("metrics") or record.metrics)
    hparams = dict(meta.get("hparams") or {})
    return ResumeResult(url, step, epoch, metrics, hparams, skipped), bool(meta.get("epoch_end"))


def load_newest(
    fabric: Fabric,
    manifest: Manifest,
    target: State,
    *,
    strict: bool,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
) -> tuple[tuple[CheckpointRecord, dict[str, Any]] | None, list[str]]:
    """Load the newest good checkpoint into ``target``; call it on every rank.

    Returns:
        The record loaded and what ``fabric.load`` returned (None if no checkpoint loads), and
        the URLs of the newer checkpoints skipped as damaged, newest first.

    Raises:
        MissingKeysError, StateMismatchError, UnsafeCheckpointError: ``target`` does not fit.
    """
    candidates = collectives.broadcast_object(
        manifest.candidates() if fabric.is_global_zero else None
    )
    candidates = candidates or []
    manifest.adopt(candidates)
    skipped: list[str] = []
    for index, record in enumerate(candidates):
        remainder = _try_load(
            fabric,
            manifest,
            record,
            target,
            strict=strict,
            weights_only=weights_only,
            storage_options=storage_options,
            older=candidates[index + 1 :],
        )
        if remainder is not None:
            return (record, remainder), skipped
        skipped.append(manifest.url(record.path))
    return None, skipped


def _try_load(
    fabric: Fabric,
    manifest: Manifest,
    record: CheckpointRecord,
    target: State,
    *,
    strict: bool,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
    older: Sequence[CheckpointRecord],
) -> dict[str, Any] | None:
    """Load ``record`` into ``target``; on damage, log and mark it and return None."""
    url = manifest.url(record.path)
    try:
        return fabric.load(
            url, target, strict, weights_only=weights_only, storage_options=storage_options
        )
    except Exception as err:
        if not collectives.broadcast_object(_is_damage(err)):  # the same decision on every rank
            raise
        reason = f"{type(err).__name__}: {err}"
        fallback = manifest.url(older[0].path) if older else "nothing"
        log.warning("%s: cannot resume from it (%s); falling back to %s", url, reason, fallback)
        manifest.mark_damaged(record.path, reason)
        return None


def _is_damage(err: BaseException) -> bool:
    """A checkpoint that is missing or unreadable (not a mismatch with the user's state)."""
    if isinstance(err, UnsafeCheckpointError):
        return False
    return isinstance(err, CheckpointNotFoundError | InvalidCheckpointError)
