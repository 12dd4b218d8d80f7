"""lightweight_ckpt: save and restore PyTorch training state, from a laptop to a cluster.

The Lightning Fabric checkpoint API (``Fabric.save`` / ``load`` / ``load_raw``) without the
framework: streaming, atomic and verified, on any fsspec filesystem. The pipeline, one layer per
module: ``fabric`` → ``strategies`` → ``io`` → ``formats`` → ``storage`` → fsspec.
"""

from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    MissingKeysError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from lightweight_ckpt.fabric import Fabric
from lightweight_ckpt.io import SaveHandle
from lightweight_ckpt.manager import CheckpointManager, ResumeResult
from lightweight_ckpt.state import EntryReport, LoadReport

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "EntryReport",
    "Fabric",
    "InvalidCheckpointError",
    "LoadReport",
    "MissingKeysError",
    "ResumeResult",
    "SaveHandle",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "__version__",
]
