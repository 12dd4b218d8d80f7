"""The collective-safe order of a save's and a load's steps, shared by every strategy.

Some state-dict hooks are collectives (FSDP1's getters and setters, full state dicts, DTensor
scatters): every rank must enter them, in the same order, or the ranks meet in mismatched
collectives and hang until the process group's timeout. User code (a ``Stateful``'s
``state_dict``/``load_state_dict``, a filter) and I/O may fail on one rank only. So:

- ``collect``: the modules' and optimizers' state dicts first, in the state's order on every rank,
  then the rank-local rest (user objects, filters); a failure there is agreed by the caller.
- ``StateViews``: what a load compares against and reads into (the hooks' targets, group sizes,
  the sharded views), computed once per load, up front and in the state's order on every rank
  when the strategy's hooks are collectives, before any rank-local I/O can fail.
- ``restore``: in agreed steps: (0) before a sharded read, every module's and optimizer's load
  rehearsed (what may refuse, refuses here: nothing written yet), (1) the rank-local part (the
  sharded read of everything but the modules' and optimizers' tensors, user objects, plain
  values; user objects and values rolled back on every rank if any rank failed), (2) the
  sharded read of the modules' and optimizers' tensors, or a single file's fill into the
  targets: no tensor of theirs is written before every rank passed (1), (3) the module and
  optimizer setters, on every rank in the same order.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lightweight_ckpt.state import (
    RestorePlan,
    apply_restore,
    is_stateful,
    owner_module,
    rehearse_restore,
    to_state_dict,
)
from lightweight_ckpt.state import (
    collect as collect_state,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from lightweight_ckpt.strategies.base import Strategy
    from lightweight_ckpt.types import Checkpoint, FilterMap, State, StateDict


def _is_hooked(obj: object) -> bool:
    """True for what the strategy's state-dict hooks handle (possibly collectives)."""
    return isinstance(obj, nn.Module | torch.optim.Optimizer)


def collect(strategy: Strategy, state: State, keep: FilterMap) -> Checkpoint:
    """Build the checkpoint: hooked objects first, in the state's order, then the rest.

    Every rank enters the hooks' collectives before any user code that may raise on one rank
    only runs; the caller agrees on the outcome (``run_on_all_ranks``).
    """
    converted: dict[int, Any] = {}
    for obj in state.values():
        if _is_hooked(obj) and id(obj) not in converted:
            converted[id(obj)] = strategy.convert(obj, state)
    return collect_state(
        state,
        keep,
        lambda obj: converted[id(obj)] if id(obj) in converted else strategy.convert(obj, state),
    )


def sharded_view(obj: object, state: State) -> Any:
    """Return what a sharded checkpoint holds for ``obj``: DCP's state dicts.

    They are keyed by names and sharded where the modules are, whatever strategy wrote them, so
    any strategy can load any sharded checkpoint.
    """
    if isinstance(obj, nn.Module):
        return get_model_state_dict(obj)
    if isinstance(obj, torch.optim.Optimizer):
        module = owner_module(obj, state)
        if module is None:
            raise ValueError(
                "loading an optimizer from a sharded checkpoint needs the module it updates "
                "in the same state"
            )
        return get_optimizer_state_dict(module, obj)
    return to_state_dict(obj)


