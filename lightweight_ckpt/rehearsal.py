"""Rehearsals: run what may refuse in a module's or optimizer's load, then undo it.

``state.rehearse_restore`` calls these before anything writes into the caller's tensors, so a
load hook, ``set_extra_state`` or an optimizer's ``load_state_dict`` that raises leaves the
state as it was (all-or-nothing loads), without a copy of the state.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightweight_ckpt.shapes import is_plain_tensor

if TYPE_CHECKING:
    from lightweight_ckpt.types import StateDict

log = logging.getLogger("lightweight_ckpt")

_EXTRA_STATE_SUFFIX = "_extra_state"  # torch.nn.Module's key for get_extra_state()


def rehearse_module(inner: nn.Module, state_dict: StateDict) -> None:
    """Run an unwrapped module's ``load_state_dict`` on its own tensors and the saved extra state.

    Loading a parameter or buffer from itself copies nothing (``copy_`` of a tensor onto
    itself returns at once), so no tensor changes; the load hooks and ``set_extra_state`` run,
    and the previous extra state (small by nature) is put back afterwards.
    """
    if any(isinstance(m, FullyShardedDataParallel) for m in inner.modules()):
        return  # its state_dict and load_state_dict are collectives
    own = inner.state_dict(keep_vars=True)
    rehearsal = {
        name: value
        if name.endswith(_EXTRA_STATE_SUFFIX) or not isinstance(own[name], torch.Tensor)
        else own[name]
        for name, value in state_dict.items()
        if name in own
    }
    extra = [
        (m, copy.deepcopy(m.get_extra_state()))
        for m in inner.modules()
        if type(m).get_extra_state is not nn.Module.get_extra_state
        and type(m).set_extra_state is not nn.Module.set_extra_state
    ]
    try:
        inner.load_state_dict(rehearsal, strict=False)
    except BaseException:
        _put_extra_state_back(extra, after_refusal=True)
        raise
    _put_extra_state_back(extra, after_refusal=False)


def _put_extra_state_back(extra: list[tuple[nn.Module, Any]], *, after_refusal: bool) -> None:
    """Give each submodule its previous extra state again, where the rehearsal changed it."""
    for submodule, previous in extra:
        _put_back_one(submodule, previous, after_refusal=after_refusal)


def _put_back_one(submodule: nn.Module, previous: Any, *, after_refusal: bool) -> None:
    try:
        if not _same_value(submodule.get_extra_state(), previous):
            submodule.set_extra_state(previous)
    except Exception:
        if not after_refusal:
            raise
        # the refusal is what the caller sees; this one only explains a changed module
        log.warning("could not put back the extra state of %s", type(submodule).__name__)


def _same_value(a: object, b: object) -> bool:
    """Exact equality of nested values (tensors bitwise); False where it cannot be told."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object whose == cannot answer counts as changed
        return False


def rehearse_optimizer(optimizer: torch.optim.Optimizer, entry: object) -> None:
    """Run ``optimizer.load_state_dict(entry)``, then put its previous state back.

    Bound tensors are not filled yet and ``load_state_dict`` builds new ``state`` and
    ``param_groups`` without writing into the old ones, so putting those back copies nothing.
    Skipped where that is not known to hold (an optimizer with its own ``load_state_dict``)
    or the strategy's setter is not ``load_state_dict`` over these parameters (entries keyed by
    names, sharded or flattened parameters: DCP's setter).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = entry.get("param_groups") if isinstance(entry, dict) else None
    if (
        type(optimizer).load_state_dict is not torch.optim.Optimizer.load_state_dict
        or not isinstance(entry, dict)
        or not isinstance(groups, list)
        or any(isinstance(p, str) for g in groups for p in g.get("params", ()))
        or not all(is_plain_tensor(p) and not getattr(p, "_fsdp_flattened", False) for p in params)
    ):
        return
    state = optimizer.state
    previous = optimizer.param_groups
    try:
        optimizer.load_state_dict(entry)
    finally:
        optimizer.__setstate__({"state": state, "param_groups": previous})
