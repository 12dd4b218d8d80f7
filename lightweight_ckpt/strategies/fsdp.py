"""``FSDPStrategy``: FSDP1 and FSDP2 models, sharded or full checkpoints, through DCP.

State dicts come from ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``get_optimizer_state_dict``), which handle ``FullyShardedDataParallel`` (FSDP1) and
``fully_shard`` (FSDP2, DTensor) alike, so the module kind is detected, never configured.

- ``state_dict_type="sharded"``: every rank writes its piece of one directory in the DCP format
  (``formats.dcp_dir``: fresh version folder, a CRC32 record per piece, ``.metadata`` committed
  last by rank 0). It loads at any world size (DCP reshards) and into plain modules in one
  process. With ``AsyncCheckpointIO`` the agreed ``stage`` step snapshots each rank's piece to
  host memory and the piece is written in the background (``io.async_io``).
- ``state_dict_type="full"``: parameters are gathered to rank 0 on the CPU and rank 0 writes one
  ``torch.load``-compatible file, like ``DDPStrategy``.

Loading a single file (full, DDP or a plain ``torch.save`` state dict) into sharded modules
scatters the full tensors through ``set_model_state_dict``; a remote one is downloaded once, on
rank 0, and broadcast (``ddp.read_once``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel

from lightweight_ckpt import collectives
from lightweight_ckpt.compat import DTensor
from lightweight_ckpt.errors import StateMismatchError
from lightweight_ckpt.formats.dcp_dir import new_version
from lightweight_ckpt.strategies import ddp
from lightweight_ckpt.strategies.base import Strategy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lightweight_ckpt.io import CheckpointIO, CheckpointReader
    from lightweight_ckpt.types import Checkpoint, StateDict, StorageOptions, StrPath

StateDictType = Literal["sharded", "full"]


def _holds_shards(state_dict: StateDict) -> bool:
    """True if a state dict holds sharded tensors (DTensor / ShardedTensor) anywhere."""
    stack: list[object] = [state_dict]
    while stack:
        value = stack.pop()
        if isinstance(value, DTensor) or type(value).__name__ == "ShardedTensor":
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
    return False


def _is_fsdp1(module: nn.Module) -> bool:
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _keyed_by_index(state_dict: StateDict) -> bool:
    groups = state_dict.get("param_groups", [])
    return any(isinstance(p, int) for g in groups for p in g.get("params", ()))


def _index_keys_to_names(state_dict: StateDict, named_groups: list[dict[str, Any]]) -> StateDict:
    """Rename ``torch.optim`` state keyed by parameter index to DCP's parameter names.

    Position ``i`` of the saved groups is the parameter at position ``i`` of this optimizer's
    groups: true when both optimizers were built over the model's parameters in the same order.
    """
    saved = [p for g in state_dict["param_groups"] for p in g["params"]]
    names = [n for g in named_groups for n in g["params"]]
    if len(saved) != len(names):
        raise StateMismatchError(
            f"the checkpoint's optimizer updates {len(saved)} parameters, this one {len(names)}"
        )
    rename = dict(zip(saved, names, strict=True))
    groups, start = [], 0
    for group in state_dict["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": names[start : start + count]})
        start += count
    state = {rename[index]: value for index, value in state_dict["state"].items()}
    return {**state_dict, "state": state, "param_groups": groups}


class FSDPStrategy(Strategy):
    """Checkpoints of ``FullyShardedDataParallel`` / ``fully_shard`` models.

    Its state-dict hooks are collectives (FSDP1's getters and setters, full state dicts), so a
    load computes every view of the state up front, on every rank in the same order.

    Args:
        checkpoint_io: the IO plugin for every read and write (default ``TorchCheckpointIO``).
        state_dict_type: ``"sharded"`` (a DCP directory, one piece per rank) or ``"full"``
            (one file written by rank 0).
    """

    collective_hooks = True
    targets_are_sharded_views = True

    def __init__(
        self, checkpoint_io: CheckpointIO | None = None, state_dict_type: StateDictType = "sharded"
    ) -> None:
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(
                f"state_dict_type must be 'sharded' or 'full', not {state_dict_type!r}"
            )
        super().__init__(checkpoint_io)
        self.state_dict_type: StateDictType = state_dict_type

    def _options(self, module: nn.Module, full: bool, strict: bool = True) -> StateDictOptions:
        # Full state dicts are gathered tensor by tensor to rank 0's CPU only (cpu_offload),
        # so no other rank holds a full copy. FSDP1 on CPU-only parameters cannot do that (its
        # rank-0-only unshard fails inside torch), so there every rank gathers the full state.
        fsdp1_on_cpu = _is_fsdp1(module) and all(
            p.device.type == "cpu" for p in module.parameters()
        )
        return StateDictOptions(
            full_state_dict=full, cpu_offload=full and not fsdp1_on_cpu, strict=strict
        )

    def module_state_dict(self, module: nn.Module) -> StateDict:
        """Return the sharded (or, for ``"full"``, gathered-to-rank-0) model state dict."""
        options = self._options(module, full=self.state_dict_type == "full")
        return get_model_state_dict(module, options=options)

    def optimizer_state_dict(
        self, module: nn.Module | None, optimizer: torch.optim.Optimizer
    ) -> StateDict:
        """Return the optimizer state keyed by parameter names (sharded or full)."""
        if module is None:
            raise ValueError(
                "an optimizer in the state updates parameters of no module in the state; "
                "FSDP checkpoints need the model beside its optimizer"
            )
        options = self._options(module, full=self.state_dict_type == "full")
        return get_optimizer_state_dict(module, optimizer, options=options)

    def _named_groups(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> list[dict[str, Any]]:
        sd = get_optimizer_state_dict(module, optimizer, options=self._options(module, full=False))
        return cast("list[dict[str, Any]]", sd["param_groups"])

    def optimizer_group_sizes(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None
    ) -> list[int]:
        """Count original parameters per group (FSDP1 flattens them inside the optimizer)."""
        if module is None:
            return super().optimizer_group_sizes(optimizer, module)
        return [len(group["params"]) for group in self._named_groups(module, optimizer)]

    def module_target(self, module: nn.Module) -> StateDict:
        """Compare loads against the module's sharded state dict (global shapes)."""
        return get_model_state_dict(module, options=self._options(module, full=False))

    def load_module_state_dict(self, module: nn.Module, state_dict: StateDict) -> None:
        """Scatter full tensors or place shards through DCP's setter."""
        full = not _holds_shards(state_dict)
        set_model_state_dict(
            module, state_dict, options=self._options(module, full=full, strict=False)
        )

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state_dict: StateDict, module: nn.Module | None
    ) -> None:
        """Restore optimizer state keyed by parameter names through DCP's setter.

        State keyed by parameter index (a DDP or single-device file) is renamed first.
        """
        if module is None:
            raise ValueError("an FSDP optimizer can only be restored beside its model")
        if _keyed_by_index(state_dict):
            state_dict = _index_keys_to_names(state_dict, self._named_groups(module, optimizer))
        full = not _holds_shards(state_dict)
        set_optimizer_state_dict(
            module, optimizer, state_dict, options=self._options(module, full=full, strict=False)
        )

    def read_shared(
        self, path: StrPath, weights_only: bool | None, storage_options: StorageOptions | None
    ) -> CheckpointReader | None:
        """A remote single file (full, DDP or plain): read once on rank 0 and broadcast.

        As ``DDPStrategy`` does, and within the same ``READ_ONCE_MAX_BYTES``: every rank needs
        the whole file's tensors to scatter its shards from, so the broadcast copy costs no
        more memory than each rank downloading the file, and the store serves it once.
        """
        return ddp.read_once(self, path, weights_only, storage_options, ddp.READ_ONCE_MAX_BYTES)

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Sharded: every rank writes its piece, rank 0 commits. Full: rank 0 writes a file."""
        if self.state_dict_type == "full":
            if self.is_global_zero:
                super().write(checkpoint, path, storage_options)
            return
        io = self.checkpoint_io
        version = collectives.broadcast_object(new_version())

        def prepare() -> Checkpoint:  # everything that may fail on one rank, agreed on first
            io.prepare_sharded(path, version, storage_options)
            return io.stage(checkpoint)

        staged = collectives.run_on_all_ranks("prepare sharded save", prepare)
        # returns on every rank once rank 0 has committed (DCP broadcasts the commit's outcome)
        io.save_sharded(staged, path, version, storage_options)
        if self.is_global_zero:  # replaced versions go in the background (formats.dcp_versions)
            io.finish_sharded(path, version, storage_options)
