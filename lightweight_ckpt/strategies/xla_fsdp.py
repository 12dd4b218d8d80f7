"""``XLAFSDPStrategy``: ``XlaFullyShardedDataParallel`` models, one shard file per replica.

- ``state_dict_type="sharded"``: every replica writes its file (its modules' sharded state
  dicts, its optimizer state, plain values, and torch_xla's shard metadata) into one directory,
  atomic as a whole (``formats.xla_shards``: fresh ``shards-<id>`` folder, marker published last
  by the master ordinal after every replica agreed its file is written). It loads at the same
  world size; ``python -m lightweight_ckpt consolidate`` turns it into one full file.
- ``state_dict_type="full"``: the shard files go to a hidden sibling folder; the master ordinal
  consolidates them (torch_xla's ``consolidate_sharded_state_dicts`` over the shard metadata)
  and writes one single-device file, then removes the folder. XLA FSDP optimizer state lives on
  flattened, padded shards and is left out of full files (logged at WARNING), as torch_xla's
  and Lightning's consolidation do.

A full file (consolidated, or saved from a plain model) loads into XLA FSDP modules: each
replica cuts its shard out of the full tensors with the module's shard metadata.

With ``AsyncCheckpointIO`` the shard files are still written before ``save`` returns: the marker
(or the consolidation) is agreed across replicas only once every shard is durable, and that
agreement runs on the caller. The async IO then only overlaps the single-file write of "full".
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from lightweight_ckpt.errors import InvalidCheckpointError, StateMismatchError
from lightweight_ckpt.formats import xla_shards
from lightweight_ckpt.io.xla_io import to_cpu
from lightweight_ckpt.state import restore_module, unwrap_module
from lightweight_ckpt.strategies.base import Strategy
from lightweight_ckpt.strategies.xla import XLAStrategy, broadcast

if TYPE_CHECKING:
    from lightweight_ckpt.io import CheckpointIO
    from lightweight_ckpt.state import LoadReport, RestorePlan
    from lightweight_ckpt.strategies.steps import StateViews
    from lightweight_ckpt.strategies.xla import Coordinator
    from lightweight_ckpt.types import Checkpoint, State, StateDict, StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")
StateDictType = Literal["sharded", "full"]


def is_xla_fsdp_module(obj: object) -> bool:
    """Return True for a torch_xla ``XlaFullyShardedDataParallel`` (no torch_xla import)."""
    return isinstance(obj, nn.Module) and any(
        cls.__name__ == "XlaFullyShardedDataParallel" and cls.__module__.startswith("torch_xla")
        for cls in type(obj).__mro__
    )


def find_xla_fsdp(state: State) -> list[str]:
    """Return the keys of ``state`` holding XLA FSDP modules, sorted."""
    return sorted(k for k, v in state.items() if is_xla_fsdp_module(unwrap_module_safe(v)))


def unwrap_module_safe(obj: object) -> object:
    """Unwrap a module (DDP / compile); other values pass through."""
    return unwrap_module(obj) if isinstance(obj, nn.Module) else obj


def shard_metadata(module: nn.Module) -> dict[str, Any]:
    """Return ``module.get_shard_metadata()`` of an XLA FSDP module."""
    return cast("dict[str, Any]", cast("Any", module).get_shard_metadata())


def _join(path: str, relative: str) -> str:
    return f"{path.rstrip('/')}/{relative}"


class XLAFSDPStrategy(XLAStrategy):
    """Checkpoints of ``XlaFullyShardedDataParallel`` models on XLA replicas.

    Args:
        checkpoint_io: the IO plugin for every read and write (default ``XLACheckpointIO``).
        state_dict_type: ``"sharded"`` (a directory, one file per replica) or ``"full"`` (one
            consolidated file written by the master ordinal).
        coordinator: how replicas exchange outcomes (default: torch_xla's runtime).
    """

    def __init__(
        self,
        checkpoint_io: CheckpointIO | None = None,
        state_dict_type: StateDictType = "sharded",
        coordinator: Coordinator | None = None,
    ) -> None:
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(
                f"state_dict_type must be 'sharded' or 'full', not {state_dict_type!r}"
            )
        super().__init__(checkpoint_io, coordinator)
        self.state_dict_type: StateDictType = state_dict_type
        self._full_load = False
        self._shard_metadata: dict[str, Any] = {"modules": {}, "optimizers": []}

    def check_state(self, state: State) -> None:
        """Refuse the reserved key and modules holding XLA FSDP inside plain modules.

        Records the shard metadata of the state's XLA FSDP modules for the save.
        """
        if xla_shards.SHARD_METADATA_KEY in state:
            raise ValueError(
                f"the state key {xla_shards.SHARD_METADATA_KEY!r} is reserved for XLA-FSDP "
                "shard metadata; rename that entry"
            )
        modules = {k: unwrap_module(v) for k, v in state.items() if isinstance(v, nn.Module)}
        nested = [
            k
            for k, m in modules.items()
            if not is_xla_fsdp_module(m) and any(map(is_xla_fsdp_module, m.modules()))
        ]
        if nested:
            raise ValueError(
                f"state entries {sorted(nested)} hold XlaFullyShardedDataParallel inside a plain "
                "module; put the outermost XlaFullyShardedDataParallel in the state"
            )
        sharded = {k: m for k, m in modules.items() if is_xla_fsdp_module(m)}
        owned = {id(p) for m in sharded.values() for p in m.parameters()}
        self._shard_metadata = {
            "modules": {k: shard_metadata(m) for k, m in sharded.items()},
            "optimizers": sorted(
                k
                for k, v in state.items()
                if isinstance(v, torch.optim.Optimizer)
                and any(id(p) in owned for g in v.param_groups for p in g["params"])
            ),
        }

    # -- hooks: full files into sharded modules ----------------------------------------------

    def module_target(self, module: nn.Module) -> StateDict:
        """Sharded loads compare against the shards; full loads against the full shapes."""
        inner = unwrap_module(module)
        if self._full_load and is_xla_fsdp_module(inner):
            return xla_shards.full_shapes(inner.state_dict(), shard_metadata(inner))
        return super().module_target(module)

    def load_module_state_dict(self, module: nn.Module, state_dict: StateDict) -> None:
        """Cut this replica's shards out of a full state dict, or load shards as they are."""
        inner = unwrap_module(module)
        if self._full_load and is_xla_fsdp_module(inner):
            sharded = xla_shards.shard_full(state_dict, inner.state_dict(), shard_metadata(inner))
            device = next(iter(inner.state_dict().values())).device
            inner.load_state_dict({k: v.to(device) for k, v in sharded.items()}, strict=False)
            return
        restore_module(module, state_dict)

    def optimizer_group_sizes(
        self, optimizer: torch.optim.Optimizer, module: nn.Module | None
    ) -> list[int]:
        """Refuse a full file's optimizer state for an XLA FSDP optimizer (checked first)."""
        if self._full_load and module is not None and is_xla_fsdp_module(unwrap_module(module)):
            raise StateMismatchError(
                "a full (unsharded) file's optimizer state cannot be loaded into an optimizer "
                "over XLA FSDP shards; load the model alone (strict=False, or leave the "
                "optimizer out of the state) or load a sharded checkpoint"
            )
        return super().optimizer_group_sizes(optimizer, module)

    # -- save --------------------------------------------------------------------------------

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Every replica writes its shard file; full: the master consolidates them."""
        path = self.agreed_path(path)
        if self.state_dict_type == "sharded":
            self._write_shards(checkpoint, path, path, storage_options, commit=True)
            return
        parent, name = posixpath.split(path.rstrip("/"))
        hidden = broadcast(self.coordinator, "tmp", f".{name}.xla-shards-{uuid.uuid4().hex[:12]}")
        temp = posixpath.join(parent, hidden) if parent else hidden
        try:
            files = self._write_shards(checkpoint, temp, path, storage_options, commit=False)
            self.agree("consolidate", lambda: self._consolidate(temp, files, path, storage_options))
        finally:
            if self.is_global_zero:
                self.checkpoint_io.remove_checkpoint(temp)

    def _write_shards(
        self,
        checkpoint: Checkpoint,
        directory: str,
        path: str,
        storage_options: StorageOptions | None,
        *,
        commit: bool,
    ) -> list[str]:
        """Write this replica's file into ``directory``; with ``commit``, publish the marker."""
        io = self.checkpoint_io
        location = io.locate(directory, storage_options)
        version = broadcast(self.coordinator, "version", xla_shards.new_version())
        rank, world_size = self.global_rank, self.world_size
        piece = {**checkpoint, xla_shards.SHARD_METADATA_KEY: self._shard_metadata}

        def prepare() -> Checkpoint:  # everything that may fail on one replica, agreed first
            xla_shards.prepare(location, version)
            return to_cpu(piece)  # each replica writes its own shard: all sync, all transfer

        staged = self.agree("prepare shards", prepare)
        mine = _join(directory, xla_shards.shard_file(version, rank, world_size))

        def write_shard() -> None:
            Strategy.write(self, staged, mine, storage_options)
            # An async IO only queued the write: the marker (or the consolidation) must not
            # name a shard before it is durable on every replica, so wait for it here.
            io.wait()

        self.agree("write shard", write_shard)
        if commit:

            def publish() -> None:
                if self.is_global_zero:
                    xla_shards.commit(location, version, world_size)

            self.agree("commit", publish)
            if self.is_global_zero:  # every replica saw the commit; the old folders may go
                xla_shards.remove_stale_versions(location, keep=version)
        names = [xla_shards.shard_file(version, r, world_size) for r in range(world_size)]
        return [_join(directory, name) for name in names]

    def _consolidate(
        self, temp: str, files: list[str], path: str, storage_options: StorageOptions | None
    ) -> None:
        if not self.is_global_zero:
            return
        shards = [self._read(url, storage_options) for url in files]
        full, dropped = xla_shards.consolidate(temp, shards)
        if dropped:
            log.warning(
                "%s: XLA FSDP optimizer state %s is not consolidated into full files (it lives "
                "on flattened shards); use state_dict_type='sharded' to keep it",
                path,
                dropped,
            )
        Strategy.write(self, full, path, storage_options)

    def _read(self, url: str, storage_options: StorageOptions | None) -> Checkpoint:
        reader = self.checkpoint_io.open_checkpoint(
            url, map_location="cpu", weights_only=True, storage_options=storage_options
        )
        with reader:
            checkpoint = reader.skeleton()
            reader.verify({})
            reader.fill()
        if not isinstance(checkpoint, dict):
            raise InvalidCheckpointError(f"{url}: not an XLA-FSDP shard file")
        return checkpoint

    # -- load --------------------------------------------------------------------------------

    def _open_sharded(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        storage_options: StorageOptions | None,
        *,
        views: StateViews | None = None,
    ) -> tuple[Checkpoint, RestorePlan | None] | None:
        location = self.checkpoint_io.locate(self.agreed_path(path), storage_options)
        if self.agree("detect", lambda: xla_shards.is_xla_sharded(location), same=True):
            return None  # _load_file reads this replica's shard file
        return super()._open_sharded(path, state, strict, storage_options, views=views)

    def _load_file(
        self,
        path: StrPath,
        state: State | None,
        strict: bool,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
        *,
        raw: bool = False,
        views: StateViews | None = None,
    ) -> tuple[Any, LoadReport | None]:
        path = self.agreed_path(path)
        location = self.checkpoint_io.locate(path, storage_options)
        if not self.agree("detect", lambda: xla_shards.is_xla_sharded(location), same=True):
            self._full_load = True
            try:
                return super()._load_file(
                    path, state, strict, weights_only, storage_options, raw=raw, views=views
                )
            finally:
                self._full_load = False

        def locate_shard() -> str:
            if raw:
                raise InvalidCheckpointError(
                    f"{path}: an XLA-FSDP sharded checkpoint, not a plain state-dict file; "
                    "load it with load(), or consolidate it first"
                )
            marker = xla_shards.read_marker(location)
            if marker["world_size"] != self.world_size:
                raise StateMismatchError(
                    f"{path}: saved by {marker['world_size']} XLA FSDP replicas, loading on "
                    f"{self.world_size}. Load at the same world size, or consolidate it "
                    "(python -m lightweight_ckpt consolidate) and load the full file."
                )
            return _join(path, marker["files"][self.global_rank])

        shard = self.agree("locate shard", locate_shard)
        # this replica's shard file, through the shared two-step load (verify on every
        # replica, then restore), so a damaged shard anywhere changes no replica's state
        loaded, report = Strategy._load_file(
            self, shard, state, strict, weights_only, storage_options, views=views
        )
        if isinstance(loaded, dict):
            loaded.pop(xla_shards.SHARD_METADATA_KEY, None)
        return loaded, report
