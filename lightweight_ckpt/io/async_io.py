"""``AsyncCheckpointIO``: save in the background; the caller waits only for a host snapshot.

``save_checkpoint`` copies every tensor of the checkpoint (CPU tensors too, so training may
mutate them at once) into host buffers that are reused from save to save, then hands the copy
to one worker thread that runs the wrapped IO's ordinary, atomic save. Copies from CUDA go
into pinned buffers, are issued non-blocking on each device's current stream (so after the
kernels that produced the values) and synchronized once per device; no GPU memory is used. A
tensor under several keys (tied weights) is copied once and stays shared, as in ``torch.save``.
XLA tensors are moved as ``XLACheckpointIO`` stages them: one graph execution and one batched
transfer, on the caller, so the worker never touches the XLA device. The wrapped IO's
``stage`` then runs on the copy, on the caller. The collector is paused while the caller copies.

- Back-pressure: at most ``max_pending`` saves in flight (default 1); the next save waits for a
  slot. Host memory is bounded by ``max_pending`` snapshots of the checkpoint.
- Reads and removals wait for the pending saves first, so ``fabric.load`` of a path being
  written loads the new checkpoint.
- A failure in the background is raised by the next ``save_checkpoint``, ``wait()`` or
  ``teardown()``, and logged at interpreter exit if nobody saw it. Never lost. A
  ``SaveHandle`` (``track_save``, what ``fabric.save`` returns) tracks one save's writes; a
  failure it reported is not raised again by the next call.
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
import gc
import logging
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch

from lightweight_ckpt.formats import dcp_staging
from lightweight_ckpt.io import xla_io
from lightweight_ckpt.io.base import CheckpointIO, CheckpointReader, SaveHandle
from lightweight_ckpt.io.torch_io import TorchCheckpointIO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch.distributed.checkpoint.metadata import Metadata

    from lightweight_ckpt.types import Checkpoint, MapLocation, StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")


class _Snapshot:
    """Host buffers for one in-flight checkpoint, reused while the tensors keep their layout."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = []
        self._layout: list[tuple[Any, ...]] = []
        self.future: Future[None] | None = None

    def copy(self, checkpoint: Checkpoint) -> Checkpoint:
        tensors: list[torch.Tensor] = []
        skeleton = _replace_tensors(checkpoint, tensors)
        sources, order = _unique(tensors)
        layout: list[tuple[Any, ...]] = [(t.shape, t.dtype, t.device.type) for t in sources]
        layout.append(tuple(order))
        if layout != self._layout:
            self._buffers = [_host_buffer(t) for t in sources]
            self._layout = layout
        copies = list(self._buffers)
        xla = [i for i, buffer in enumerate(copies) if buffer is None]
        if xla:  # one graph execution and one batched transfer, as XLACheckpointIO stages
            moved = xla_io.to_cpu({"tensors": [sources[i] for i in xla]})["tensors"]
            for i, tensor in zip(xla, moved, strict=True):
                copies[i] = tensor  # a fresh CPU tensor of our own: no second copy
        cuda_devices: set[torch.device] = set()
        with torch.no_grad():  # no autograd record of the copies (and no detach per tensor)
            for buffer, tensor, shape in zip(self._buffers, sources, layout, strict=False):
                if buffer is None:  # moved from XLA above
                    continue
                cuda = shape[2] == "cuda"
                if cuda:
                    cuda_devices.add(tensor.device)
                # Pinned + non_blocking: the D2H copy is queued on the current stream, after
                # the kernels that produced the values; other devices copy synchronously.
                buffer.copy_(tensor, non_blocking=cuda)
        for device in cuda_devices:
            torch.cuda.current_stream(device).synchronize()  # once per device
        filled: Checkpoint = _fill_tensors(skeleton, iter([copies[i] for i in order]))
        return filled

    @property
    def busy(self) -> bool:
        return self.future is not None and not self.future.done()


