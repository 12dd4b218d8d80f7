"""``DDPStrategy``: data parallel over the user's process group; rank 0 writes one file.

Every rank calls ``save`` and ``load``. The checkpoint is the single-device file (a
``torch.load``-compatible zip), written by rank 0 only; ``save`` returns on every rank after the
ranks agreed that the write committed, so the file is complete wherever ``save`` has returned.
A failure on rank 0 raises on every rank. Every rank loads the same file: on local disk each rank
maps it (one copy in the page cache, shared) and reads straight into its own parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightweight_ckpt.state import find_sharded
from lightweight_ckpt.strategies.base import Strategy

if TYPE_CHECKING:
    from lightweight_ckpt.types import Checkpoint, State, StorageOptions, StrPath


class DDPStrategy(Strategy):
    """One file written by rank 0, restored on every rank (``DistributedDataParallel`` models)."""

    def check_state(self, state: State) -> None:
        """Refuse sharded modules: gathering them on every rank is FSDP's job, not DDP's."""
        sharded = find_sharded(state)
        if sharded:
            raise ValueError(
                f"state entries {sharded} hold sharded (FSDP) modules; DDPStrategy would gather "
                "every parameter on every rank. Use an FSDP strategy for them."
            )

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Write on rank 0 only."""
        if self.is_global_zero:
            super().write(checkpoint, path, storage_options)
