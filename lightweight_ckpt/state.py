"""Pure state plumbing: unwrap, convert, filter, check keys, restore in place, report.

Nothing here does I/O or collectives, so every rule is unit-testable without files or processes.
Strategies call these functions; the ones that need sharded state dicts (FSDP) pass their own
``module_state_dict`` in through ``collect``'s ``convert`` argument.

Restoring is split in two so that a load is all-or-nothing:

1. ``plan_restore(state, checkpoint, strict)`` checks every entry (missing keys, unexpected keys,
   shape mismatches, optimizer structure) and raises before anything is changed. It also lists
   *bindings*: checkpoint tensors that may be read straight into an existing tensor of the
   target (a parameter, an optimizer moment), so the reader can skip a copy and extra memory.
2. ``apply_restore(plan, accepted)`` calls ``load_state_dict`` / replaces plain values and returns
   the remainder. ``accepted`` names the bindings the reader honoured.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from lightweight_ckpt.errors import MissingKeysError, StateMismatchError
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


def shape_of(value: object) -> tuple[int, ...] | None:
    """Return the (global) shape of a tensor, DTensor or ShardedTensor; None for other values."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    size = getattr(value, "size", None)
    if type(value).__name__ == "ShardedTensor" and callable(size):
        return tuple(size())
    return None


def _is_plain_tensor(value: object) -> bool:
    return type(value) in (torch.Tensor, nn.Parameter)


def _module_entry(
    key: str, target: StateDict, value: object, strict: bool, path: str
) -> tuple[StateDict, EntryReport, list[Binding]]:
    if not isinstance(value, Mapping):
        raise StateMismatchError(
            f"{path}: {_label(key)} is a module but the checkpoint holds a "
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
            if (
                _is_plain_tensor(saved)
                and _is_plain_tensor(current)
                and _same_layout(saved, current)
            ):
                bindings.append(Binding(saved, current.detach(), loadable, name))  # type: ignore[union-attr]
        loadable[name] = saved
    report = EntryReport(
        missing_keys=tuple(sorted(set(target) - set(value))),
        unexpected_keys=tuple(sorted(set(value) - set(target))),
        mismatched_shapes=tuple(sorted(mismatched)),
    )
    if strict and report:
        raise StateMismatchError(
            f"{path}: {_label(key)} does not match the checkpoint: {report.describe()}. "
            f"{_prefix_hint(report)}Pass strict=False to load the keys that match."
        )
    return loadable, report, bindings


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
    key: str, optimizer: torch.optim.Optimizer, value: object, path: str, sizes: list[int]
) -> list[Binding]:
    groups = value.get("param_groups") if isinstance(value, Mapping) else None
    saved_state = value.get("state") if isinstance(value, Mapping) else None
    if not isinstance(groups, list) or not isinstance(saved_state, dict):
        raise StateMismatchError(
            f"{path}: {_label(key)} is an optimizer but the checkpoint entry is not an "
            "optimizer state dict (no 'state' and 'param_groups')."
        )
    if any(isinstance(p, str) for g in groups for p in g.get("params", ())):
        return []  # keyed by parameter names (DCP's form): its setter checks the structure
    saved_sizes = [len(g.get("params", ())) for g in groups]
    if saved_sizes != sizes:
        raise StateMismatchError(
            f"{path}: {_label(key)} has parameter groups of sizes {sizes} but the checkpoint's "
            f"have sizes {saved_sizes}. Load into an optimizer built over the same parameters."
        )
    current = optimizer.state_dict()["state"]
    bindings = []
    for index, entries in saved_state.items():
        now = current.get(index, {})
        for name, saved in entries.items() if isinstance(entries, dict) else ():
            target = now.get(name)
            if _is_plain_tensor(target) and _same_layout(saved, target):
                bindings.append(Binding(saved, target, entries, name))
    return bindings


def _same_layout(saved: object, target: object) -> bool:
    return (
        isinstance(saved, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and saved.shape == target.shape
        and saved.dtype == target.dtype
    )


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
) -> RestorePlan:
    """Check that ``checkpoint`` fits ``state`` and plan the restore; change nothing.

    Raises:
        MissingKeysError: ``strict`` and some keys of ``state`` are not in the checkpoint.
        StateMismatchError: an entry does not fit its object (``strict`` module keys or shapes,
            optimizer structure, a module whose checkpoint entry is not a state dict).
    """
    if strict:
        check_requested_keys(path, list(state), checkpoint)
    entries: dict[str, EntryReport] = {}
    module_dicts: dict[str, StateDict] = {}
    bindings: list[Binding] = []
    for key, obj in state.items():
        if key not in checkpoint:
            continue
        value = checkpoint[key]
        if isinstance(obj, nn.Module):
            target = target_of(obj)
            module_dicts[key], entries[key], found = _module_entry(key, target, value, strict, path)
            bindings += found
        elif isinstance(obj, torch.optim.Optimizer):
            bindings += _optimizer_entry(key, obj, value, path, group_sizes(obj))
    report = LoadReport(
        path=path,
        strict=strict,
        entries=entries,
        missing_entries=tuple(sorted(k for k in state if k not in checkpoint)),
        remainder_keys=tuple(k for k in checkpoint if k not in state),
    )
    return RestorePlan(state, checkpoint, strict, report, module_dicts, bindings)


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
) -> Checkpoint:
    """Restore every entry of ``plan.state`` in place and return the remainder.

    ``accepted`` holds ``id(binding.source)`` of bindings whose data ``fill_targets`` writes
    straight into the target; those targets replace the checkpoint tensors, so nothing is
    copied twice. User ``Stateful`` objects are restored first, since they are the ones that
    may still refuse (and are rolled back if one does); only then are targets filled and
    modules, optimizers and values restored.
    """
    for binding in plan.bindings:
        if id(binding.source) in accepted:
            binding.container[binding.key] = binding.target
    state, checkpoint = plan.state, plan.checkpoint
    present = [key for key in state if key in checkpoint]
    users = [key for key in present if _restore_rank(state[key]) == 0]
    _restore_user_objects(state, checkpoint, users)
    fill_targets()
    for key in present:
        obj = state[key]
        if key in users:
            continue
        if isinstance(obj, nn.Module):
            load_module(obj, plan.module_dicts[key])
        elif isinstance(obj, torch.optim.Optimizer):
            load_optimizer(obj, checkpoint[key], owner_module(obj, state))
        else:
            state[key] = checkpoint[key]
    if not plan.report.clean:
        log.warning("%s", plan.report)
    return {key: value for key, value in checkpoint.items() if key not in state}


def _restore_user_objects(state: State, checkpoint: Checkpoint, keys: list[str]) -> None:
    """Restore user ``Stateful`` objects; if one refuses, put the ones before it back."""
    done: list[tuple[Stateful, dict[str, Any]]] = []
    for key in keys:
        obj = state[key]
        backup = copy.deepcopy(obj.state_dict())
        try:
            obj.load_state_dict(checkpoint[key])
        except Exception:
            for restored, previous in reversed(done):
                restored.load_state_dict(previous)
            obj.load_state_dict(backup)
            raise
        done.append((obj, backup))


def _restore_rank(obj: object) -> int:
    if isinstance(obj, nn.Module | torch.optim.Optimizer):
        return 1
    return 0 if is_stateful(obj) else 2


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
