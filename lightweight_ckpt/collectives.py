"""Rank information and collective steps over the user's ``torch.distributed`` process group.

We add no launcher and no transport: everything here is a thin layer over the default process
group the user initialized (``torchrun`` / ``init_process_group``). Without one, the process is
rank 0 of a world of 1 and every function is a no-op or runs locally.

``run_on_all_ranks`` is the one way a strategy runs a step that may fail on some ranks: every rank
runs ``fn``, the ranks agree on whether all succeeded, and a failure anywhere raises on every rank
(never a hang, never a silent success on some).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch.distributed as dist

from lightweight_ckpt.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


def is_distributed() -> bool:
    """Return True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Return this process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankFailedError(CheckpointError, RuntimeError):
    """Another rank failed the step this rank was part of."""


def run_on_all_ranks(
    step: str, fn: Callable[[], T], on_abort: Callable[[T], object] | None = None
) -> T:
    """Run ``fn`` on every rank; if it raised on any rank, raise on every rank.

    The rank that failed re-raises its own exception; the others raise ``RankFailedError`` naming
    the failed ranks and their messages, after handing their own result to ``on_abort`` (to
    release what it holds, e.g. an open reader).
    """
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
        error = err
    if is_distributed() and world_size() > 1:
        outcome = None if error is None else f"{type(error).__name__}: {error}"
        outcomes: list[str | None] = [None] * world_size()
        dist.all_gather_object(outcomes, outcome)
        failed = {rank: msg for rank, msg in enumerate(outcomes) if msg is not None}
        if failed and error is None:
            if on_abort is not None:
                on_abort(result)  # type: ignore[arg-type]
            raise RankFailedError(f"{step} failed on rank(s) {sorted(failed)}: {failed}")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]
