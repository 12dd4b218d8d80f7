"""Loading a sharded (DCP) directory into a state, in steps every rank agrees on.

(1) ``template``, then ``plan``, on every rank: read the metadata → check keys and shapes → build
a template from the hooks (sharded where the modules are) → plan this rank's DCP read and
CRC-check every item it reads (``dcp_load.plan_read``; no collective). (2) Only when every rank
passed (1), ``load``: ``steps.restore`` reads what the user objects and values need and restores
them, and only when every rank passed that, reads the modules' and optimizers' tensors (into
their own storage where the hooks' views share it) and runs the setters. An IO that overrides
``load_sharded`` reads each of those two parts in a collective pass of its own instead.
``Strategy.load`` runs the steps; ``Strategy._open_sharded`` may refuse a directory first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightweight_ckpt.formats.dcp_dir import top_level_keys
from lightweight_ckpt.formats.dcp_load import PlannedRead, plan_read, skeleton
from lightweight_ckpt.io import CheckpointIO
from lightweight_ckpt.state import LoadReport, RestorePlan, collect, is_stateful, plan_restore
from lightweight_ckpt.strategies import steps

if TYPE_CHECKING:
    from lightweight_ckpt.strategies.base import Strategy
    from lightweight_ckpt.types import Checkpoint, State, StorageOptions, StrPath


@dataclass
class OpenSharded:
    """A sharded checkpoint checked against the state on this rank; nothing restored yet.

    ``template``: what the read fills; ``plan``: the restore plan (None: no state given);
    ``planned``: this rank's read, planned and checked (None: the IO reads collectively).
    """

    template: Checkpoint
    plan: RestorePlan | None
    planned: PlannedRead | None

    def close(self) -> None:
        """Let go of the planned read (another rank failed: nothing is read or restored)."""
        if self.planned is not None:
            self.planned.close()


def close(opened: OpenSharded | None) -> None:
    """Let go of ``opened``, if any (the "open" step failed on another rank)."""
    if opened is not None:
        opened.close()


def template(
    strategy: Strategy,
    path: StrPath,
    state: State | None,
    strict: bool,
    storage_options: StorageOptions | None,
    *,
    views: steps.StateViews | None = None,
) -> tuple[Checkpoint, RestorePlan | None]:
    """Check the sharded checkpoint at ``path`` against ``state``; build the template.

    The template holds the stateful entries as the hooks give them (sharded for FSDP
    modules), and plain values and unrequested entries as laid out in the metadata, so that
    one DCP pass reads everything.
    """
    io = strategy.checkpoint_io
    metadata = io.read_sharded_metadata(path, storage_options)
    available = top_level_keys(metadata)
    if not state:
        return skeleton(metadata, set(available)), None
    views = views or steps.StateViews(strategy, state)
    present = {k: obj for k, obj in state.items() if k in available}
    stateful = {k: obj for k, obj in present.items() if is_stateful(obj)}
    tree = collect(stateful, {}, views.sharded)
    saved = _saved_entries(metadata, available, tree, state)
    saved.update({k: None for k in present if k not in stateful})  # filled by the same pass
    plan = plan_restore(
        str(path),
        state,  # all of it: requested keys the checkpoint lacks are named in one error
        saved,
        strict,
        target_of=views.target,
        group_sizes=views.group_sizes,
        available=available,
    )
    for key, entry in plan.module_dicts.items():  # keep what matched, as the plan decided
        tree[key] = {name: tree[key][name] for name in entry if name in tree[key]}
    tree.update(skeleton(metadata, set(available) - set(stateful)))
    plan.state = state
    plan.report = _with_missing(plan.report, state, available)
    return tree, plan


def plan(
    strategy: Strategy,
    path: StrPath,
    tree: Checkpoint,
    restore_plan: RestorePlan | None,
    *,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
) -> OpenSharded:
    """Plan and check this rank's read of ``tree`` where the IO reads the default way.

    ``dcp_load.plan_read``: CRC32 of every item it reads, non-tensor values read, so that the
    "open" agreement also stands for DCP's planning step and nothing the caller owns is
    written before every rank passed it. An IO that overrides ``load_sharded`` reads
    collectively later (``planned`` is None).
    """
    io = strategy.checkpoint_io
    if type(io).load_sharded is not CheckpointIO.load_sharded:
        return OpenSharded(tree, restore_plan, None)  # the IO's own read, a collective
    planned = plan_read(tree, io.locate(path, storage_options), weights_only is not False)
    return OpenSharded(tree, restore_plan, planned)


def load(
    strategy: Strategy,
    path: StrPath,
    opened: OpenSharded,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
) -> tuple[Any, LoadReport | None]:
    """Read and restore what every rank opened and checked, in agreed steps.

    The read goes in two parts (``steps.restore``): first what the user objects, plain
    values and remainder need, restored and agreed on; then the modules' and optimizers'
    tensors, which it writes into their own storage where the hooks' views share it. With
    a read planned at open, each part reads this rank's items (no other collective);
    otherwise each part is one of the IO's collective DCP passes (its errors reach every
    rank).
    """
    tree, restore_plan, planned = opened.template, opened.plan, opened.planned
    io = strategy.checkpoint_io
    if restore_plan is None:
        if planned is None:
            io.load_sharded(tree, path, weights_only=weights_only, storage_options=storage_options)
        strategy.run_on_all_ranks("restore", planned.read if planned is not None else _nothing)
        return tree, None
    targets = steps.target_keys(restore_plan, tree)
    rest = [key for key in tree if key not in targets]

    def read_part(keys: list[str]) -> None:
        if planned is not None:
            planned.read(keys)
            return
        part = {key: tree[key] for key in keys}
        io.load_sharded(part, path, weights_only=weights_only, storage_options=storage_options)
        tree.update(part)  # values the pass put in place of their placeholders
        checkpoint = restore_plan.checkpoint
        checkpoint.update({key: part[key] for key in keys if key in checkpoint})

    for key in restore_plan.checkpoint:
        restore_plan.checkpoint[key] = tree[key]
    restore_plan.module_dicts.update({k: tree[k] for k in restore_plan.module_dicts})
    try:
        remainder = steps.restore(
            strategy,
            restore_plan,
            read=lambda: read_part(rest),
            read_targets=lambda: read_part(targets),
        )
    finally:
        if planned is not None:  # a step failed before the last part: let go of the pieces
            planned.close()
    remainder.update({k: tree[k] for k in restore_plan.report.remainder_keys})
    return remainder, restore_plan.report


def _nothing() -> None:
    """A step with nothing to do on this rank (the others still agree on it)."""


def _saved_entries(
    metadata: Any,
    available: dict[str, list[str]],
    tree: Checkpoint,
    state: State,
) -> Checkpoint:
    """Describe each saved module entry as ``{name: meta tensor of the saved shape}``.

    Module entries are compared by name and shape before any data is read; the other entries
    pass through from the template (DCP and their own setters check their structure).
    """
    saved: Checkpoint = {}
    for key, value in tree.items():
        if not isinstance(state[key], nn.Module):
            saved[key] = value
            continue
        entry = {}
        for fqn in available[key]:
            size = getattr(metadata.state_dict_metadata[fqn], "size", None)
            meta = torch.empty(tuple(size), device="meta") if size is not None else None
            entry[fqn.removeprefix(f"{key}.")] = meta
        saved[key] = entry
    return saved


def _with_missing(report: LoadReport, state: State, available: dict[str, list[str]]) -> LoadReport:
    """Report the state keys the checkpoint lacks and the entries it holds beyond ``state``."""
    missing = tuple(sorted(k for k in state if k not in available))
    remainder = tuple(k for k in available if k not in state)
    return LoadReport(report.path, report.strict, report.entries, missing, remainder)
