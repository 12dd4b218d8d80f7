"""``diff``: which entries of two checkpoints differ, compared tensor by tensor.

Entries are matched by dotted name (``entries.flat_leaves``), so any two layouts compare: a
single file, a sharded directory, a safetensors file. Each name is one of:

- ``removed`` (only in A), ``added`` (only in B);
- ``type`` (a tensor on one side, a plain value on the other), ``dtype``, ``shape``;
- ``value``: for tensors, how many elements differ and the largest absolute difference
  (``inf`` where a NaN or an infinity differs; NaN equals NaN); for plain values, both reprs.

Tensors are read one pair at a time and compared in chunks, then freed, so memory stays near
the largest tensor. ``atol`` lets small differences count as equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightweight_ckpt.entries import OpenCheckpoint, flat_leaves, open_checkpoint
from lightweight_ckpt.progress import progress_bar

if TYPE_CHECKING:
    from lightweight_ckpt.types import StorageOptions

Kind = Literal["removed", "added", "type", "dtype", "shape", "value"]
_CHUNK = 1 << 22  # elements compared at once (32 MiB of float64 per side)
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class Difference:
    """One entry that differs between A and B."""

    name: str
    kind: Kind
    a: str | None
    """A's dtype/shape/value, as shown (None where absent)."""
    b: str | None
    changed: int | None = None
    """Tensor elements that differ (``value`` differences of tensors)."""
    max_abs_diff: float | None = None
    """Largest absolute difference among them (``inf`` for NaN/infinity mismatches)."""

    def to_json(self) -> dict[str, Any]:
        """Return the difference as JSON-able data (``max_abs_diff`` ``inf`` as a string)."""
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "a": self.a, "b": self.b}
        if self.changed is not None:
            data["changed"] = self.changed
            diff = self.max_abs_diff
            data["max_abs_diff"] = diff if diff is None or math.isfinite(diff) else str(diff)
        return data


@dataclass(frozen=True)
class DiffReport:
    """The entries compared and those that differ."""

    a: str
    b: str
    compared: int
    differences: list[Difference]

    @property
    def equal(self) -> bool:
        """True when nothing differs."""
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "compared": self.compared,
            "differences": [d.to_json() for d in self.differences],
        }


def diff_checkpoints(
    a: str,
    b: str,
    a_options: StorageOptions | None = None,
    b_options: StorageOptions | None = None,
    *,
    atol: float = 0.0,
    weights_only: bool = True,
    progress: bool = False,
) -> DiffReport:
    """Compare the checkpoints at ``a`` and ``b`` entry by entry.

    Raises:
        ValueError: ``atol`` is negative.
        CheckpointNotFoundError: nothing at ``a`` or ``b``.
        InvalidCheckpointError: either is no checkpoint, or damaged (``CorruptCheckpointError``).
    """
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    with (
        open_checkpoint(a, a_options, weights_only=weights_only) as left,
        open_checkpoint(b, b_options, weights_only=weights_only) as right,
    ):
        lhs, rhs = flat_leaves(left.tree, a), flat_leaves(right.tree, b)
        both = [name for name in lhs if name in rhs]
        total = sum(_nbytes(lhs[n]) for n in both if _nbytes(lhs[n]) == _nbytes(rhs[n]))
        differences = [Difference(n, "removed", _show(lhs[n]), None) for n in lhs if n not in rhs]
        differences += [Difference(n, "added", None, _show(rhs[n])) for n in rhs if n not in lhs]
        with progress_bar(total, "diff", progress) as advance:
            for name in both:
                found = _compare(name, lhs[name], rhs[name], (left, right), atol)
                if found is not None:
                    differences.append(found)
                advance(_nbytes(lhs[name]))
    return DiffReport(a, b, len(set(lhs) | set(rhs)), differences)


def _compare(
    name: str, x: Any, y: Any, sides: tuple[OpenCheckpoint, OpenCheckpoint], atol: float
) -> Difference | None:
    if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
        return Difference(name, "type", _show(x), _show(y))
    if not isinstance(x, torch.Tensor):
        return None if _same_value(x, y) else Difference(name, "value", _show(x), _show(y))
    if x.dtype != y.dtype:
        return Difference(name, "dtype", _dtype(x), _dtype(y))
    if x.shape != y.shape:
        return Difference(name, "shape", str(list(x.shape)), str(list(y.shape)))
    left, right = sides
    try:
        changed, largest = compare_tensors(left.load(x), right.load(y), atol)
    finally:
        left.release(x)
        right.release(y)
    if not changed:
        return None
    return Difference(name, "value", _show(x), _show(y), changed, largest)


def compare_tensors(x: torch.Tensor, y: torch.Tensor, atol: float = 0.0) -> tuple[int, float]:
    """Return ``(elements that differ by more than atol, largest absolute difference)``.

    Same dtype and shape expected. Compared in chunks (bounded temporaries); NaN equals NaN.
    """
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    wide = torch.complex128 if x.is_complex() else torch.float64
    changed, largest = 0, 0.0
    for start in range(0, flat_x.numel(), _CHUNK):
        cx, cy = flat_x[start : start + _CHUNK], flat_y[start : start + _CHUNK]
        differs = cx != cy
        if x.is_floating_point() or x.is_complex():
            differs &= ~(cx.isnan() & cy.isnan())
        if not bool(differs.any()):
            continue
        gap = (cx[differs].to(wide) - cy[differs].to(wide)).abs()
        gap = torch.nan_to_num(gap.double(), nan=math.inf)
        if atol:
            gap = gap[gap > atol]
        if gap.numel():
            changed += gap.numel()
            largest = max(largest, float(gap.max()))
    return changed, largest


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return bool(x == y)
    except (TypeError, ValueError, RuntimeError):  # objects without a plain ==
        return repr(x) == repr(y)


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{_dtype(value)} {list(value.shape)}"
    text = repr(value)
    return text[:_SHOWN_CHARS] + "..." * (len(text) > _SHOWN_CHARS)
