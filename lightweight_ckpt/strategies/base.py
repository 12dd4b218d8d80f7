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

Load, single file (``file_load``), in two steps agreed by every rank: (1) open, check and verify
on every rank, changing nothing; (2) only when every rank passed (1), restore in agreed steps
(``steps.restore``). A damaged file or a mismatched state on one rank therefore changes no
rank's state. Where the hooks are collectives (FSDP), their views of the state are computed
before (1), on every rank in the same order (``steps.StateViews``), so a rank failing its I/O
never skips them.

Load, sharded directory (``sharded_load``), in the same agreed steps: (1) check the metadata
against the state, build the template and plan this rank's read; (2) read and restore, user
objects and values before any module's or optimizer's tensor is written.

Ranks coordinate through two hooks, ``run_on_all_ranks`` and ``broadcast_object``
(``torch.distributed`` through ``collectives`` by default; XLA replicas use their runtime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast, final

import torch
from torch import nn

from lightweight_ckpt import collectives
from lightweight_ckpt.formats import dcp_versions
from lightweight_ckpt.io import CheckpointIO, CheckpointReader, TorchCheckpointIO
from lightweight_ckpt.state import (
    RAW_KEY,
    LoadReport,
    RestorePlan,
    owner_module,
    restore_module,
    restore_optimizer,
    to_state_dict,
    unwrap_module,
)
from lightweight_ckpt.strategies import file_load, sharded_load, steps

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
                on_abort=sharded_load.close,
            )
            if opened is not None:
                return sharded_load.load(self, path, opened, weights_only, storage_options)
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
            lambda: file_load.open_file(
                self,
                path,
                state,
                strict=strict,
                weights_only=weights_only,
                storage_options=storage_options,
                raw=raw,
                shared=shared,
                views=views,
            ),
            on_abort=file_load.OpenFile.close,
        )
        if opened.plan is None:
            return self.run_on_all_ranks("restore", lambda: file_load.restore_file(self, opened))
        return file_load.restore_file(self, opened)  # in agreed steps

    def _open_sharded_read(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
        *,
        views: steps.StateViews | None = None,
    ) -> sharded_load.OpenSharded | None:
        """If ``path`` is sharded: check it against ``state``, build the template, plan the read.

        Returns None for a single file. Where the IO reads sharded checkpoints the default way,
        this rank's read is planned and checked here too (``sharded_load.plan``), so that the
        "open" agreement also stands for DCP's planning step.
        """
        opened = self._open_sharded(path, state, strict, storage_options, views=views)
        if opened is None:
            return None
        template, plan = opened
        return sharded_load.plan(
            self, path, template, plan, weights_only=weights_only, storage_options=storage_options
        )

    def _open_sharded(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        storage_options: StorageOptions | None,
        *,
        views: steps.StateViews | None = None,
    ) -> tuple[Checkpoint, RestorePlan | None] | None:
        """If ``path`` is sharded: ``sharded_load.template``; None for a single file."""
        if not self.checkpoint_io.is_sharded(path, storage_options):
            return None
        return sharded_load.template(self, path, state, strict, storage_options, views=views)

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
