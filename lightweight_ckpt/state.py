"""Pure state plumbing: unwrap, convert, filter, check keys, restore in place, report.

Nothing here does I/O or collectives, so every rule is unit-testable without files or processes.
Strategies call these functions; the ones that need sharded state dicts (FSDP) pass their own
``module_state_dict`` in through ``collect``'s ``convert`` argument.

Restoring is split in two so that a load is all-or-nothing:

1. ``plan_restore(state, checkpoint, strict)`` checks every entry (missing keys, unexpected keys,
   shape mismatches, optimizer structure and state shapes) and raises one error listing every
   problem before anything is changed. It also lists *bindings*: checkpoint tensors that may be
   read straight into an existing tensor of the target (a parameter, an optimizer moment), so
   the reader can skip a copy and extra memory.
2. ``apply_restore(plan, accepted)`` first runs everything that may still refuse (user objects,
   then a rehearsal of each module's and optimizer's ``load_state_dict`` that writes no tensor),
   then fills the targets, calls ``load_state_dict`` / replaces plain values and returns the
   remainder. ``accepted`` names the bindings the reader honoured.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightweight_ckpt.compat import DTensor
from lightweight_ckpt.errors import MissingKeysError, StateMismatchError
from lightweight_ckpt.rehearsal import rehearse_module, rehearse_optimizer
from lightweight_ckpt.shapes import (
    is_plain_tensor,
    optimizer_shape_problems,
    same_layout,
    shape_of,
)
from lightweight_ckpt.types import Checkpoint, KeepFn, State, StateDict, Stateful

log = logging.getLogger("lightweight_ckpt")


def unwrap_module(module: nn.Module) -> nn.Module:
    """Return the user's module inside ``torch.compile`` and (Distributed)DataParallel wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
            module = module.module
            continue
        return module


def is_sharded_module(module: nn.Module) -> bool:
    """Return True for FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) modules."""
    if isinstance(module, FullyShardedDataParallel):
        return True
    return any(isinstance(p, DTensor) for p in module.parameters())


def find_sharded(state: State) -> list[str]:
    """Return the keys of ``state`` whose modules are sharded, sorted."""
    return sorted(
        key for key, obj in state.items() if isinstance(obj, nn.Module) and is_sharded_module(obj)
    )


def is_stateful(obj: object) -> bool:
    """Return True for objects restored through ``load_state_dict`` (modules and optimizers too)."""
    return isinstance(obj, nn.Module | torch.optim.Optimizer | Stateful)


def to_state_dict(obj: object) -> Any:
    """Turn a module, optimizer or stateful object into its state dict; other values stay."""
    if isinstance(obj, nn.Module):
        return unwrap_module(obj).state_dict()
    if isinstance(obj, torch.optim.Optimizer | Stateful):
        return obj.state_dict()
    return obj


def collect(
    state: State,
    keep: Mapping[str, KeepFn],
    convert: Callable[[object], Any] = to_state_dict,
) -> Checkpoint:
    """Build the checkpoint dict from the user's state, applying per-key save filters."""
    checkpoint: Checkpoint = {}
    for key, obj in state.items():
        value = convert(obj)
        checkpoint[key] = apply_filter(value, keep[key]) if key in keep else value
    return checkpoint


def apply_filter(state_dict: StateDict, keep: KeepFn) -> StateDict:
    """Return the items of ``state_dict`` for which ``keep(name, value)`` is true, in order."""
    return {name: value for name, value in state_dict.items() if keep(name, value)}


def check_requested_keys(path: str, requested: list[str], available: Mapping[str, Any]) -> None:
    """Raise ``MissingKeysError`` listing every requested key the checkpoint lacks, sorted."""
    missing = sorted(key for key in requested if key not in available)
    if missing:
        raise MissingKeysError(
            f"{path}: the checkpoint lacks the requested keys {missing} "
            f"(it holds {sorted(available)}). Pass strict=False to load the rest."
        )


