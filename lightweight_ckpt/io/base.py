"""The ``CheckpointIO`` interface: how one checkpoint is staged, encoded and committed.

A ``CheckpointIO`` knows no ranks: strategies decide who calls it. The API.md methods are
``save_checkpoint``, ``load_checkpoint``, ``remove_checkpoint`` and ``teardown``; a user subclass
that implements just those is used for every write and read.

Two more methods have default bodies, so subclasses never need them:

- ``stage(checkpoint)``: turn the checkpoint into what gets written (identity; XLA moves tensors
  to the CPU; async copies them to host memory). Called by ``save_checkpoint``.
- ``open_checkpoint(...)``: a two-phase ``CheckpointReader`` for in-place, all-or-nothing loads.
  The default wraps ``load_checkpoint``, so a user's override is honoured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.storage import Location, call_with_retries, resolve

if TYPE_CHECKING:
    from collections.abc import Mapping
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

    def stage(self, checkpoint: Checkpoint) -> Checkpoint:
        """Return the checkpoint to encode: identity here; XLA and async IO copy to host memory."""
        return checkpoint

    # -- sharded checkpoints (a directory, one piece per rank; see formats.dcp_dir) -----------

    def is_sharded(self, path: StrPath, storage_options: StorageOptions | None = None) -> bool:
        """Return True if ``path`` holds a sharded checkpoint (a directory)."""
        location = self.locate(path, storage_options)
        return call_with_retries(location.url, "reading", lambda: dcp_dir.is_sharded(location))

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
        dcp_dir.write(checkpoint, location, version, self.options(storage_options))

    def finish_sharded(
        self, path: StrPath, version: str, storage_options: StorageOptions | None = None
    ) -> None:
        """Remove the versions the commit replaced (rank 0, after every rank saw the commit)."""
        dcp_dir.remove_stale_versions(self.locate(path, storage_options), keep=version)

    def read_sharded_metadata(
        self, path: StrPath, storage_options: StorageOptions | None = None
    ) -> Metadata:
        """Return the committed checkpoint's DCP metadata, after checking its pieces are whole.

        Raises:
            CheckpointNotFoundError: nothing committed at ``path``.
            CorruptCheckpointError: unreadable metadata, or a missing or truncated piece.
        """
        location, options = self.locate(path, storage_options), self.options(storage_options)
        metadata = dcp_dir.read_metadata(location, options)
        dcp_dir.require_pieces(location, options, metadata)
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
        dcp_dir.read(template, location, self.options(storage_options), weights_only is not False)

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
