"""Emulated XLA replicas: threads of one process, each driving a strategy as one ordinal.

Why emulated: torch_xla's CPU runtime runs one replica per process, and its cross-replica
collectives (``xm.rendezvous``/``all_gather``) do not run on it with more than one replica
(``xmp.spawn(nprocs=2)`` is refused; ``CPU_NUM_DEVICES=2`` aborts after a timeout). So what is
emulated is exactly the strategy's ``Coordinator`` seam (``exchange`` of bytes between
replicas), here over a ``threading.Barrier``. Everything else is real: XLA tensors on
``torch_xla.device()``, real ``XlaFullyShardedDataParallel`` modules built as rank k of N
(``sharding_rank``/``sharding_world_size``), real files, the real save/load pipeline.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

TIMEOUT_S = 60.0


class ThreadGroup:
    """``world_size`` emulated replicas exchanging bytes through a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)
        self.slots: dict[int, tuple[str, bytes]] = {}
        self.tags: list[list[str]] = [[] for _ in range(world_size)]

    def coordinator(self, rank: int) -> EmulatedCoordinator:
        return EmulatedCoordinator(self, rank)


class EmulatedCoordinator:
    """The ``Coordinator`` of one emulated replica."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    @property
    def global_rank(self) -> int:
        return self.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def exchange(self, tag: str, payload: bytes) -> list[bytes]:
        group = self.group
        group.tags[self.rank].append(tag)
        group.slots[self.rank] = (tag, payload)
        group.barrier.wait()
        replies = [group.slots[r] for r in range(group.world_size)]
        group.barrier.wait()  # everyone has read before the next exchange overwrites
        tags = {t for t, _ in replies}
        if len(tags) > 1:
            raise RuntimeError(f"replicas out of step: {tags}")
        return [p for _, p in replies]


def run_replicas(world_size: int, fn: Callable[[int, EmulatedCoordinator], Any]) -> list[Any]:
    """Run ``fn(rank, coordinator)`` on every emulated replica; return results or exceptions."""
    group = ThreadGroup(world_size)

    def body(rank: int) -> Any:
        try:
            return fn(rank, group.coordinator(rank))
        except BaseException as err:  # noqa: BLE001 - returned to the test, which asserts on it
            return err

    with ThreadPoolExecutor(world_size) as pool:
        results = list(pool.map(body, range(world_size)))
    for err in results:
        if isinstance(err, threading.BrokenBarrierError):
            pytest.fail(f"a replica hung or left the exchange early: {results}")
    return results


def unwrap(results: list[Any]) -> list[Any]:
    """Raise the first replica's exception, if any."""
    for rank, result in enumerate(results):
        if isinstance(result, BaseException):
            pytest.fail(f"replica {rank} failed: {result!r}")
    return results
