"""The pure decisions of ``CheckpointManager``: when to save, what to keep, what to call it.

No I/O, no collectives, no threads: everything here takes data and returns data.

- ``CheckpointRecord``: one checkpoint the manifest knows, and its JSON entry.
- When: ``SaveSchedule.is_due``.
- What to keep: ``RetentionPolicy`` with ``select_kept``, ``rank_by_score`` and
  ``enters_top_k``.
- File names: ``checkpoint_name`` with ``expand_template``, ``template_fields``,
  ``default_template`` and ``format_name``.

The checks of what the user passes live in ``checks``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping  # noqa: TC003 - CheckpointRecord's hints resolve at runtime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

SUFFIX = ".ckpt"
METADATA_KEY = "checkpoint_meta"
"""The entry every managed checkpoint holds: step, epoch, metrics, hparams (plain types)."""

FORMAT_VERSION = 1
"""The layout version written in the manifest, the pointer and every ``METADATA_KEY`` entry."""


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint the manifest knows. ``path`` is relative to the manager's directory."""

    path: str
    seq: int
    step: int | None = None
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    time: float = 0.0
    damaged: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the manifest entry."""
        return {
            "path": self.path,
            "seq": self.seq,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "time": self.time,
            "damaged": self.damaged,
        }

    @classmethod
    def from_json(cls, entry: Any) -> CheckpointRecord:
        """Parse a manifest entry; raise ``ValueError``/``TypeError``/``KeyError`` if malformed."""
        path = entry["path"]
        if not isinstance(path, str) or not path or "/" in path:
            raise ValueError(f"bad path {path!r}")
        metrics = {str(k): float(v) for k, v in dict(entry.get("metrics") or {}).items()}
        damaged = entry.get("damaged")
        return cls(
            path=path,
            seq=int(entry["seq"]),
            step=None if entry.get("step") is None else int(entry["step"]),
            epoch=None if entry.get("epoch") is None else int(entry["epoch"]),
            metrics=metrics,
            time=float(entry.get("time") or 0.0),
            damaged=None if damaged is None else str(damaged),
        )


# -- when to save, what to keep ----------------------------------------------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep (see ``CheckpointManager``)."""

    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    save_top_k: int | None = None
    keep_last_k: int | None = None
    save_last: bool = True


