"""``TorchCheckpointIO``: the ``torch_file`` format on the ``storage`` layer.

Saves stream ``torch.save`` into an atomic staged write; loads verify every record's CRC32 and
read straight into the caller's tensors (see ``formats.torch_file``). Both log bytes, seconds and
throughput at INFO on the ``lightweight_ckpt`` logger.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.errors import CheckpointError, CheckpointWriteError
from lightweight_ckpt.formats import torch_file, torch_writer
from lightweight_ckpt.io.base import CheckpointIO, CheckpointReader
from lightweight_ckpt.storage import open_source, remove, write_with_retries

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    import torch

    from lightweight_ckpt.storage import Sink
    from lightweight_ckpt.types import Checkpoint, MapLocation, StorageOptions, StrPath

log = logging.getLogger("lightweight_ckpt")


def log_transfer(verb: str, url: str, nbytes: int, seconds: float) -> None:
    """Log one save or load with its size, duration and throughput."""
    mib = nbytes / 2**20
    log.info(
        "%s %s: %.1f MiB in %.3f s (%.0f MiB/s)", verb, url, mib, seconds, mib / max(seconds, 1e-9)
    )


class TorchCheckpointIO(CheckpointIO):
    """Write ``torch.load``-compatible files atomically; read them verified and in place.

    Args:
        storage_options: default fsspec options for every path (endpoint, credentials, ...);
            per-call options are merged over them.
    """

    def __init__(self, storage_options: StorageOptions | None = None) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})

    def save_checkpoint(
        self, checkpoint: Checkpoint, path: StrPath, storage_options: StorageOptions | None = None
    ) -> None:
        """Stream ``checkpoint`` to ``path``; it appears there whole, or the old file stays.

        A transient storage failure restarts the upload (``storage.write_with_retries``).

        Raises:
            CheckpointWriteError: writing, serializing or committing failed.
        """
        location = self.locate(path, storage_options)
        staged = self.stage(checkpoint)
        start = time.perf_counter()

        def write(sink: Sink) -> None:
            try:
                torch_writer.write(staged, sink)
            except CheckpointError:
                raise
            except Exception as err:
                cause = _sink_error(err)
                if not isinstance(cause, Exception):
                    raise cause from None  # Ctrl-C / SystemExit inside torch's writer: not ours
                raise CheckpointWriteError(f"{location.url}: {_describe(cause, err)}") from err

        nbytes = write_with_retries(location, write)
        log_transfer("saved", location.url, nbytes, time.perf_counter() - start)

    def load_checkpoint(
        self, path: StrPath, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> Any:
        """Read and verify the checkpoint at ``path``; tensors land on the CPU by default."""
        with self._open(path, map_location, weights_only, None) as reader:
            checkpoint = reader.skeleton()
            reader.verify({})
            reader.fill()
        return checkpoint

    def open_checkpoint(
        self,
        path: StrPath,
        *,
        map_location: MapLocation = None,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> CheckpointReader:
        """Open ``path`` for a verified two-phase load; honours a subclass's ``load_checkpoint``."""
        if type(self).load_checkpoint is not TorchCheckpointIO.load_checkpoint:
            return super().open_checkpoint(
                path,
                map_location=map_location,
                weights_only=weights_only,
                storage_options=storage_options,
            )
        return self._open(path, map_location, weights_only, storage_options)

    def _open(
        self,
        path: StrPath,
        map_location: MapLocation,
        weights_only: bool | None,
        storage_options: StorageOptions | None,
    ) -> _TimedReader:
        location = self.locate(path, storage_options)
        source = open_source(location)
        reader = torch_file.TorchFileReader(
            source, weights_only=weights_only is not False, map_location=map_location
        )
        return _TimedReader(reader)

    def remove_checkpoint(self, path: StrPath) -> None:
        """Delete the checkpoint at ``path``; a missing path is not an error."""
        remove(self.locate(path, None))


def _sink_error(err: BaseException) -> BaseException:
    """Find what the sink raised: torch's writer replaces it with a RuntimeError of its own."""
    cause: BaseException | None = err
    while cause is not None:
        if not isinstance(cause, RuntimeError) or isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return err


def _describe(cause: BaseException, err: BaseException) -> str:
    if cause is err and not isinstance(err, OSError):
        return f"could not serialize the checkpoint: {err}"
    return f"write failed: {type(cause).__name__}: {cause}"


class _TimedReader:
    """Close the source when done and log the load's throughput."""

    def __init__(self, reader: torch_file.TorchFileReader) -> None:
        self._reader = reader
        self._start = time.perf_counter()

    def skeleton(self) -> Any:
        return self._reader.skeleton()

    def verify(self, bindings: Mapping[int, torch.Tensor]) -> set[int]:
        return self._reader.verify(bindings)

    def fill(self) -> None:
        self._reader.fill()
        source = self._reader.source
        log_transfer("loaded", source.url, source.size, time.perf_counter() - self._start)

    def close(self) -> None:
        self._reader.close_spool()
        self._reader.source.close()

    def __enter__(self) -> _TimedReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
