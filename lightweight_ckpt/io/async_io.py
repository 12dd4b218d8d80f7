"""``AsyncCheckpointIO``: save in the background; the caller waits only for a host snapshot.

``save_checkpoint`` copies every tensor of the checkpoint (CPU tensors too, so training may
mutate them at once) into host buffers that are reused from save to save, then hands the copy
to one worker thread that runs the wrapped IO's ordinary, atomic save. Copies from CUDA go
into pinned buffers, are issued non-blocking on each device's current stream (so after the
kernels that produced the values) and synchronized once per device; no GPU memory is used. A
tensor under several keys (tied weights) is copied once and stays shared, as in ``torch.save``.

- Back-pressure: at most ``max_pending`` saves in flight (default 1); the next save waits for a
  slot. Host memory is bounded by ``max_pending`` snapshots of the checkpoint.
- Reads and removals wait for the pending saves first, so ``fabric.load`` of a path being
  written loads the new checkpoint.
- A failure in the background is raised by the next ``save_checkpoint``, ``wait()`` or
  ``teardown()``, and logged at interpreter exit if nobody saw it. Never lost.
- The commit stays the wrapped IO's: the checkpoint appears only when fully written.
- Sharded saves: ``stage`` snapshots this rank's piece (local shards of DTensors and
  ShardedTensors) on the caller, in a step every rank agrees on; the worker then writes it with
  DCP, whose collectives run on a gloo group of this IO's own, created once at the first sharded
  save (never the training loop's group from another thread). Rank 0 commits ``.metadata`` only
  after every rank's piece is durable; the versions it replaced go after that commit. A new
  sharded save waits for the previous one.

A thread, not a process: the write is file I/O, CRC32s and ``torch.save``'s C++ writer, which
mostly release the GIL, and a thread shares the snapshot without pickling it to another process.
``benchmarks/async_save.py`` measured a shared-memory writer process against this thread; it
did not block the loop less (``benchmarks/README.md``, "Async saves").
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import torch

from lightweight_ckpt.formats import dcp_staging
from lightweight_ckpt.io.base import CheckpointIO, CheckpointReader
from lightweight_ckpt.io.torch_io import TorchCheckpointIO

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from lightweight_ckpt.types import Checkpoint, MapLocation, StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")


class _Snapshot:
    """Host buffers for one in-flight checkpoint, reused while the tensors keep their layout."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._layout: list[tuple[Any, ...]] = []
        self.future: Future[None] | None = None

    def copy(self, checkpoint: Checkpoint) -> Checkpoint:
        tensors: list[torch.Tensor] = []
        skeleton = _replace_tensors(checkpoint, tensors)
        sources, order = _unique(tensors)
        layout = [(t.shape, t.dtype, t.is_cuda) for t in sources] + [tuple(order)]
        if layout != self._layout:
            self._buffers = [_host_buffer(t) for t in sources]
            self._layout = layout
        cuda_devices: set[torch.device] = set()
        for buffer, tensor in zip(self._buffers, sources, strict=True):
            if tensor.is_cuda:
                cuda_devices.add(tensor.device)
            # Pinned + non_blocking: the D2H copy is queued on the current stream, after the
            # kernels that produced the values; other devices copy synchronously.
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        for device in cuda_devices:
            torch.cuda.current_stream(device).synchronize()  # once per device
        filled: Checkpoint = _fill_tensors(skeleton, iter([self._buffers[i] for i in order]))
        return filled

    @property
    def busy(self) -> bool:
        return self.future is not None and not self.future.done()


