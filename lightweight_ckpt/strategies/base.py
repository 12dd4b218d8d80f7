"""``Strategy``: the save/load/load_raw pipeline every strategy shares, and its hooks.

The pipeline is written once, here. A strategy changes *who* writes and reads, *which* layout
and *how* state dicts are produced by overriding small hooks, never the pipeline:

- ``module_state_dict(module)`` / ``optimizer_state_dict(optimizer)``: the state dicts to save
  (FSDP returns sharded ones through DCP's state-dict API);
- ``write(checkpoint, path, storage_options)``: write the checkpoint (single device: this
  process; DDP: rank 0; sharded: every rank its piece);
- ``map_location``: where loaded tensors go before ``load_state_dict`` copies them.

Save: collect (convert + filter) → ``write`` inside ``run_on_all_ranks`` (a failure on any rank
raises on all). Load: open a two-phase reader → ``plan_restore`` (checks everything, changes
nothing) → ``materialize`` (verify, then read into targets) → ``apply_restore``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

import torch
from torch import nn

from lightweight_ckpt import collectives
from lightweight_ckpt.errors import InvalidCheckpointError
from lightweight_ckpt.io import CheckpointIO, TorchCheckpointIO
from lightweight_ckpt.state import (
    RAW_KEY,
    LoadReport,
    apply_restore,
    collect,
    plan_restore,
    to_state_dict,
    unwrap_module,
)

if TYPE_CHECKING:
    from lightweight_ckpt.types import (
        Checkpoint,
        FilterMap,
        MapLocation,
        State,
        StateDict,
        StorageOptions,
        StrPath,
    )


class Strategy:
    """Decide who writes and reads a checkpoint, in which layout; run the shared pipeline.

    Args:
        checkpoint_io: the IO plugin for every read and write (default ``TorchCheckpointIO``).
    """

    map_location: MapLocation = "cpu"

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

    def barrier(self) -> None:
        """Wait for every rank."""
        collectives.barrier()

    # -- hooks -------------------------------------------------------------------------------

    def module_state_dict(self, module: nn.Module) -> StateDict:
        """Return the state dict to save for ``module`` (wrappers removed)."""
        return unwrap_module(module).state_dict()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> StateDict:
        """Return the state dict to save for ``optimizer``."""
        return optimizer.state_dict()

    def check_state(self, state: State) -> None:
        """Raise if this strategy cannot handle ``state`` (called before any collective)."""

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Write the collected checkpoint (this process writes; subclasses pick the writers)."""
        if storage_options is None:
            self.checkpoint_io.save_checkpoint(checkpoint, path)
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    # -- pipeline ----------------------------------------------------------------------------

    def convert(self, obj: object) -> Any:
        """Turn one state value into what is saved, through the state-dict hooks."""
        if isinstance(obj, nn.Module):
            return self.module_state_dict(obj)
        if isinstance(obj, torch.optim.Optimizer):
            return self.optimizer_state_dict(obj)
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
        path = collectives.broadcast_object(path)  # rank 0's path wins, as in Lightning
        checkpoint = collect(state, filter or {}, self.convert)
        collectives.run_on_all_ranks("save", lambda: self.write(checkpoint, path, storage_options))

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
        path = collectives.broadcast_object(path)
        return collectives.run_on_all_ranks(
            "load", lambda: self._load(path, state, strict, weights_only, storage_options)
        )

    def _load(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
    ) -> tuple[Any, LoadReport | None]:
        reader = self.checkpoint_io.open_checkpoint(
            path,
            map_location=self.map_location,
            weights_only=weights_only,
            storage_options=storage_options,
        )
        with reader:
            checkpoint = reader.skeleton()
            if not state:
                reader.materialize({})
                return checkpoint, None
            if not isinstance(checkpoint, dict):
                raise InvalidCheckpointError(
                    f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict. "
                    "Use load_raw() for a file of one state dict."
                )
            plan = plan_restore(str(path), state, checkpoint, strict)
            accepted = reader.materialize({id(b.source): b.target for b in plan.bindings})
        return apply_restore(plan, accepted), plan.report

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
        path = collectives.broadcast_object(path)
        return collectives.run_on_all_ranks(
            "load_raw", lambda: self._load_raw(path, obj, strict, weights_only, storage_options)
        )

    def _load_raw(
        self,
        path: StrPath,
        obj: nn.Module | torch.optim.Optimizer,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
    ) -> LoadReport:
        reader = self.checkpoint_io.open_checkpoint(
            path,
            map_location=self.map_location,
            weights_only=weights_only,
            storage_options=storage_options,
        )
        with reader:
            state_dict = reader.skeleton()
            if not isinstance(state_dict, dict):
                raise InvalidCheckpointError(
                    f"{path}: holds a {type(state_dict).__name__}, not a state dict"
                )
            plan = plan_restore(str(path), {RAW_KEY: obj}, {RAW_KEY: state_dict}, strict)
            accepted = reader.materialize({id(b.source): b.target for b in plan.bindings})
        apply_restore(plan, accepted)
        return plan.report

    def teardown(self) -> None:
        """Release the IO plugin's resources."""
        self.checkpoint_io.teardown()
