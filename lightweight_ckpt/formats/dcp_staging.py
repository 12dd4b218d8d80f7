"""Background sharded saves: host snapshots of sharded tensors, and their own process group.

``AsyncCheckpointIO`` copies a sharded checkpoint into reused host buffers on the caller's thread
and has DCP write it from a worker thread. Two things make that safe:

- ``split_sharded``: a ``DTensor`` (FSDP2) or ``ShardedTensor`` (FSDP1) is copied as its local
  parts and rebuilt around the copies, so the snapshot holds this rank's shard only.
- ``new_background_group`` / ``collectives_on``: the worker's DCP collectives run on a gloo group
  of their own, created once by every rank; ``dcp_dir.write`` uses the group set for its thread.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed._shard.sharded_tensor.shard import Shard

from lightweight_ckpt.compat import DTensor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_thread = threading.local()


@contextlib.contextmanager
def collectives_on(group: Any) -> Iterator[None]:
    """Run this thread's sharded saves' collectives on ``group`` (a background thread's own).

    A thread other than the training loop's must never use the training loop's group: two
    threads issuing collectives on one group interleave them differently on every rank.
    """
    previous = getattr(_thread, "group", None)
    _thread.group = group
    try:
        yield
    finally:
        _thread.group = previous


def new_background_group() -> Any:
    """Create a gloo group for background sharded saves (a collective; None without ranks).

    It inherits the default group's timeout, so a dead peer fails a background save as it
    would a synchronous one.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    default = torch.distributed.distributed_c10d._get_default_group()
    try:
        timeout = default._get_backend(torch.device("cpu")).options._timeout
    except (RuntimeError, AttributeError):  # no CPU backend (NCCL only): torch's default
        timeout = None
    return torch.distributed.new_group(backend="gloo", timeout=timeout)


def split_sharded(
    tensor: torch.Tensor,
) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor]] | None:
    """Return a sharded tensor's local parts and how to rebuild it around copies of them.

    None for a plain tensor. A ``DTensor`` (FSDP2) is rebuilt with its own spec around the
    copied local tensor (``DTensor.from_local`` would move the copy back to the mesh's device);
    a ``ShardedTensor`` (FSDP1) on the CPU around its copied local shards. One on an
    accelerator is copied to the CPU here by ``ShardedTensor.cpu`` (no buffer reuse).
    """
    if isinstance(tensor, DTensor):
        spec = tensor._spec

        def dtensor(parts: list[torch.Tensor]) -> torch.Tensor:
            return cast("torch.Tensor", DTensor(parts[0], spec, requires_grad=False))  # type: ignore[no-untyped-call]

        return [tensor.to_local().detach()], dtensor
    if isinstance(tensor, ShardedTensor):
        shards, metadata = tensor.local_shards(), tensor.metadata()
        if any(shard.tensor.device.type != "cpu" for shard in shards):
            on_cpu = tensor.cpu()
            return [], lambda _: on_cpu

        def sharded(parts: list[torch.Tensor]) -> torch.Tensor:
            local = [Shard(part, shard.metadata) for part, shard in zip(parts, shards, strict=True)]
            return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata)

        return [shard.tensor.detach() for shard in shards], sharded
    return None


def release_background_group(group: Any) -> None:
    """Destroy a group from ``new_background_group`` (None, or a torn-down default: no-op)."""
    if group is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group(group)


def group_of_this_thread() -> Any:
    """Return the group set by ``collectives_on`` for this thread (None: the default group)."""
    return getattr(_thread, "group", None)
