"""``XLAStrategy``: data parallel on XLA replicas (TPU, or torch_xla's CPU runtime).

``save`` is called on every replica. Every replica executes its pending graph (one sync of the
checkpoint's tensors, so a graph holding a collective never runs on one replica alone); the
master ordinal then moves the tensors to the CPU in one batched transfer and writes one file in
the single-device format, which ``torch.load(weights_only=True)`` reads without torch_xla.
``load`` reads that file on every replica and restores onto the XLA device.

Replicas coordinate through a ``Coordinator``: by default ``RuntimeCoordinator`` (torch_xla's
runtime ordinals and ``xm.rendezvous``, which exchanges bytes between replicas). It is a
constructor argument so that tests can drive several emulated replicas in one process. Every
step that may fail on one replica runs inside ``agree``: the outcome is exchanged, and a
failure anywhere raises on every replica. No rendezvous sits inside a rank-dependent branch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Protocol, TypeVar

from lightweight_ckpt.collectives import RankFailedError
from lightweight_ckpt.formats.xla_shards import import_torch_xla
from lightweight_ckpt.io.xla_io import XLACheckpointIO, sync_xla_tensors, to_cpu
from lightweight_ckpt.strategies.base import Strategy

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightweight_ckpt.io import CheckpointIO
    from lightweight_ckpt.types import Checkpoint, StorageOptions, StrPath

T = TypeVar("T")


class Coordinator(Protocol):
    """How XLA replicas find each other: ordinals, and an exchange of bytes."""

    @property
    def global_rank(self) -> int:
        """This replica's ordinal."""

    @property
    def world_size(self) -> int:
        """The number of replicas."""

    def exchange(self, tag: str, payload: bytes) -> list[bytes]:
        """Send ``payload`` to every replica; return every replica's, in ordinal order."""


class RuntimeCoordinator:
    """torch_xla's runtime: ``torch_xla.runtime`` ordinals and ``xm.rendezvous``."""

    def __init__(self) -> None:
        self._runtime = import_torch_xla("torch_xla.runtime", "XLA strategies")
        self._xm = import_torch_xla("torch_xla.core.xla_model", "XLA strategies")

    @property
    def global_rank(self) -> int:
        """This replica's global ordinal."""
        return int(self._runtime.global_ordinal())

    @property
    def world_size(self) -> int:
        """The number of replicas in the runtime."""
        return int(self._runtime.world_size())

    def exchange(self, tag: str, payload: bytes) -> list[bytes]:
        """``xm.rendezvous`` (an all-gather on the device); local with one replica."""
        if self.world_size == 1:
            return [payload]
        return list(self._xm.rendezvous(f"lightweight_ckpt.{tag}", payload))


def is_xla_runtime() -> bool:
    """Return True once the program imported torch_xla (its runtime is then the device)."""
    return "torch_xla" in sys.modules


def broadcast(coordinator: Coordinator, tag: str, value: str) -> str:
    """Return the master ordinal's ``value`` on every replica."""
    return coordinator.exchange(tag, value.encode())[0].decode()


def agree(
    coordinator: Coordinator,
    step: str,
    fn: Callable[[], T],
    *,
    same: bool = False,
    on_abort: Callable[[T], object] | None = None,
) -> T:
    """Run ``fn`` on every replica; if it raised on any, raise on every one.

    The replica that failed re-raises its own exception; the others raise ``RankFailedError``
    naming the failed ordinals and their messages, after handing their own result to
    ``on_abort``. With ``same``, the (JSON) results must also be equal on every replica, or
    every replica raises ``RankFailedError``.
    """
    error: Exception | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - every failure must reach the other replicas
        error = err
    outcome = {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "value": result if same and error is None else None,
    }
    replies = coordinator.exchange(step, json.dumps(outcome).encode())
    outcomes = [json.loads(reply) for reply in replies]
    failed = {rank: o["error"] for rank, o in enumerate(outcomes) if o["error"] is not None}
    if error is not None:
        raise error
    if failed:
        if on_abort is not None:
            on_abort(result)  # type: ignore[arg-type]
        raise RankFailedError(f"{step} failed on XLA replica(s) {sorted(failed)}: {failed}")
    values = {json.dumps(o["value"]) for o in outcomes}
    if same and len(values) > 1:
        seen = {rank: o["value"] for rank, o in enumerate(outcomes)}
        raise RankFailedError(f"{step}: XLA replicas disagree: {seen}")
    return result  # type: ignore[return-value]


class XLAStrategy(Strategy):
    """The master ordinal writes one file from CPU copies; every replica loads it.

    Args:
        checkpoint_io: the IO plugin for every read and write (default ``XLACheckpointIO``).
        coordinator: how replicas exchange outcomes (default: torch_xla's runtime).

    Raises:
        ModuleNotFoundError: torch_xla is not installed (the message names the ``xla`` extra).
    """

    def __init__(
        self, checkpoint_io: CheckpointIO | None = None, coordinator: Coordinator | None = None
    ) -> None:
        import_torch_xla(feature="XLA strategies")
        super().__init__(checkpoint_io or XLACheckpointIO())
        self._coordinator = coordinator

    @property
    def coordinator(self) -> Coordinator:
        """The replicas' coordinator (torch_xla's runtime unless one was given)."""
        if self._coordinator is None:
            self._coordinator = RuntimeCoordinator()
        return self._coordinator

    @property
    def global_rank(self) -> int:
        """This replica's global ordinal."""
        return self.coordinator.global_rank

    @property
    def world_size(self) -> int:
        """The number of replicas."""
        return self.coordinator.world_size

    def barrier(self) -> None:
        """Wait for every replica."""
        self.coordinator.exchange("barrier", b"")

    def agree(self, step: str, fn: Callable[[], T], *, same: bool = False) -> T:
        """Run ``fn`` on every replica; a failure on any raises on all (see ``agree``)."""
        return agree(self.coordinator, step, fn, same=same)

    def agreed_path(self, path: StrPath) -> str:
        """Return the master ordinal's path on every replica."""
        return broadcast(self.coordinator, "path", os.fspath(path))

    # The shared pipeline's coordination hooks, on the replicas' coordinator (torch.distributed
    # process groups, which ``collectives`` uses, are not needed by XLA replicas).

    def run_on_all_ranks(
        self, step: str, fn: Callable[[], T], on_abort: Callable[[T], object] | None = None
    ) -> T:
        """Run ``fn`` on every replica; a failure on any raises on all (see ``agree``)."""
        return agree(self.coordinator, step, fn, on_abort=on_abort)

    def broadcast_object(self, obj: T) -> T:
        """Return the master ordinal's ``obj`` (a path) on every replica."""
        if isinstance(obj, (str, os.PathLike)):
            return self.agreed_path(obj)  # type: ignore[return-value]
        return obj

    def write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        """Sync on every replica; the master moves tensors to the CPU once and writes."""
        path = self.agreed_path(path)
        master = self.is_global_zero

        def stage() -> Checkpoint:
            if not master:
                sync_xla_tensors(checkpoint)
                return checkpoint
            return to_cpu(checkpoint)  # a user's IO then gets CPU tensors too

        staged = self.agree("stage", stage)
        self.agree("save", lambda: self._write_if_master(staged, path, storage_options))

    def _write_if_master(
        self, checkpoint: Checkpoint, path: str, storage_options: StorageOptions | None
    ) -> None:
        if self.is_global_zero:
            super().write(checkpoint, path, storage_options)