@dataclass(frozen=True)
class EntryReport:
    """What did not match when one state entry (a module or optimizer) was restored."""

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    """``(key, shape in checkpoint, shape in target)`` for each key skipped for its shape."""

    def __bool__(self) -> bool:
        return bool(self.missing_keys or self.unexpected_keys or self.mismatched_shapes)

    def describe(self) -> str:
        """Return one human-readable line."""
        parts = []
        if self.missing_keys:
            parts.append(f"missing {list(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"unexpected {list(self.unexpected_keys)}")
        if self.mismatched_shapes:
            shapes = [
                f"{k}: {list(c)} in checkpoint vs {list(t)}" for k, c, t in self.mismatched_shapes
            ]
            parts.append(f"shape mismatch [{', '.join(shapes)}]")
        return "; ".join(parts) or "ok"


@dataclass(frozen=True)
class LoadReport:
    """What a load restored and what it skipped, per state entry.

    ``entries`` maps each restored module entry to its ``EntryReport``. ``missing_entries`` are
    state keys the checkpoint did not hold (only possible with ``strict=False``).
    ``remainder_keys`` are checkpoint keys that ``state`` did not ask for.
    """

    path: str
    strict: bool
    entries: Mapping[str, EntryReport] = field(default_factory=dict)
    missing_entries: tuple[str, ...] = ()
    remainder_keys: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when every requested entry and key was found and loaded."""
        return not self.missing_entries and not any(self.entries.values())

    def __str__(self) -> str:
        lines = [f"load report for {self.path} (strict={self.strict}):"]
        lines += [f"  {key}: {entry.describe()}" for key, entry in self.entries.items()]
        if self.missing_entries:
            lines.append(f"  not in checkpoint: {list(self.missing_entries)}")
        if self.remainder_keys:
            lines.append(f"  not requested (returned as remainder): {list(self.remainder_keys)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Binding:
    """A checkpoint tensor that may be read straight into ``target`` (same shape and dtype).

    ``container[key]`` is where the checkpoint tensor sits; ``apply_restore`` puts ``target``
    there when the reader honoured the binding, so ``load_state_dict`` copies nothing.
    """

    source: torch.Tensor
    target: torch.Tensor
    container: dict[Any, Any]
    key: Any


@dataclass
class RestorePlan:
    """A checked restore: what goes where. Built by ``plan_restore``, run by ``apply_restore``."""

    state: State
    checkpoint: Checkpoint
    strict: bool
    report: LoadReport
    module_dicts: dict[str, StateDict] = field(default_factory=dict)
    bindings: list[Binding] = field(default_factory=list)


RAW_KEY = "<load_raw>"
"""The state key ``load_raw`` uses for its one object."""


def _label(key: str) -> str:
    return "the object passed to load_raw" if key == RAW_KEY else f"state[{key!r}]"


class _Unfit(Exception):  # noqa: N818 - a private signal that plan_restore turns into one error
    """One state entry does not fit its checkpoint entry; ``plan_restore`` gathers these."""


def _module_entry(
    key: str, target: StateDict, value: object
) -> tuple[StateDict, EntryReport, list[Binding]]:
    if not isinstance(value, Mapping):
        raise _Unfit(
            f"{_label(key)} is a module but the checkpoint holds a "
            f"{type(value).__name__} there, not a state dict."
        )
    loadable: StateDict = {}
    mismatched = []
    bindings = []
    for name, saved in value.items():
        current = target.get(name)
        saved_shape, current_shape = shape_of(saved), shape_of(current)
        if saved_shape is not None and current_shape is not None:
            if saved_shape != current_shape:
                mismatched.append((name, saved_shape, current_shape))
                continue
            if is_plain_tensor(saved) and is_plain_tensor(current) and same_layout(saved, current):
                bindings.append(Binding(saved, current.detach(), loadable, name))  # type: ignore[union-attr]
        loadable[name] = saved
    report = EntryReport(
        missing_keys=tuple(sorted(set(target) - set(value))),
        unexpected_keys=tuple(sorted(set(value) - set(target))),
        mismatched_shapes=tuple(sorted(mismatched)),
    )
    return loadable, report, bindings


def _module_problem(key: str, report: EntryReport) -> str:
    return (
        f"{_label(key)} does not match the checkpoint: {report.describe()}. "
        f"{_prefix_hint(report)}Pass strict=False to load the keys that match."
    )


def _prefix_hint(report: EntryReport) -> str:
    """Explain the common case of keys saved from a wrapper (``module.``, ``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        unexpected = report.unexpected_keys
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            stripped = {k[len(prefix) :] for k in unexpected}
            if stripped >= set(report.missing_keys):
                return (
                    f"The checkpoint's keys carry a {prefix!r} prefix: it was saved from a "
                    "wrapped model (DDP/DataParallel/torch.compile); strip the prefix. "
                )
    return ""


def _optimizer_entry(
    key: str, optimizer: torch.optim.Optimizer, value: object, sizes: list[int]
) -> list[Binding]:
    groups = value.get("param_groups") if isinstance(value, Mapping) else None
    saved_state = value.get("state") if isinstance(value, Mapping) else None
    if not isinstance(groups, list) or not isinstance(saved_state, dict):
        raise _Unfit(
            f"{_label(key)} is an optimizer but the checkpoint entry is not an "
            "optimizer state dict (no 'state' and 'param_groups')."
        )
    if any(isinstance(p, str) for g in groups for p in g.get("params", ())):
        return []  # keyed by parameter names (DCP's form): its setter checks the structure
    saved_sizes = [len(g.get("params", ())) for g in groups]
    if saved_sizes != sizes:
        raise _Unfit(
            f"{_label(key)} has parameter groups of sizes {sizes} but the checkpoint's "
            f"have sizes {saved_sizes}. Load into an optimizer built over the same parameters."
        )
    bad = optimizer_shape_problems(optimizer, groups, saved_state)
    if bad:
        listed = ", ".join(
            f"param {index} {name}: {list(saved)} in checkpoint vs {list(current)}"
            for index, name, saved, current in bad
        )
        raise _Unfit(
            f"{_label(key)} holds optimizer state of other shapes than its parameters "
            f"[{listed}]: the checkpoint's optimizer updated other parameters. Load into an "
            "optimizer built over the same parameters, or leave the optimizer out of the state "
            "(a partial optimizer load is never made, strict or not)."
        )
    current = optimizer.state_dict()["state"]
    bindings = []
    for index, entries in saved_state.items():
        now = current.get(index, {})
        for name, saved in entries.items() if isinstance(entries, dict) else ():
            target = now.get(name)
            if is_plain_tensor(target) and same_layout(saved, target):
                bindings.append(Binding(saved, target, entries, name))
    return bindings


def module_target(module: nn.Module) -> StateDict:
    """The tensors a module's ``load_state_dict`` fills: its own, unwrapped (the default)."""
    return unwrap_module(module).state_dict(keep_vars=True)


def group_sizes_of(optimizer: torch.optim.Optimizer) -> list[int]:
    """How many parameters each group of ``optimizer`` updates (the default)."""
    return [len(group["params"]) for group in optimizer.param_groups]


def plan_restore(
    path: str,
    state: State,
    checkpoint: Checkpoint,
    strict: bool,
    *,
    target_of: Callable[[nn.Module], StateDict] = module_target,
    group_sizes: Callable[[torch.optim.Optimizer], list[int]] = group_sizes_of,
    available: Collection[str] | None = None,
) -> RestorePlan:
    """Check that ``checkpoint`` fits ``state`` and plan the restore; change nothing.

    ``available``: every top-level key the checkpoint holds, where ``checkpoint`` carries only
    the requested ones (a sharded template); named in the missing-keys message.

    Every entry is checked before anything is raised, and one error lists every problem of
    every entry, sorted by state key: requested keys the checkpoint lacks (``strict``), module
    keys and shapes (``strict``), module entries that are not state dicts, and optimizer
    structure and state shapes. An optimizer whose saved state does not fit its parameters is
    refused with ``strict=False`` too: half an optimizer state cannot be resumed from, and
    quietly keeping fresh moments while the model loads would resume a different run.

    Raises:
        MissingKeysError: ``strict`` and some keys of ``state`` are not in the checkpoint (the
            message lists the other entries' problems too).
        StateMismatchError: an entry does not fit its object (``strict`` module keys or shapes,
            optimizer structure or state shapes, a module whose checkpoint entry is not a state
            dict).
    """
    entries: dict[str, EntryReport] = {}
    module_dicts: dict[str, StateDict] = {}
    bindings: list[Binding] = []
    problems: list[tuple[str, str]] = []
    for key, obj in state.items():
        if key not in checkpoint or not isinstance(obj, nn.Module | torch.optim.Optimizer):
            continue
        try:
            if isinstance(obj, nn.Module):
                loadable, entry, found = _module_entry(key, target_of(obj), checkpoint[key])
                module_dicts[key], entries[key] = loadable, entry
                if strict and entry:
                    problems.append((key, _module_problem(key, entry)))
            else:
                found = _optimizer_entry(key, obj, checkpoint[key], group_sizes(obj))
        except (_Unfit, StateMismatchError) as err:  # a hook may refuse with its own error
            problems.append((key, str(err)))
            continue
        bindings += found
    missing = sorted(k for k in state if k not in checkpoint)
    holds = list(checkpoint if available is None else available)
    _raise_problems(path, strict, missing, holds, sorted(problems))
    report = LoadReport(
        path=path,
        strict=strict,
        entries=entries,
        missing_entries=tuple(missing),
        remainder_keys=tuple(k for k in checkpoint if k not in state),
    )
    return RestorePlan(state, checkpoint, strict, report, module_dicts, bindings)


def _raise_problems(
    path: str,
    strict: bool,
    missing: list[str],
    available: list[str],
    problems: list[tuple[str, str]],
) -> None:
    """Raise one error naming every problem: ``MissingKeysError`` if keys are missing."""
    sentences = [text for _, text in problems]
    if strict and missing:
        others = f" Also: {' '.join(sentences)}" if sentences else ""
        raise MissingKeysError(
            f"{path}: the checkpoint lacks the requested keys {missing} "
            f"(it holds {sorted(available)}). Pass strict=False to load the rest.{others}"
        )
    if sentences:
        raise StateMismatchError(f"{path}: {' '.join(sentences)}")


def restore_module(module: nn.Module, state_dict: StateDict) -> None:
    """Load a checked module state dict (the default; FSDP plugs in DCP's setter)."""
    unwrap_module(module).load_state_dict(state_dict, strict=False)


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    state_dict: StateDict,
    module: nn.Module | None,  # noqa: ARG001 - FSDP's setter needs it; this default does not
) -> None:
    """Load a checked optimizer state dict (the default; FSDP plugs in DCP's setter)."""
    optimizer.load_state_dict(state_dict)


def apply_restore(
    plan: RestorePlan,
    accepted: set[int] | frozenset[int] = frozenset(),
    load_module: Callable[[nn.Module, StateDict], None] = restore_module,
    load_optimizer: Callable[
        [torch.optim.Optimizer, StateDict, nn.Module | None], None
    ] = restore_optimizer,
    fill_targets: Callable[[], None] = lambda: None,
    *,
    rehearse: bool = True,
) -> Checkpoint:
    """Restore every entry of ``plan.state`` in place and return the remainder.

    ``accepted`` holds ``id(binding.source)`` of bindings whose data ``fill_targets`` writes
    straight into the target; those targets replace the checkpoint tensors, so nothing is
    copied twice.

    All or nothing, without a copy of the state: everything that may refuse runs before the
    targets are filled. User ``Stateful`` objects are restored first (and put back from a copy
    of their state dicts if anything here refuses). Then every module and optimizer
    *rehearses* its load, which is undone at once: a module's ``load_state_dict`` runs on its
    own parameters and buffers (a copy onto itself, which copies nothing) with the checkpoint's
    extra state, so load hooks, ``set_extra_state`` and custom loaders refuse now; an
    optimizer's ``load_state_dict`` runs on the checkpoint's entry and its previous ``state``
    and ``param_groups`` are put back (its bound tensors are not filled yet, so nothing else
    changed). Only then are the targets filled, modules and optimizers loaded and plain values
    replaced. What can still fail after that is the reading itself, or a hook that accepted
    the rehearsal but refuses the real bytes. FSDP1 modules and optimizers over sharded or
    flattened parameters are not rehearsed (their setters are DCP's collectives).
    ``rehearse=False``: the caller ran ``rehearse_restore(plan)`` itself, before a read that
    writes into the targets.
    """
    for binding in plan.bindings:
        if id(binding.source) in accepted:
            binding.container[binding.key] = binding.target
    state, checkpoint = plan.state, plan.checkpoint
    present = [key for key in state if key in checkpoint]
    modules = [key for key in present if isinstance(state[key], nn.Module)]
    optimizers = [key for key in present if isinstance(state[key], torch.optim.Optimizer)]
    users = [k for k in present if is_stateful(state[k]) and k not in modules + optimizers]
    undo: list[Callable[[], None]] = []
    try:
        _restore_user_objects(state, checkpoint, users, undo)
        if rehearse:
            rehearse_restore(plan)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    fill_targets()
    for key in modules:
        load_module(state[key], plan.module_dicts[key])
    for key in optimizers:
        optimizer = state[key]
        load_optimizer(optimizer, checkpoint[key], owner_module(optimizer, state))
    for key in present:
        if not is_stateful(state[key]):
            state[key] = checkpoint[key]
    if not plan.report.clean:
        log.warning("%s", plan.report)
    return {key: value for key, value in checkpoint.items() if key not in state}


def rehearse_restore(plan: RestorePlan) -> None:
    """Run what may refuse in each module's and optimizer's load, then undo it; write no tensor.

    Raises whatever a load hook, ``set_extra_state``, a custom loader or an optimizer's
    ``load_state_dict`` raises. Call it before anything writes into the targets (a fill, a
    sharded read into the modules' own tensors); ``apply_restore`` calls it unless told not to.
    """
    for key, obj in plan.state.items():
        if key not in plan.checkpoint:
            continue
        if isinstance(obj, nn.Module) and key in plan.module_dicts:
            rehearse_module(unwrap_module(obj), plan.module_dicts[key])
        elif isinstance(obj, torch.optim.Optimizer):
            rehearse_optimizer(obj, plan.checkpoint[key])


def _restore_user_objects(
    state: State, checkpoint: Checkpoint, keys: list[str], undo: list[Callable[[], None]]
) -> None:
    """Restore user ``Stateful`` objects, each with an undo step from a copy of its state."""
    for key in keys:
        obj = state[key]
        backup = copy.deepcopy(obj.state_dict())
        try:
            obj.load_state_dict(checkpoint[key])
        except BaseException:
            obj.load_state_dict(backup)
            raise
        undo.append(functools.partial(obj.load_state_dict, backup))


def owner_module(optimizer: torch.optim.Optimizer, state: State) -> nn.Module | None:
    """Return the module in ``state`` whose parameters ``optimizer`` updates, if there is one."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for obj in state.values():
        if isinstance(obj, nn.Module) and wanted <= {id(p) for p in obj.parameters()}:
            return obj
    return None


def iter_tensors(tree: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted_name, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            yield from iter_tensors(value, f"{prefix}.{index}" if prefix else str(index))
