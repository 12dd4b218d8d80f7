"""What shape state should have: tensors (plain, DTensor, ShardedTensor) and optimizer state.

Pure rules that ``state.plan_restore`` applies before a load changes anything: the global shape
of a value, whether two tensors can share a direct read, and the shape each ``torch.optim``
optimizer gives its per-parameter state (so a checkpoint of another model's optimizer is
refused instead of failing at the first ``step()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shape_of(value: object) -> tuple[int, ...] | None:
    """Return the (global) shape of a tensor, DTensor or ShardedTensor; None for other values."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    size = getattr(value, "size", None)
    if type(value).__name__ == "ShardedTensor" and callable(size):
        return tuple(size())
    return None


def is_plain_tensor(value: object) -> bool:
    """True for a plain tensor or parameter (not a subclass such as DTensor)."""
    return type(value) in (torch.Tensor, nn.Parameter)


def _torch_optimizers(*names: str) -> frozenset[type]:
    """The ``torch.optim`` classes of these names that this torch has."""
    found = (getattr(torch.optim, name, None) for name in names)
    return frozenset(kind for kind in found if isinstance(kind, type))


_PARAM_SHAPED = _torch_optimizers(
    "ASGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "Muon", "NAdam", "RAdam",
    "RMSprop", "Rprop", "SGD", "SparseAdam",
)  # fmt: skip
"""``torch.optim`` optimizers whose non-scalar state tensors all have their parameter's shape."""
_FACTORED = _torch_optimizers("Adafactor")
_FLAT = _torch_optimizers("LBFGS")


def _expected_state_shape(
    kind: type, name: str, param: tuple[int, ...], total: int
) -> tuple[int, ...] | None:
    """The shape a ``torch.optim`` optimizer gives state ``name`` of a parameter; None: unknown.

    Only exact ``torch.optim`` classes are judged (a subclass may keep other state). Scalars
    (``step``, ASGD's ``eta``/``mu``, NAdam's ``mu_product``) are 0-d and never compared;
    ``step`` is skipped by name too (torch 1.12 kept a capturable ``step`` of shape ``(1,)``).
    """
    if kind in _FLAT:
        return (total,)  # LBFGS: one flat history over all parameters, kept at the first
    if kind in _FACTORED:
        factored = {
            "row_var": (*param[:-1], 1),
            "col_var": (*param[:-2], 1, *param[-1:]),
            "variance": param,
        }
        return factored.get(name)
    return param if kind in _PARAM_SHAPED and name != "step" else None


def optimizer_shape_problems(
    optimizer: torch.optim.Optimizer, groups: list[Any], saved_state: dict[Any, Any]
) -> list[tuple[Any, str, tuple[int, ...], tuple[int, ...]]]:
    """Return ``(saved param id, state name, saved shape, expected shape)`` for each misfit.

    Saved parameter ids are matched to the optimizer's parameters group by group, as
    ``Optimizer.load_state_dict`` does. Where that pairing is not the parameters' own (FSDP1's
    flat parameters) nothing is compared. Optimizers other than the ``torch.optim`` ones are
    compared with the state this optimizer already holds for the same parameter, if any.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    own_sizes = [len(group["params"]) for group in optimizer.param_groups]
    if own_sizes != [len(g.get("params", ())) for g in groups] or any(
        getattr(p, "_fsdp_flattened", False) for p in params
    ):
        return []
    pairing = dict(zip((i for g in groups for i in g["params"]), params, strict=True))
    # LBFGS's flat vectors count a complex parameter twice (it views them as real)
    total = sum(p.numel() * (2 if p.is_complex() else 1) for p in params)
    kind = type(optimizer)
    known = kind in _PARAM_SHAPED | _FACTORED | _FLAT
    bad = []
    for index, param in pairing.items():  # in parameter order
        entries = saved_state.get(index)
        if not isinstance(entries, dict):
            continue
        param_shape, current = tuple(shape_of(param) or ()), optimizer.state.get(param, {})
        for name, saved in sorted(entries.items(), key=lambda item: str(item[0])):
            saved_shape = shape_of(saved)
            if not saved_shape:  # not a tensor, or a scalar
                continue
            expected = (
                _expected_state_shape(kind, name, param_shape, total)
                if known
                else shape_of(current.get(name)) or None  # unknown kinds: vs their own state
            )
            if expected is not None and saved_shape != expected:
                bad.append((index, str(name), saved_shape, expected))
    return bad


def same_layout(saved: object, target: object) -> bool:
    """True when ``saved`` can be read straight into ``target`` (same shape and dtype)."""
    return (
        isinstance(saved, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and saved.shape == target.shape
        and saved.dtype == target.dtype
    )
