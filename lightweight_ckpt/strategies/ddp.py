"""``DDPStrategy``: data parallel over the user's process group; rank 0 writes one file.

Every rank calls ``save`` and ``load``. The checkpoint is the single-device file (a
``torch.load``-compatible zip), written by rank 0 only; ``save`` returns on every rank after the
ranks agreed that the write committed, so the file is complete wherever ``save`` has returned.
A failure on rank 0 raises on every rank.

Loads, measured (``benchmarks/ddp_load.py``): on local disk every rank maps the file (one copy in
the page cache, shared) and reads straight into its own parameters, which beats reading once and
broadcasting. On any other filesystem (object stores) every rank reading would download the
file once per rank, so rank 0 downloads and verifies it once and broadcasts it
(``collectives.broadcast_tree``); then every rank checks and restores from that copy through the
same two agreed steps. That copy is the whole checkpoint in memory on each rank for the duration
of the load, so files over ``READ_ONCE_MAX_BYTES`` (8 GiB) are read by every rank instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightweight_ckpt import collectives
from lightweight_ckpt.io import LoadedReader
from lightweight_ckpt.state import find_sharded
from lightweight_ckpt.storage import call_with_retries
from lightweight_ckpt.strategies.base import Strategy

if TYPE_CHECKING:
    from lightweight_ckpt.io import CheckpointReader
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

    def read_shared(
        self, path: StrPath, weights_only: bool | None, storage_options: StorageOptions | None
    ) -> CheckpointReader | None:
        """A remote file: rank 0 reads and verifies it once and broadcasts it to every rank.

        Files over ``READ_ONCE_MAX_BYTES`` are read by every rank instead (their memory stays
        bounded; the copy each rank would hold is the whole checkpoint).
        """
        return read_once(self, path, weights_only, storage_options, READ_ONCE_MAX_BYTES)


def read_once(
    strategy: Strategy,
    path: StrPath,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
    max_bytes: int,
) -> CheckpointReader | None:
    """Read a remote file once on rank 0 and broadcast it; None where every rank reads it.

    None on local disk (every rank maps the file: faster), in a world of one, and for files
    over ``max_bytes`` (each rank would hold a whole copy). Runs on every rank.
    """
    io = strategy.checkpoint_io
    location = io.locate(path, storage_options)
    if strategy.world_size == 1 or location.is_local:
        return None

    def download() -> Any:
        if not strategy.is_global_zero:
            return None
        size = call_with_retries(location.url, "reading", lambda: location.fs.size(location.path))
        if size is not None and int(size) > max_bytes:
            return (False, None)  # too large to hold a copy on every rank
        with io.open_checkpoint(
            path,
            map_location=strategy.map_location,
            weights_only=weights_only,
            storage_options=storage_options,
        ) as reader:
            checkpoint = reader.skeleton()
            reader.verify({})
            reader.fill()
        return (True, checkpoint)

    shared, checkpoint = collectives.broadcast_tree(
        strategy.run_on_all_ranks("read once", download)
    )
    return LoadedReader(checkpoint) if shared else None


READ_ONCE_MAX_BYTES = 8 << 30
"""Remote files (DDP, and full files under FSDP) up to this size are read once and broadcast;
larger ones by every rank."""