def _unique(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Return the distinct tensors and, per tensor, its index among them.

    The same tensor under two keys (tied weights) gets one buffer, so the snapshot shares it
    the way ``torch.save`` of the live state would. Tensors without a host-visible address
    (XLA tensors report 0) are told apart by identity.
    """
    index: dict[tuple[Any, ...], int] = {}
    sources: list[torch.Tensor] = []
    order: list[int] = []
    strided = torch.strided
    for tensor in tensors:
        address = tensor.data_ptr() if tensor.layout == strided else 0
        if address:
            key: tuple[Any, ...] = (address, tensor.device, tensor.dtype, tensor.shape)
            key += (tensor.stride(),)
        else:
            key = (id(tensor),)
        position = index.setdefault(key, len(sources))
        if position == len(sources):
            sources.append(tensor)
        order.append(position)
    return sources, order


def _host_buffer(tensor: torch.Tensor) -> torch.Tensor | None:
    """A reusable host buffer for ``tensor`` (pinned for CUDA); None for an XLA tensor."""
    if tensor.device.type == "xla":
        return None  # its transfer allocates a fresh CPU tensor every time
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while the caller copies (it cost ms per save)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Slot:
    """Marks where a tensor was in the checkpoint tree (a sharded one: its local parts)."""

    def __init__(self, rebuild: Any = None, parts: int = 1) -> None:
        self.rebuild = rebuild
        self.parts = parts

    def fill(self, buffers: Any) -> Any:
        if self.rebuild is None:
            return next(buffers)
        return self.rebuild([next(buffers) for _ in range(self.parts)])


# immutable leaves, returned as they are (deepcopy would return them too, at a call's cost)
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.Size})


def _replace_tensors(tree: Any, found: list[torch.Tensor]) -> Any:
    """Copy the tree's containers, deep-copy plain values, and put slots where tensors were."""
    kind = type(tree)
    if kind is dict:  # most nodes: plain dicts, then leaves
        return {k: _replace_tensors(v, found) for k, v in tree.items()}
    if kind in _ATOMS:
        return tree
    if isinstance(tree, torch.Tensor):
        return _slot(tree, found)
    if kind is list:
        return [_replace_tensors(v, found) for v in tree]
    return _rebuild(tree, lambda v: _replace_tensors(v, found), copy.deepcopy)


def _slot(tensor: torch.Tensor, found: list[torch.Tensor]) -> _Slot:
    sharded = dcp_staging.split_sharded(tensor)  # DTensor / ShardedTensor: copy local parts
    if sharded is not None:
        found.extend(sharded[0])
        return _Slot(sharded[1], len(sharded[0]))
    found.append(tensor)
    return _Slot()


def _fill_tensors(tree: Any, buffers: Any) -> Any:
    kind = type(tree)
    if kind is dict:
        return {k: _fill_tensors(v, buffers) for k, v in tree.items()}
    if kind is _Slot:
        return tree.fill(buffers)
    if kind in _ATOMS:
        return tree
    if kind is list:
        return [_fill_tensors(v, buffers) for v in tree]
    return _rebuild(tree, lambda v: _fill_tensors(v, buffers), lambda leaf: leaf)


def _rebuild(tree: Any, fn: Callable[[Any], Any], leaf: Callable[[Any], Any]) -> Any:
    """Rebuild a dict subclass, list or tuple (not a namedtuple) around ``fn`` of its items."""
    if isinstance(tree, dict):
        return type(tree)((k, fn(v)) for k, v in tree.items())
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return type(tree)(fn(v) for v in tree)
    return leaf(tree)


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
        self._tracking: SaveHandle | None = None  # the handle of the save being made
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
        with _gc_paused():
            staged = self.checkpoint_io.stage(slot.copy(checkpoint))
            slot.future = self._submit(self._write, staged, path, storage_options)

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Queue ``fn`` on the worker; the save being tracked (``track_save``) includes it."""
        executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="lwckpt-async")
        self._executor = executor
        future = executor.submit(fn, *args)
        if self._tracking is not None:
            self._tracking.add(future)
        return future

    @contextmanager
    def track_save(self, path: str) -> Iterator[SaveHandle]:
        """Yield a handle that tracks the background writes queued inside the block."""
        handle, outer = SaveHandle(path, self._forget), self._tracking
        self._tracking = handle
        try:
            yield handle
        finally:
            self._tracking = outer

    def _forget(self, error: BaseException) -> None:
        """A handle reported ``error``: the next save, wait or teardown does not raise it."""
        with self._lock:
            self._errors = [(path, err) for path, err in self._errors if err is not error]

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
        with _gc_paused():
            self._staged = (slot, self.checkpoint_io.stage(slot.copy(checkpoint)))
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
        slot.future = self._submit(self._write_sharded, staged, path, version, storage_options)

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
        slot.future = self._submit(
            self._finish_sharded, slot.future, path, version, storage_options
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
