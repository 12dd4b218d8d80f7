"""``XLACheckpointIO``: ``TorchCheckpointIO`` whose ``stage()`` moves XLA tensors to the CPU.

``torch.save`` of lazy XLA tensors hangs or writes garbage (each tensor would be synced on its
own, inside the serializer). Staging does what ``xm.save`` does, once for the whole checkpoint:
every XLA tensor's pending graph is executed in one sync, then all of them are transferred to
the CPU in one batched call. No per-tensor graph executions. What is written is then the plain
single-file format, which ``torch.load(weights_only=True)`` reads without torch_xla.

``sync_xla_tensors`` is the first half alone: replicas that do not write run it, so that a
pending graph holding a cross-replica collective runs on every replica, never on one.

torch_xla is imported only when the checkpoint holds XLA tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightweight_ckpt.formats.xla_shards import import_torch_xla
from lightweight_ckpt.io.torch_io import TorchCheckpointIO

if TYPE_CHECKING:
    from lightweight_ckpt.types import Checkpoint


def is_xla_tensor(value: object) -> bool:
    """Return True for a tensor on an XLA device (no torch_xla import needed)."""
    return isinstance(value, torch.Tensor) and value.device.type == "xla"


def _xla_tensors(tree: Any, found: dict[int, torch.Tensor]) -> None:
    if is_xla_tensor(tree):
        found.setdefault(id(tree), tree)
    elif isinstance(tree, dict):
        for value in tree.values():
            _xla_tensors(value, found)
    elif isinstance(tree, list | tuple):
        for value in tree:
            _xla_tensors(value, found)


def _replace(tree: Any, done: dict[int, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return done.get(id(tree), tree)
    if isinstance(tree, dict):
        return type(tree)((k, _replace(v, done)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(_replace(v, done) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_replace(v, done) for v in tree)
    return tree


def _sync(tensors: list[torch.Tensor]) -> None:
    xla = import_torch_xla()
    # the call xm.save makes: one graph execution for every pending tensor, then wait
    xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)


def sync_xla_tensors(checkpoint: Checkpoint) -> None:
    """Execute the pending graph of every XLA tensor in ``checkpoint`` (one sync)."""
    found: dict[int, torch.Tensor] = {}
    _xla_tensors(checkpoint, found)
    if found:
        _sync(list(found.values()))


def to_cpu(checkpoint: Checkpoint) -> Checkpoint:
    """Return ``checkpoint`` with every XLA tensor replaced by a CPU copy, synced once.

    A tensor that appears several times is transferred once and stays shared. Without XLA
    tensors the checkpoint is returned as is.
    """
    found: dict[int, torch.Tensor] = {}
    _xla_tensors(checkpoint, found)
    if not found:
        return checkpoint
    tensors = list(found.values())
    _sync(tensors)
    xla = import_torch_xla()
    cpu = xla._XLAC._xla_get_cpu_tensors(tensors)  # one batched device-to-host transfer
    done = dict(zip(found, cpu, strict=True))
    return _replace(checkpoint, done)  # type: ignore[no-any-return]


class XLACheckpointIO(TorchCheckpointIO):
    """Write XLA state as ``torch.load``-compatible files: stage moves it to the CPU first.

    Everything else (streaming atomic writes, CRC32-verified loads to the CPU) is
    ``TorchCheckpointIO``'s. Usable with any strategy; ``XLAStrategy`` uses it by default.

    Args:
        storage_options: default fsspec options for every path (endpoint, credentials, ...).
    """

    def stage(self, checkpoint: Checkpoint) -> Checkpoint:
        """Move every XLA tensor to the CPU, after one sync of the pending graph."""
        return to_cpu(checkpoint)
