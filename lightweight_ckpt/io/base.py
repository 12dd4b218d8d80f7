"""The ``CheckpointIO`` interface: how one checkpoint is staged, encoded and committed.

A ``CheckpointIO`` knows no ranks: strategies decide who calls it. The API.md methods are
``save_checkpoint``, ``load_checkpoint``, ``remove_checkpoint`` and ``teardown``; a user subclass
that implements just those is used for every write and read.

Two more methods have default bodies, so subclasses never need them:

- ``stage(checkpoint)``: turn the checkpoint into what gets written (identity; XLA moves tensors
  to the CPU; async copies them to host memory). Called by ``save_checkpoint``.
- ``open_checkpoint(...)``: a two-phase ``CheckpointReader`` for in-place, all-or-nothing loads.
  The default wraps ``load_checkpoint``, so a user's override is honoured.
- ``track_save(path)``: a ``SaveHandle`` for the saves made inside the block (what
  ``fabric.save`` returns). A synchronous IO's handle is complete at once; an IO that writes in
  the background adds its work to it.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import fsspec

from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.storage import Location, resolve

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from concurrent.futures import Future
    from types import TracebackType

    import torch
    from torch.distributed.checkpoint.metadata import Metadata

    from lightweight_ckpt.types import Checkpoint, MapLocation, StorageOptions, StrPath


class CheckpointReader(Protocol):
    """Staged read of one checkpoint (see ``formats.torch_file``).

    ``skeleton()`` returns the object tree; ``verify(bindings)`` checks and fills it and returns
    the ids of the bindings it will honour; ``fill()`` then writes those straight into their
    targets. Nothing the caller owns is written before ``fill()``.
    """

    def skeleton(self) -> Any:
        """Return the checkpoint's object tree (tensor data may not be read yet)."""

    def verify(self, bindings: Mapping[int, torch.Tensor]) -> set[int]:
        """Check and fill the tree; return the ids of the bindings ``fill()`` will honour."""

    def fill(self) -> None:
        """Write the honoured bindings' data into their targets."""

    def close(self) -> None:
        """Release files."""

    def __enter__(self) -> CheckpointReader:
        """Return self."""

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close."""


class LoadedReader:
    """A ``CheckpointReader`` over a checkpoint that is already fully loaded."""

    def __init__(self, checkpoint: Any) -> None:
        self._checkpoint = checkpoint

    def skeleton(self) -> Any:
        """Return the loaded checkpoint."""
        return self._checkpoint

    def verify(self, bindings: Mapping[int, torch.Tensor]) -> set[int]:
        """Honour no binding: the data is in memory already."""
        return set()

    def fill(self) -> None:
        """Nothing to write."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LoadedReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SaveHandle:
    """One ``fabric.save``, as this process sees it: wait for it, ask whether it is durable.

    It tracks exactly that save: the background work it queued on this process (none for a
    synchronous IO, or on a rank that does not write; the handle is then complete at once).
    Like a ``Future``, it reports its save's outcome every time it is asked. A failure that it
    has reported (``wait()`` raised it, or ``exception()`` returned it) counts as seen: the IO's
    next save, ``wait()`` and ``teardown()`` do not raise it again. A failure no handle reported
    is raised there, as without handles.

    Attributes:
        path: the path or URL given to ``save``.
    """

    def __init__(
        self, path: str, on_reported: Callable[[BaseException], None] | None = None
    ) -> None:
        self.path = path
        self._futures: list[Future[None]] = []
        self._on_reported = on_reported

    def add(self, future: Future[None]) -> None:
        """Track one more piece of background work of this save (for ``CheckpointIO``s)."""
        self._futures.append(future)

    def done(self) -> bool:
        """True when the save has finished, committed or failed (never blocks)."""
        return all(future.done() for future in self._futures)

    @property
    def is_durable(self) -> bool:
        """True when the save is committed (never blocks; False while running or if failed)."""
        return self.done() and all(future.exception() is None for future in self._futures)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the save; return its failure, or None if it is committed.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in self._futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                error = future.exception(left)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(
                    f"{self.path}: the save is not durable after {timeout} s"
                ) from None
            if error is not None:
                if self._on_reported is not None:
                    self._on_reported(error)
                return error
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the save is committed; raise its failure.

        Raises:
            CheckpointError: the save failed (the previous checkpoint at ``path`` is intact).
            TimeoutError: still running after ``timeout`` seconds.
        """
        error = self.exception(timeout)
        if error is not None:
            raise error

    def __repr__(self) -> str:
        status = "running" if not self.done() else "durable" if self.is_durable else "failed"
        return f"SaveHandle({self.path!r}, {status})"


class CheckpointIO(ABC):
    """Save, load and remove one checkpoint at a path or URL.

    ``storage_options``: default fsspec options for every path this IO touches (endpoint,
    credentials, ...); per-call options are merged over them.
    """

    storage_options: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance, never mutated

    def options(self, storage_options: StorageOptions | None = None) -> dict[str, Any]:
        """Merge per-call fsspec options over this IO's defaults."""
        return {**self.storage_options, **(storage_options or {})}

    def locate(self, path: StrPath, storage_options: StorageOptions | None = None) -> Location:
        """Resolve ``path`` with the merged fsspec options."""
        return resolve(path, self.options(storage_options))

    @abstractmethod
    def save_checkpoint(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: the dict to write (state dicts and plain values).
            path: a local path or fsspec URL.
            storage_options: fsspec options for this write (endpoint, credentials, ...).
        """

    @abstractmethod
    def load_checkpoint(
        self, path: StrPath, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> Any:
        """Read the checkpoint at ``path``.

        Args:
            path: a local path or fsspec URL.
            map_location: where tensors go, as in ``torch.load``; ``None`` means the CPU.
            weights_only: refuse arbitrary pickled objects (default True).
        """

    @abstractmethod
    def remove_checkpoint(self, path: StrPath) -> None:
        """Delete the checkpoint at ``path``; a missing path is not an error."""

    def teardown(self) -> None:  # noqa: B027 - optional hook with an empty default
        """Release resources (threads, pools); called when the IO is no longer used."""

    def wait(self) -> None:  # noqa: B027 - optional hook with an empty default
        """Block until every save this IO returned from is durable (sync IO: always)."""

    @property
    def pending(self) -> int:
        """How many returned saves are not durable yet (0 for a synchronous IO)."""
        return 0

    @property
    def is_durable(self) -> bool:
        """True when every save this IO returned from is committed (or has failed)."""
        return self.pending == 0

    @contextmanager
    def track_save(self, path: str) -> Iterator[SaveHandle]:
        """Yield a handle for the saves made inside the block (``fabric.save`` returns it).

        A synchronous IO has nothing left to do when its save returns: the handle is complete.
        An IO that writes in the background overrides this and adds its work to the handle.
        """
        yield SaveHandle(path)

    def stage(self, checkpoint: Checkpoint) -> Checkpoint:
        """Return the checkpoint to encode: identity here; XLA and async IO copy to host memory."""
        return checkpoint

    # -- sharded checkpoints (a directory, one piece per rank; see formats.dcp_dir) -----------

    def is_sharded(self, path: StrPath, storage_options: StorageOptions | None = None) -> bool:
        """Return True if ``path`` holds a sharded checkpoint (a directory).

        A path whose scheme fsspec does not know is a user IO's own (``kv://...``): only that
        IO's ``load_checkpoint`` can read it, so it is not a sharded directory.
        """
        protocol, _ = fsspec.core.split_protocol(os.fspath(path))
        if protocol is not None and protocol not in fsspec.available_protocols():
            return False
        return dcp_dir.is_sharded(self.locate(path, storage_options))

    def prepare_sharded(
        self, path: StrPath, version: str, storage_options: StorageOptions | None = None
    ) -> None:
        """Make ``path`` ready for this rank's piece of ``version`` (before any collective)."""
        dcp_dir.prepare(self.locate(path, storage_options), version)

    def save_sharded(
        self,
        checkpoint: Checkpoint,
        path: StrPath,
        version: str,
        storage_options: StorageOptions | None = None,
    ) -> None:
        """Write this rank's piece of an already staged checkpoint (a collective).

        The save commits when rank 0 publishes ``.metadata``, after every rank wrote its piece.
        A failure on any rank raises on every rank (DCP gathers the errors).
        """
        location = self.locate(path, storage_options)
        dcp_dir.write(checkpoint, location, version)

    def finish_sharded(
        self, path: StrPath, version: str, storage_options: StorageOptions | None = None
    ) -> None:
        """Remove the versions the commit replaced.

        Rank 0, after the commit; on local disk in the background (see ``formats.dcp_versions``).
        """
        dcp_dir.remove_stale_versions(self.locate(path, storage_options), keep=version)

    def read_sharded_metadata(
        self, path: StrPath, storage_options: StorageOptions | None = None
    ) -> Metadata:
        """Return the committed checkpoint's DCP metadata, after checking its pieces are whole.

        Raises:
            CheckpointNotFoundError: nothing committed at ``path``.
            CorruptCheckpointError: unreadable metadata, or a missing or truncated piece.
        """
        location = self.locate(path, storage_options)
        metadata = dcp_dir.read_metadata(location)
        dcp_dir.require_pieces(location, metadata)
        return metadata

    def load_sharded(
        self,
        template: Checkpoint,
        path: StrPath,
        *,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> None:
        """Fill ``template`` (sharded or full tensors) in place (every rank calls it)."""
        location = self.locate(path, storage_options)
        dcp_dir.read(template, location, weights_only is not False)

    def open_checkpoint(
        self,
        path: StrPath,
        *,
        map_location: MapLocation = None,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> CheckpointReader:
        """Open ``path`` for a two-phase load; by default through ``load_checkpoint``."""
        if storage_options is not None:
            if not _takes_storage_options(self.load_checkpoint):
                raise TypeError(
                    f"{os.fspath(path)}: storage_options were given, but "
                    f"{type(self).__name__}.load_checkpoint takes no storage_options argument. "
                    "Add one to it, or give the options to the IO itself."
                )
            loaded = self.load_checkpoint(  # type: ignore[call-arg]
                path,
                map_location=map_location,
                weights_only=weights_only,
                storage_options=storage_options,
            )
        else:
            loaded = self.load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        return LoadedReader(loaded)


def _takes_storage_options(method: Callable[..., Any]) -> bool:
    """Whether a (user's) ``load_checkpoint`` accepts ``storage_options=``."""
    parameters = inspect.signature(method).parameters.values()
    return any(
        p.name == "storage_options" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )
