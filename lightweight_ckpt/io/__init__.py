"""Checkpoint IO plugins: how one checkpoint's bytes are staged, encoded and committed.

``CheckpointIO`` is the interface (subclass it to take over every read and write);
``TorchCheckpointIO`` is the default.
"""

from lightweight_ckpt.io.base import CheckpointIO, CheckpointReader, LoadedReader
from lightweight_ckpt.io.torch_io import TorchCheckpointIO

__all__ = ["CheckpointIO", "CheckpointReader", "LoadedReader", "TorchCheckpointIO"]