@dataclass(frozen=True)
class SaveSchedule:
    """When ``maybe_save`` saves (any trigger that is due); none given: every epoch."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None

    def is_due(
        self,
        *,
        step: int | None,
        epoch: int | None,
        epoch_end: bool,
        seconds_since_save: float,
        saved_step: int | None,
        saved_epoch_end: int | None,
    ) -> bool:
        """Return True if a trigger is due; a step or an epoch end already saved is not."""
        n_steps, n_epochs = self.every_n_steps, self.every_n_epochs
        by_steps = (
            n_steps is not None
            and step is not None
            and step > 0
            and step % n_steps == 0
            and step != saved_step
        )
        by_epochs = (
            n_epochs is not None
            and epoch_end
            and epoch is not None
            and (epoch + 1) % n_epochs == 0
            and epoch != saved_epoch_end
        )
        by_time = self.every_seconds is not None and seconds_since_save >= self.every_seconds
        return by_steps or by_epochs or by_time


def rank_by_score(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> list[str]:
    """Return the paths of the records that have the monitored metric, best first.

    NaN ranks last; ties keep the older checkpoint first (a newer one must be strictly better).
    """
    monitor = policy.monitor
    if monitor is None:
        return []
    sign = 1.0 if policy.mode == "min" else -1.0

    def key(record: CheckpointRecord) -> tuple[float, int]:
        value = record.metrics[monitor]
        return (math.inf if math.isnan(value) else sign * value, record.seq)

    scored = [r for r in records if monitor in r.metrics and r.damaged is None]
    return [r.path for r in sorted(scored, key=key)]


def select_kept(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> set[str]:
    """Return the paths of the records ``policy`` keeps (damaged records are never counted)."""
    live = sorted((r for r in records if r.damaged is None), key=lambda r: r.seq)
    if not live:
        return set()
    if (policy.monitor is None and policy.keep_last_k is None) or policy.keep_last_k == -1:
        return {r.path for r in live}
    kept = {live[-1].path} if policy.save_last else set()
    if policy.keep_last_k:
        kept.update(r.path for r in live[-policy.keep_last_k :])
    ranked = rank_by_score(live, policy)
    top_k = policy.save_top_k or 1
    kept.update(ranked if top_k == -1 else ranked[:top_k])
    return kept


def enters_top_k(
    known: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    metrics: Mapping[str, float],
    seq: int,
) -> bool:
    """Return True if a checkpoint numbered ``seq`` with ``metrics`` would be in the top k."""
    top_k = policy.save_top_k or 1
    ranked = rank_by_score(known, policy)
    if top_k == -1 or len(ranked) < top_k:
        return True
    probe = CheckpointRecord("\0probe", seq, metrics=metrics)
    return "\0probe" in rank_by_score([*known, probe], policy)[:top_k]


# -- file names ----------------------------------------------------------------------------------

_FIELD = re.compile(r"(?<!\{)\{([^{}:!]+)((?:![rsa])?(?::[^{}]*)?)\}")


def expand_template(template: str, auto_insert_metric_name: bool) -> str:
    """Return ``template`` with each ``{name...}`` prefixed by ``name=`` (Lightning's style)."""
    if not auto_insert_metric_name:
        return template
    return _FIELD.sub(
        lambda m: f"{m.group(1).replace('/', '_')}={{{m.group(1)}{m.group(2)}}}", template
    )


def template_fields(template: str) -> list[str]:
    """Return the field names of a filename template; raise ``ValueError`` if it is unusable."""
    if "/" in _FIELD.sub("", template):
        raise ValueError(
            f"filename {template!r} contains '/'; put directories in dirpath, not in filename"
        )
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"filename {template!r} is not a valid format string: {err}") from err
    names = [name for _, name, _, _ in parsed if name is not None]
    bad = sorted({n for n in names if not n or "." in n or "[" in n})
    if bad:
        raise ValueError(f"filename {template!r}: fields {bad} are not plain names like {{epoch}}")
    return names


def default_template(step: int | None, epoch: int | None) -> str:
    """Lightning's ``epoch=E-step=S``, with only the parts that are known."""
    parts = [p for p, v in (("epoch={epoch}", epoch), ("step={step}", step)) if v is not None]
    return "-".join(parts) or "checkpoint"


def format_name(template: str, values: Mapping[str, object]) -> str:
    """Fill ``template`` (already expanded) from ``values``; raise ``ValueError`` if one lacks."""
    missing = sorted({name for name in template_fields(template) if values.get(name) is None})
    if missing:
        known = sorted(k for k, v in values.items() if v is not None)
        raise ValueError(
            f"filename {template!r} needs {missing}, which this save lacks (it has {known}). "
            "Pass them as step=/epoch=/metrics=, or drop them from filename."
        )
    try:
        name = template.format(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"filename {template!r} cannot format {dict(values)}: {err}") from err
    if "/" in name or name in {"", ".", ".."}:
        raise ValueError(f"filename {template!r} formats to {name!r}, not a file name")
    return name if name.endswith(SUFFIX) else name + SUFFIX


def checkpoint_name(
    template: str | None,
    step: int | None,
    epoch: int | None,
    metrics: Mapping[str, float],
    rank: int,
) -> str:
    """Return the file name of a save: ``template`` (else ``default_template``) filled in."""
    template = template or default_template(step, epoch)
    values: dict[str, object] = {**metrics, "step": step, "batch": step, "epoch": epoch}
    values["rank"] = rank
    return format_name(template, values)


def clean_dir(path: str) -> str:
    """Drop trailing slashes, but not those of a root (``/``, ``memory://``)."""
    stripped = path.rstrip("/")
    if not stripped or stripped.endswith(":"):
        return path
    return stripped