def _unique(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Return the distinct tensors and, per tensor, its index among them.

    The same tensor under two keys (tied weights) gets one buffer, so the snapshot shares it
    the way ``torch.save`` of the live state would.
    """
    index: dict[tuple[Any, ...], int] = {}
    sources: list[torch.Tensor] = []
    order: list[int] = []
    for tensor in tensors:
        if tensor.layout == torch.strided:
            key: tuple[Any, ...] = (tensor.device, tensor.data_ptr(), tensor.dtype)
            key += (tensor.shape, tensor.stride())
        else:
            key = (id(tensor),)
        position = index.setdefault(key, len(sources))
        if position == len(sources):
            sources.append(tensor)
        order.append(position)
    return sources, order


def _host_buffer(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)


class _Slot:
    """Marks where a tensor was in the checkpoint tree (a sharded one: its local parts)."""

    def __init__(self, rebuild: Any = None, parts: int = 1) -> None:
        self.rebuild = rebuild
        self.parts = parts

    def fill(self, buffers: Any) -> Any:
        if self.rebuild is None:
            return next(buffers)
        return self.rebuild([next(buffers) for _ in range(self.parts)])


def _replace_tensors(tree: Any, found: list[torch.Tensor]) -> Any:
    """Copy the tree's containers, deep-copy plain values, and put slots where tensors were."""
    if isinstance(tree, torch.Tensor):
        sharded = dcp_staging.split_sharded(tree)  # DTensor / ShardedTensor: copy local parts
        if sharded is not None:
            found.extend(sharded[0])
            return _Slot(sharded[1], len(sharded[0]))
        found.append(tree)
        return _Slot()
    if isinstance(tree, dict):
        return type(tree)((k, _replace_tensors(v, found)) for k, v in tree.items())
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return type(tree)(_replace_tensors(v, found) for v in tree)
    return copy.deepcopy(tree)


def _fill_tensors(tree: Any, buffers: Any) -> Any:
    if isinstance(tree, _Slot):
        return tree.fill(buffers)
    if isinstance(tree, dict):
        return type(tree)((k, _fill_tensors(v, buffers)) for k, v in tree.items())
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return type(tree)(_fill_tensors(v, buffers) for v in tree)
    return tree


class AsyncCheckpointIO(CheckpointIO):
    """Wrap any ``CheckpointIO`` so that saves run in the background.

    Args:
        checkpoint_io: the IO that writes (default ``TorchCheckpointIO``).
        max_pending: saves allowed in flight at once; a further save waits (default 1).
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None, max_pending: int = 1) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.checkpoint_io = checkpoint_io or TorchCheckpointIO()
        self.max_pending = max_pending
        self._slots: deque[_Snapshot] = deque(_Snapshot() for _ in range(max_pending))
        self._executor: ThreadPoolExecutor | None = None
        self._errors: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._staged: tuple[_Snapshot, Checkpoint] | None = None  # sharded: staged, not written
        self._group: Any = None  # the background sharded saves' own process group
        atexit.register(_report_at_exit, weakref.ref(self))

    # -- saving ------------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None = None
    ) -> None:
        """Snapshot ``checkpoint`` into host memory and write it in the background.

        Raises:
            CheckpointError: an earlier background save failed (raised here, once).
        """
        self._raise_errors()
        slot = self._slots[0]
        if slot.future is not None:
            self._settle(slot.future)  # back-pressure: the oldest slot must be free
        self._slots.rotate(-1)
        staged = slot.copy(self.checkpoint_io.stage(checkpoint))
        executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="lwckpt-async")
        self._executor = executor
        future = executor.submit(self._write, staged, path, storage_options)
        slot.future = future

    def _write(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None
    ) -> None:
        try:
            if storage_options is None:
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            else:
                self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
        except BaseException as err:
            with self._lock:
                self._errors.append((str(path), err))
            raise

    def _settle(self, future: Future[None]) -> None:
        future.exception()  # waits; a failure was recorded by _write and is raised below
        self._raise_errors()

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            path, error = errors[0]
            if len(errors) > 1:
                log.error("%d background saves failed; raising the first (%s)", len(errors), path)
            raise error

    def wait(self) -> None:
        """Block until every pending save is durable; then raise a background failure."""
        for slot in list(self._slots):
            if slot.future is not None:
                slot.future.exception()  # settle every save before raising any failure
        self._raise_errors()

    @property
    def pending(self) -> int:
        """How many saves are still being written."""
        return sum(slot.busy for slot in self._slots)

    # -- everything else waits for the pending saves ---------------------------------------

    def load_checkpoint(
        self, path: StrPath, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> Any:
        """Wait for pending saves, then load through the wrapped IO."""
        self.wait()
        return self.checkpoint_io.load_checkpoint(path, map_location, weights_only)

    def open_checkpoint(
        self,
        path: StrPath,
        *,
        map_location: MapLocation = None,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> CheckpointReader:
        """Wait for pending saves, then open through the wrapped IO (its fast path included)."""
        self.wait()
        return self.checkpoint_io.open_checkpoint(
            path,
            map_location=map_location,
            weights_only=weights_only,
            storage_options=storage_options,
        )

    def remove_checkpoint(self, path: StrPath) -> None:
        """Wait for pending saves, then remove through the wrapped IO."""
        self.wait()
        self.checkpoint_io.remove_checkpoint(path)

    def stage(self, checkpoint: Checkpoint) -> Checkpoint:
        """Snapshot into the next free slot's host buffers (after the wrapped IO's stage).

        The sharded save that follows writes this snapshot: strategies stage in a step every
        rank agrees on, so a failed copy fails the save everywhere before any write starts.
        """
        slot = self._slots[0]
        if slot.future is not None:
            self._settle(slot.future)  # back-pressure: the oldest slot must be free
        self._slots.rotate(-1)
        self._staged = (slot, slot.copy(self.checkpoint_io.stage(checkpoint)))
        return self._staged[1]

    def is_sharded(self, path: StrPath, storage_options: StorageOptions | None = None) -> bool:
        """Wait for pending saves, then ask the wrapped IO."""
        self.wait()
        return self.checkpoint_io.is_sharded(path, storage_options)

    def prepare_sharded(
        self, path: StrPath, version: str, storage_options: StorageOptions | None = None
    ) -> None:
        """Wait for pending saves, then prepare; a failure raises here, in an agreed step.

        One sharded save at a time: a pending save's clean-up must not meet this version.
        """
        self.wait()
        self.checkpoint_io.prepare_sharded(path, version, storage_options)

    def save_sharded(
        self,
        checkpoint: Checkpoint,
        path: StrPath,
        version: str,
        storage_options: StorageOptions | None = None,
    ) -> None:
        """Write this rank's piece in the background, from its host snapshot (``stage``).

        Raises:
            CheckpointError: an earlier background save failed (raised here, once).
        """
        self._raise_errors()
        if self._staged is None or self._staged[1] is not checkpoint:
            self.stage(checkpoint)  # a caller that did not stage first
        slot, staged = cast("tuple[_Snapshot, Checkpoint]", self._staged)
        self._staged = None
        if self._group is None:  # every rank gets here, in the same order: a collective is safe
            self._group = dcp_staging.new_background_group()
        executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="lwckpt-async")
        self._executor = executor
        slot.future = executor.submit(self._write_sharded, staged, path, version, storage_options)

    def _write_sharded(
        self, checkpoint: Checkpoint, path: StrPath, version: str, options: StorageOptions | None
    ) -> None:
        try:
            with dcp_staging.collectives_on(self._group):
                self.checkpoint_io.save_sharded(checkpoint, path, version, options)
        except BaseException as err:
            with self._lock:
                self._errors.append((str(path), err))
            raise

    def finish_sharded(
        self, path: StrPath, version: str, storage_options: StorageOptions | None = None
    ) -> None:
        """Once the last sharded save has committed, remove the versions it replaced."""
        slot = self._slots[-1]  # the slot the last save used
        if self._executor is None or slot.future is None:
            self.checkpoint_io.finish_sharded(path, version, storage_options)
            return
        written = slot.future
        slot.future = self._executor.submit(
            self._finish_sharded, written, path, version, storage_options
        )

    def _finish_sharded(
        self, written: Future[None], path: StrPath, version: str, options: StorageOptions | None
    ) -> None:
        if written.exception() is not None:  # done (one worker); its failure is recorded
            return  # nothing was committed, so nothing was replaced: keep every version
        try:
            self.checkpoint_io.finish_sharded(path, version, options)
        except BaseException as err:
            with self._lock:
                self._errors.append((str(path), err))
            raise

    def read_sharded_metadata(
        self, path: StrPath, storage_options: StorageOptions | None = None
    ) -> Metadata:
        """Wait for pending saves, then read through the wrapped IO."""
        self.wait()
        return self.checkpoint_io.read_sharded_metadata(path, storage_options)

    def load_sharded(
        self,
        template: Checkpoint,
        path: StrPath,
        *,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> None:
        """Wait for pending saves, then load through the wrapped IO."""
        self.wait()
        self.checkpoint_io.load_sharded(
            template, path, weights_only=weights_only, storage_options=storage_options
        )

    def teardown(self) -> None:
        """Wait for pending saves, stop the worker, raise a background failure."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            dcp_staging.release_background_group(self._group)
            self._group = None
            self.checkpoint_io.teardown()


def _report_at_exit(ref: weakref.ReferenceType[AsyncCheckpointIO]) -> None:
    io = ref()
    if io is None:
        return
    for slot in list(io._slots):
        if slot.future is not None:
            slot.future.exception()  # finish the write before the interpreter goes
    for path, error in io._errors:
        log.error("background save of %s failed and was never reported: %r", path, error)