class StateViews:
    """The hooks' views of one load's state, each computed once (and in a fixed order).

    ``prepare()`` computes every view of every module and optimizer in the state's order; call
    it on every rank before the first rank-local step when the hooks are collectives. Otherwise
    views are computed when first asked for.
    """

    def __init__(self, strategy: Strategy, state: State) -> None:
        self.strategy = strategy
        self.state = state
        self._memo: dict[tuple[str, int], Any] = {}

    def _get(self, kind: str, obj: Any, compute: Callable[[], Any]) -> Any:
        key = (kind, id(obj))
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def target(self, module: nn.Module) -> StateDict:
        """``strategy.module_target(module)``."""
        return self._get("target", module, lambda: self.strategy.module_target(module))  # type: ignore[no-any-return]

    def group_sizes(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """``strategy.optimizer_group_sizes`` for ``optimizer`` and the module it updates.

        Where the targets are the sharded views, the groups of the sharded view are counted.
        """
        module = owner_module(optimizer, self.state)
        if self.strategy.targets_are_sharded_views and module is not None:
            return [len(group["params"]) for group in self.sharded(optimizer)["param_groups"]]
        return self._get(  # type: ignore[no-any-return]
            "sizes", optimizer, lambda: self.strategy.optimizer_group_sizes(optimizer, module)
        )

    def sharded(self, obj: object) -> Any:
        """``sharded_view(obj)``: computed once for modules and optimizers; user objects fresh."""
        if not _is_hooked(obj):
            return sharded_view(obj, self.state)
        if self.strategy.targets_are_sharded_views and isinstance(obj, nn.Module):
            return self.target(obj)
        return self._get("sharded", obj, lambda: sharded_view(obj, self.state))

    def prepare(self) -> StateViews:
        """Compute every view of the state's modules and optimizers, in the state's order."""
        for obj in self.state.values():
            if isinstance(obj, nn.Module):
                self.target(obj)
                self.sharded(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                self.group_sizes(obj)
                if owner_module(obj, self.state) is not None:  # else the open step refuses it
                    self.sharded(obj)
        return self


class _Backup:
    """What the rank-local restore step changes: user objects' state and plain values."""

    def __init__(self, plan: RestorePlan) -> None:
        state, checkpoint = plan.state, plan.checkpoint
        self.state = state
        present = [key for key in state if key in checkpoint and not _is_hooked(state[key])]
        self.user = {
            k: copy.deepcopy(state[k].state_dict()) for k in present if is_stateful(state[k])
        }
        self.values = {k: state[k] for k in present if not is_stateful(state[k])}

    def undo(self) -> None:
        """Put the user objects and plain values back as they were."""
        for key, previous in self.user.items():
            self.state[key].load_state_dict(previous)
        self.state.update(self.values)


def target_keys(plan: RestorePlan, keys: Iterable[str]) -> list[str]:
    """Return which of ``keys`` hold a module's or optimizer's entry in ``plan.state``.

    A sharded read of those writes into the objects' own tensors wherever the hooks' views
    share storage with them (FSDP2's DTensors, a plain or DDP module's parameters, optimizer
    moments), so it is the last rank-local step (see ``restore``).
    """
    return [key for key in keys if key in plan.state and _is_hooked(plan.state[key])]


def restore(
    strategy: Strategy,
    plan: RestorePlan,
    *,
    accepted: set[int] | frozenset[int] = frozenset(),
    read: Callable[[], None] | None = None,
    read_targets: Callable[[], None] | None = None,
    fill: Callable[[], None] | None = None,
) -> Checkpoint:
    """Restore ``plan`` in agreed steps; return the remainder. Runs on every rank.

    A sharded load passes ``read`` and ``read_targets``. ``read``: what the user objects, the
    plain values and the remainder need (never a module's or optimizer's tensor), run in the
    rank-local step just before the user objects restore from it. ``read_targets``: the
    modules' and optimizers' tensors, an agreed step of its own once every rank's user objects
    and values accepted theirs, so a refusal on any rank leaves every tensor unwritten. Both
    come after every rank's modules and optimizers accepted the checkpoint
    (``rehearse_restore``, an agreed step of its own). ``fill``: a single file's fill into the
    targets, its own step after the user objects accepted their state. The setters (FSDP1:
    collectives) run last, on every rank in the same order. A failure in any step on any rank
    puts the user objects and plain values back on every rank; what may fail once a target
    is written is the reading itself (the items were CRC-checked when the read was planned)
    or a setter that accepted the rehearsal but refuses the real tensors.
    """
    setters: list[Callable[[], None]] = []

    def defer_module(module: nn.Module, state_dict: StateDict) -> None:
        setters.append(lambda: strategy.load_module_state_dict(module, state_dict))

    def defer_optimizer(
        optimizer: torch.optim.Optimizer, state_dict: StateDict, module: nn.Module | None
    ) -> None:
        setters.append(lambda: strategy.load_optimizer_state_dict(optimizer, state_dict, module))

    sharded = read is not None or read_targets is not None
    # sharded: also in one process, as the read writes into user objects' own tensors
    backup = _Backup(plan) if strategy.world_size > 1 or sharded else None

    def local() -> Checkpoint:
        if not sharded:
            return apply_restore(plan, accepted, defer_module, defer_optimizer)
        if read is not None:
            read()
        return apply_restore(plan, accepted, defer_module, defer_optimizer, rehearse=False)

    try:
        if sharded:
            # its own agreed step: nothing is read before every rank's modules and optimizers
            # accepted the checkpoint
            strategy.run_on_all_ranks("rehearse", lambda: rehearse_restore(plan))
        remainder = strategy.run_on_all_ranks("restore", local)
        if read_targets is not None:
            strategy.run_on_all_ranks("read", read_targets)
        if fill is not None:
            strategy.run_on_all_ranks("fill", fill)
        strategy.run_on_all_ranks("restore modules", lambda: [setter() for setter in setters])
    except BaseException:
        if backup is not None:  # one rank's failure: every rank puts its objects back
            backup.undo()
        raise
    return remainder
