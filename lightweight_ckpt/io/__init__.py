"""Checkpoint IO plugins: how one checkpoint's bytes are staged, encoded and committed.

``CheckpointIO`` is the interface (subclass it to take over every read and write);
``TorchCheckpointIO`` is the default; ``AsyncCheckpointIO(inner)`` writes in the background;
``SaveHandle`` is what ``Fabric.save`` returns: wait for that save, ask whether it is durable.
"""

from lightweight_ckpt.io.async_io import AsyncCheckpointIO
from lightweight_ckpt.io.base import CheckpointIO, CheckpointReader, LoadedReader, SaveHandle
from lightweight_ckpt.io.torch_io import TorchCheckpointIO
from lightweight_ckpt.io.xla_io import XLACheckpointIO

__all__ = [
    "AsyncCheckpointIO",
    "CheckpointIO",
    "CheckpointReader",
    "LoadedReader",
    "SaveHandle",
    "TorchCheckpointIO",
    "XLACheckpointIO",
]
