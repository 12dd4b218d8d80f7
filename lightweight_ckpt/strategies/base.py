"""``Strategy``: the save/load/load_raw pipeline every strategy shares, and its hooks.

The pipeline is written once, here. A strategy changes *who* writes, *which* layout and *how*
state dicts are produced and restored by overriding small hooks, never the pipeline:

- ``module_state_dict`` / ``optimizer_state_dict``: the state dicts to save (FSDP: sharded or
  full ones through DCP's state-dict API);
- ``module_target`` / ``load_module_state_dict`` / ``load_optimizer_state_dict``: what a load
  compares against and how it restores (FSDP: DCP's setters);
- ``check_state``: refuse state the strategy cannot handle, before any collective;
- ``write``: who writes (single device: this process; DDP: rank 0; sharded: every rank a piece);
- ``read_shared``: who reads a single file (by default every rank; DDP: rank 0 for remote files,
  broadcast to the others).

Save: check → agree on the path → collect (the hooks' state dicts first, in the state's order on
every rank, then user objects and filters; agreed) → ``write``; a failure on any rank raises on
every rank, and none is left inside a collective the others skipped (``steps``).

Load, single file, in two steps agreed by every rank: (1) open a staged reader →
``plan_restore`` (checks everything, changes nothing) → ``verify`` (CRC32, fill the reader's own
tensors); (2) only when every rank passed (1): ``steps.restore`` (user objects and values; then
``fill`` reads into the targets; then the module and optimizer setters, each an agreed step). A
damaged file or a mismatched state on one rank therefore changes no rank's state. Where the hooks
are collectives (FSDP), their views of the state are computed before (1), on every rank in the
same order (``steps.StateViews``), so a rank failing its I/O never skips them.

Ranks coordinate through two hooks, ``run_on_all_ranks`` and ``broadcast_object``
(``torch.distributed`` through ``collectives`` by default; XLA replicas use their runtime).

Load, sharded directory, in the same two agreed steps: (1) read the metadata → check keys and
shapes → build a template from the hooks (sharded where the modules are) → plan this rank's DCP
read and CRC-check every item it reads (``dcp_dir.plan_read``; no collective); (2) only when every
rank passed (1): ``steps.restore`` reads what the user objects and values need and restores them,
and only when every rank passed that, reads the modules' and optimizers' tensors (into their own
storage where the hooks' views share it) and runs the setters. An IO that overrides
``load_sharded`` reads each of those two parts in a collective pass of its own instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast, final

import torch
from torch import nn

from lightweight_ckpt import collectives
from lightweight_ckpt.errors import InvalidCheckpointError
from lightweight_ckpt.formats import dcp_versions
from lightweight_ckpt.formats.dcp_dir import PlannedRead, plan_read, skeleton, top_level_keys
from lightweight_ckpt.io import CheckpointIO, CheckpointReader, TorchCheckpointIO
from lightweight_ckpt.state import (
    RAW_KEY,
    LoadReport,
    RestorePlan,
    collect,
    is_stateful,
    owner_module,
    plan_restore,
    restore_module,
    restore_optimizer,
    to_state_dict,
    unwrap_module,
)
from lightweight_ckpt.strategies import steps

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightweight_ckpt.types import (
        Checkpoint,
        FilterMap,
        MapLocation,
        State,
        StateDict,
        StorageOptions,
        StrPath,
    )


T = TypeVar("T")


@dataclass
class OpenFile:
    """A checkpoint file that is checked and verified on this rank; nothing restored yet."""

    reader: CheckpointReader
    checkpoint: Any
    plan: RestorePlan | None
    accepted: set[int]

    def close(self) -> None:
        """Release the reader (another rank failed: nothing is restored)."""
        self.reader.close()


def _close_sharded(opened: OpenSharded | None) -> None:
    if opened is not None:
        opened.close()


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


class Strategy:
    """Decide who writes and reads a checkpoint, in which layout; run the shared pipeline.

    Args:
        checkpoint_io: the IO plugin for every read and write (default ``TorchCheckpointIO``).
    """

    map_location: MapLocation = "cpu"
    collective_hooks: bool = False
    """True where the state-dict hooks run collectives (FSDP): a load then computes every view
    of the state up front, on every rank in the same order (``steps.StateViews.prepare``)."""
    targets_are_sharded_views: bool = False
    """True where ``module_target`` is DCP's sharded model state dict and the optimizer's groups
    are those of DCP's sharded optimizer state dict (FSDP): each is then computed once."""

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        self.checkpoint_io: CheckpointIO = checkpoint_io or TorchCheckpointIO()

    @property
    def global_rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return collectives.global_rank()

    @property
    def world_size(self) -> int:
        """The number of processes (1 without a process group)."""
        return collectives.world_size()

    @property
    def is_global_zero(self) -> bool:
        """True on rank 0."""
        return self.global_rank == 0

    def run_on_all_ranks(
        self, step: str, fn: Callable[[], T], on_abort: Callable[[T], object] | None = None
    ) -> T:
        """Run ``fn`` on every rank; a failure on any raises on all (see ``collectives``)."""
        return collectives.run_on_all_ranks(step, fn, on_abort)

    def broadcast_object(self, obj: T) -> T:
        """Return rank 0's ``obj`` on every rank."""
        return collectives.broadcast_object(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        collectives.barrier()

    # -- hooks -------------------------------------------------------------------------------

    def check_state(self, state: State) -> None:
        """Raise if this strategy cannot handle ``state`` (called before any collective)."""

    def module_state_dict(self, module: nn.Module) -> StateDict:
        """Return the state dict to save for ``module`` (wrappers removed)."""
        return unwrap_module(module).state_dict()

    def optimizer_state_dict(
        self, module: nn.Module | None, optimizer: torch.optim.Optimizer
    ) -> StateDict:
        """Return the state dict to save for ``optimizer`` (``module``: the one it updates)."""
        return optimizer.state_dict()

    def optimizer_group_sizes(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None
    ) -> list[int]:
        """Return how many parameters each of ``optimizer``'s groups updates."""
        return [len(group["params"]) for group in optimizer.param_groups]

    def module_target(self, module: nn.Module) -> StateDict:
        """Return the tensors a load of ``module`` is checked against (and may read into)."""
        return unwrap_module(module).state_dict(keep_vars=True)

    def load_module_state_dict(self, module: nn.Module, state_dict: StateDict) -> None:
        """Restore ``module`` from a checked state dict."""
        restore_module(module, state_dict)

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state_dict: StateDict, module: nn.Module | None
    ) -> None:
        """Restore ``optimizer`` from a checked state dict."""
        restore_optimizer(optimizer, state_dict, module)

    def views(self, state: State) -> steps.StateViews:
        """Return the hooks' views of ``state`` for one load (see ``steps.StateViews``).

        Runs on every rank; with ``collective_hooks`` they are computed here, in one agreed step.
        """
        views = steps.StateViews(self, state)
        if self.collective_hooks:
            self.run_on_all_ranks("prepare load", views.prepare)
        return views

    def read_shared(
        self, path: StrPath, weights_only: bool | None, storage_options: StorageOptions | None
    ) -> CheckpointReader | None:
        """Return a single file read once and shared with this rank, or None (it reads it).

        Called on every rank before a single file is opened; DDP reads a remote file on rank 0
        and broadcasts it.
        """
        return None

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Write the collected checkpoint (this process writes; subclasses pick the writers)."""
        if storage_options is None:
            self.checkpoint_io.save_checkpoint(checkpoint, path)
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    # -- pipeline ----------------------------------------------------------------------------

    def convert(self, obj: object, state: State) -> Any:
        """Turn one state value into what is saved, through the state-dict hooks."""
        if isinstance(obj, nn.Module):
            return self.module_state_dict(obj)
        if isinstance(obj, torch.optim.Optimizer):
            return self.optimizer_state_dict(owner_module(obj, state), obj)
        return to_state_dict(obj)

    @final
    def save(
        self,
        path: StrPath,
        state: State,
        filter: FilterMap | None = None,  # noqa: A002 - Lightning's name
        storage_options: StorageOptions | None = None,
    ) -> None:
        """Collect ``state``, apply ``filter`` and write it; raise on every rank if any failed."""
        self.check_state(state)
        path = self.broadcast_object(path)  # rank 0's path wins, as in Lightning
        # hooks first on every rank (they may be collectives), then user code; agreed, so a
        # state_dict() raising on one rank raises on all before anything is written
        checkpoint = self.run_on_all_ranks(
            "collect", lambda: steps.collect(self, state, filter or {})
        )
        self.run_on_all_ranks("save", lambda: self.write(checkpoint, path, storage_options))

    @final
    def load(
        self,
        path: StrPath,
        state: State | None,
        strict: bool = True,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> tuple[Any, LoadReport | None]:
        """Restore ``state`` in place from ``path``; return ``(remainder, report)``.

        Without ``state``, return ``(whole checkpoint, None)``. Runs on every rank; a failure on
        any rank raises on all.
        """
        if state:
            self.check_state(state)
        path = self.broadcast_object(path)
        views = self.views(state) if state else None
        try:
            opened = self.run_on_all_ranks(
                "open",
                lambda: self._open_sharded_read(
                    path, state, strict, weights_only, storage_options, views=views
                ),
                on_abort=_close_sharded,
            )
            if opened is not None:
                return self._load_sharded(path, opened, weights_only, storage_options)
        except collectives.RankFailedError as failure:  # damage seen by one rank: the same error
            raise failure.checkpoint_error() from failure  # on all (as DCP's own steps did)
        return self._load_file(path, state, strict, weights_only, storage_options, views=views)

    def _load_file(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
        *,
        raw: bool = False,
        views: steps.StateViews | None = None,
    ) -> tuple[Any, LoadReport | None]:
        """Load one file in two agreed steps: check and verify on every rank, then restore.

        With ``raw``, the file is one state dict for ``state[RAW_KEY]``. ``views``: the state's
        views (``self.views(state)``; computed here when not given). Runs on every rank.
        """
        if state and views is None:
            views = self.views(state)
        shared = self.read_shared(path, weights_only, storage_options)
        opened = self.run_on_all_ranks(
            "read",
            lambda: self._open_file(
                path,
                state,
                strict,
                weights_only,
                storage_options,
                raw=raw,
                shared=shared,
                views=views,
            ),
            on_abort=OpenFile.close,
        )
        if opened.plan is None:
            return self.run_on_all_ranks("restore", lambda: self._restore_file(opened))
        return self._restore_file(opened)  # in agreed steps

    def _open_file(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
        *,
        raw: bool,
        shared: CheckpointReader | None = None,
        views: steps.StateViews | None = None,
    ) -> OpenFile:
        """Open, plan and verify one file on this rank; change nothing the caller owns.

        ``shared``: the file as ``read_shared`` handed it to this rank (then nothing is read).
        """
        reader = (
            shared
            if shared is not None
            else self.checkpoint_io.open_checkpoint(
                path,
                map_location=self.map_location,
                weights_only=weights_only,
                storage_options=storage_options,
            )
        )
        try:
            return self._check_file(reader, path, state, strict, raw=raw, views=views)
        except BaseException:
            reader.close()
            raise

    def _check_file(
        self,
        reader: CheckpointReader,
        path: StrPath,
        state: State | None,
        strict: bool,
        *,
        raw: bool,
        views: steps.StateViews | None = None,
    ) -> OpenFile:
        checkpoint = reader.skeleton()
        if not state:
            return OpenFile(reader, checkpoint, None, reader.verify({}))
        if not isinstance(checkpoint, dict):
            hint = "" if raw else " Use load_raw() for a file of one state dict."
            raise InvalidCheckpointError(
                f"{path}: holds a {type(checkpoint).__name__}, not a dict.{hint}"
            )
        views = views or steps.StateViews(self, state)
        plan = plan_restore(
            str(path),
            state,
            {RAW_KEY: checkpoint} if raw else checkpoint,
            strict,
            target_of=views.target,
            group_sizes=views.group_sizes,
        )
        accepted = reader.verify({id(b.source): b.target for b in plan.bindings})
        return OpenFile(reader, checkpoint, plan, accepted)

    def _restore_file(self, opened: OpenFile) -> tuple[Any, LoadReport | None]:
        """Restore what ``_open_file`` checked (every rank passed it) and close the reader.

        With a plan, runs on every rank (``steps.restore``: agreed steps).
        """
        with opened.reader as reader:
            if opened.plan is None:
                reader.fill()
                return opened.checkpoint, None
            remainder = steps.restore(self, opened.plan, accepted=opened.accepted, fill=reader.fill)
        return remainder, opened.plan.report

    def _open_sharded_read(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
        *,
        views: steps.StateViews | None = None,
    ) -> OpenSharded | None:
        """If ``path`` is sharded: check it against ``state``, build the template, plan the read.

        Returns None for a single file. Where the IO reads sharded checkpoints the default way,
        this rank's read is planned and checked here too (``dcp_dir.plan_read``: CRC32 of every
        item it reads, non-tensor values read), so that the "open" agreement also stands for
        DCP's planning step and nothing the caller owns is written before every rank passed it.
        """
        opened = self._open_sharded(path, state, strict, storage_options, views=views)
        if opened is None:
            return None
        template, plan = opened
        io = self.checkpoint_io
        if type(io).load_sharded is not CheckpointIO.load_sharded:
            return OpenSharded(template, plan, None)  # the IO's own read, a collective
        location, options = io.locate(path, storage_options), io.options(storage_options)
        planned = plan_read(template, location, options, weights_only is not False)
        return OpenSharded(template, plan, planned)

    def _open_sharded(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        storage_options: StorageOptions | None,
        *,
        views: steps.StateViews | None = None,
    ) -> tuple[Checkpoint, RestorePlan | None] | None:
        """If ``path`` is sharded: ``_sharded_template``; None for a single file."""
        if not self.checkpoint_io.is_sharded(path, storage_options):
            return None
        return self._sharded_template(path, state, strict, storage_options, views=views)

    def _sharded_template(
        self,
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
        io = self.checkpoint_io
        metadata = io.read_sharded_metadata(path, storage_options)
        available = top_level_keys(metadata)
        if not state:
            return skeleton(metadata, set(available)), None
        views = views or steps.StateViews(self, state)
        present = {k: obj for k, obj in state.items() if k in available}
        stateful = {k: obj for k, obj in present.items() if is_stateful(obj)}
        template = collect(stateful, {}, views.sharded)
        saved = _saved_entries(metadata, available, template, state)
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
            template[key] = {name: template[key][name] for name in entry if name in template[key]}
        template.update(skeleton(metadata, set(available) - set(stateful)))
        plan.state = state
        plan.report = _with_missing(plan.report, state, available)
        return template, plan

    def _load_sharded(
        self,
        path: StrPath,
        opened: OpenSharded,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
    ) -> tuple[Any, LoadReport | None]:
        """Read and restore what ``_open_sharded`` checked on every rank, in agreed steps.

        The read goes in two parts (``steps.restore``): first what the user objects, plain
        values and remainder need, restored and agreed on; then the modules' and optimizers'
        tensors, which it writes into their own storage where the hooks' views share it. With
        a read planned at open, each part reads this rank's items (no other collective);
        otherwise each part is one of the IO's collective DCP passes (its errors reach every
        rank).
        """
        template, plan, planned = opened.template, opened.plan, opened.planned
        if plan is None:
            if planned is None:
                self.checkpoint_io.load_sharded(
                    template, path, weights_only=weights_only, storage_options=storage_options
                )
            self.run_on_all_ranks("restore", planned.read if planned is not None else _nothing)
            return template, None
        targets = steps.target_keys(plan, template)
        rest = [key for key in template if key not in targets]

        def read_part(keys: list[str]) -> None:
            if planned is not None:
                planned.read(keys)
                return
            part = {key: template[key] for key in keys}
            self.checkpoint_io.load_sharded(
                part, path, weights_only=weights_only, storage_options=storage_options
            )
            template.update(part)  # values the pass put in place of their placeholders
            plan.checkpoint.update({key: part[key] for key in keys if key in plan.checkpoint})

        for key in plan.checkpoint:
            plan.checkpoint[key] = template[key]
        plan.module_dicts.update({k: template[k] for k in plan.module_dicts})
        try:
            remainder = steps.restore(
                self, plan, read=lambda: read_part(rest), read_targets=lambda: read_part(targets)
            )
        finally:
            if planned is not None:  # a step failed before the last part: let go of the pieces
                planned.close()
        remainder.update({k: template[k] for k in plan.report.remainder_keys})
        return remainder, plan.report

    @final
    def load_raw(
        self,
        path: StrPath,
        obj: nn.Module | torch.optim.Optimizer,
        strict: bool = True,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> LoadReport:
        """Load a plain state-dict file (``torch.save(model.state_dict())``) into ``obj``."""
        path = self.broadcast_object(path)
        return self._load_raw(path, obj, strict, weights_only, storage_options)

    def _load_raw(
        self,
        path: StrPath,
        obj: nn.Module | torch.optim.Optimizer,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
    ) -> LoadReport:
        state: State = {RAW_KEY: obj}
        _, report = self._load_file(path, state, strict, weights_only, storage_options, raw=True)
        return cast("LoadReport", report)

    def wait(self) -> None:
        """Block until every save returned so far is durable (async IO); raise its failure.

        Also waits for this process's background removals of replaced sharded versions.
        """
        self.checkpoint_io.wait()
        dcp_versions.wait_for_removals()

    def teardown(self) -> None:
        """Release the IO plugin's resources; remove spare sharded versions, finish removals."""
        try:
            self.checkpoint_io.teardown()
        finally:
            dcp_versions.at_exit()


def _nothing() -> None:
    """A step with nothing to do on this rank (the others still agree on it)."""


def _saved_entries(
    metadata: Any,
    available: dict[str, list[str]],
    template: Checkpoint,
    state: State,
) -> Checkpoint:
    """Describe each saved module entry as ``{name: meta tensor of the saved shape}``.

    Module entries are compared by name and shape before any data is read; the other entries
    pass through from the template (DCP and their own setters check their structure).
    """
    saved: Checkpoint = {}
    for key, value in template.items():
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
