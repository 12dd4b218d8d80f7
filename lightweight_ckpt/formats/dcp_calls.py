"""Calling ``torch.distributed.checkpoint`` (DCP) from here: its failures as our errors.

DCP raises ``CheckpointException`` (a ``BaseException``) gathering every rank's failure;
``translate`` turns it into one ``CheckpointError`` naming the path (a store that failed for good
is a read or write error, never damage), ``translated`` does the same for a failure of one of
DCP's steps run here on one rank. DCP also warns on every call without a process group, which
is a supported case here (``single_process_ok``). DCP stores each tensor item as a small
``torch.save`` archive; while we write pieces, torch's own zip CRC32s are off
(``without_torch_crc32``), since every item's CRC32 is kept in the piece's record anyway.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
import warnings
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.api import CheckpointException

from lightweight_ckpt.compat import torch_serialization_config
from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StateMismatchError,
)
from lightweight_ckpt.storage import classify_failure, storage_error

if TYPE_CHECKING:
    from collections.abc import Iterator


def distributed() -> bool:
    """True when a process group is up (DCP then runs its collectives)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here.

    Also quiet: torch 2.4's own DCP writer calls ``tensor.storage()``, which warns that
    ``TypedStorage`` is deprecated (nothing the caller can act on).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        # (torch 2.4: "torch.distributed is unavailable or uninitialized, ...")
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable")
        # pieces go to a fresh version folder; overwriting is our own commit, by design
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")
        yield


_CRC_SWITCH = threading.Lock()
_CRC_WRITERS = [0, True]  # our writes in progress; the setting to restore after the last one


@contextlib.contextmanager
def without_torch_crc32() -> Iterator[None]:
    """Turn off the CRC32s ``torch.save`` computes while one of our sharded writes runs.

    DCP writes every tensor item with ``torch.save``, whose zip writer computes each record's
    CRC32 at a fraction of disk speed (about a fifth of a sharded save's time on CPU); the
    pieces' records (``dcp_checksums``) keep ISA-L CRC32s of every item, which are what loads
    check, and ``torch.load`` (stock DCP readers included) does not read torch's. The setting
    is process-wide (``torch.utils.serialization.config``): it is switched off when the first
    of our concurrent writes starts and the user's value is put back when the last one ends.
    On torch without the setting (2.4) this does nothing.
    """
    config = torch_serialization_config
    if config is None:
        yield
        return
    with _CRC_SWITCH:
        if _CRC_WRITERS[0] == 0:
            _CRC_WRITERS[1] = config.save.compute_crc32
            config.save.compute_crc32 = False
        _CRC_WRITERS[0] += 1
    try:
        yield
    finally:
        with _CRC_SWITCH:
            _CRC_WRITERS[0] -= 1
            if _CRC_WRITERS[0] == 0:
                config.save.compute_crc32 = _CRC_WRITERS[1]


def translate(url: str, err: CheckpointException, writing: bool) -> Exception:
    """Turn DCP's ``CheckpointException`` (a BaseException!) into one of our errors."""
    failures = [
        wrapped[0] if isinstance(wrapped, tuple) else wrapped
        for wrapped in getattr(err, "failures", {}).values()
    ]
    for failure in failures:
        if isinstance(failure, CheckpointError):
            return failure
    for failure in failures:  # a store that failed (after retries), not damaged bytes
        if isinstance(failure, BaseException) and classify_failure(failure) is not None:
            return storage_error(url, "writing" if writing else "reading", failure)
    ranks = sorted(getattr(err, "failures", {}))
    detail = "; ".join(f"{type(f).__name__}: {f}" for f in failures) or str(err)
    if writing:
        return CheckpointWriteError(f"{url}: sharded save failed on rank(s) {ranks}: {detail}")
    if "Missing key in checkpoint state_dict" in detail:
        return StateMismatchError(f"{url}: the sharded checkpoint lacks entries: {detail}")
    if any(isinstance(f, FileNotFoundError) for f in failures):
        return CorruptCheckpointError(
            f"{url}: a piece of the sharded checkpoint is missing: {detail}"
        )
    return CorruptCheckpointError(f"{url}: the sharded checkpoint is unreadable: {detail}")


def translated(url: str, err: Exception, step: str) -> Exception:
    """One of DCP's steps (``step``) run here on this rank failed with ``err``: our error."""
    failure = CheckpointException(step, {0: (err, traceback.extract_tb(err.__traceback__))})
    return translate(url, failure, writing=False)
