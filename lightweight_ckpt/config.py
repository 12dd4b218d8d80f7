"""Tunables, in one place: each has a default, an environment override and a test override.

``LWCKPT_IO_THREADS``: threads that verify and read records in parallel (default: up to 4, one
per CPU core). ``LWCKPT_CHUNK_BYTES``: the largest single read or remote write (default 16 MiB).

Retries of remote reads, saves and commits after a transient failure (connection reset, timeout,
5xx, throttling), on top of the clients' own (see ``storage``): ``LWCKPT_RETRY_ATTEMPTS`` tries
in all (default 4; 1 turns our retries off), ``LWCKPT_RETRY_BACKOFF_S`` the first backoff (default
0.5 s; doubling, full jitter, capped at 30 s), ``LWCKPT_RETRY_DEADLINE_S`` after which no new
attempt starts (default 300 s).

``LWCKPT_SPOOL_DIR``: where a remote in-place load keeps the bytes it verified, so that they are
downloaded once (default: the system's temporary directory; ``none`` downloads twice instead).
The spool is an unnamed file, gone when the load ends or the process dies; it is not used on a
RAM-backed filesystem (tmpfs) or where free space is short.

    with config.override(io_threads=1):
        fabric.load(path, state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True)
class Settings:
    """The tunables in force."""

    io_threads: int
    chunk_bytes: int
    retry_attempts: int = 4
    retry_backoff_s: float = 0.5
    retry_deadline_s: float = 300.0
    spool_dir: str = ""


def _from_env() -> Settings:
    return Settings(
        io_threads=max(
            1, int(os.environ.get("LWCKPT_IO_THREADS", str(min(4, os.cpu_count() or 1))))
        ),
        chunk_bytes=max(1 << 16, int(os.environ.get("LWCKPT_CHUNK_BYTES", str(16 << 20)))),
        retry_attempts=max(1, int(os.environ.get("LWCKPT_RETRY_ATTEMPTS", "4"))),
        retry_backoff_s=max(0.0, float(os.environ.get("LWCKPT_RETRY_BACKOFF_S", "0.5"))),
        retry_deadline_s=max(0.0, float(os.environ.get("LWCKPT_RETRY_DEADLINE_S", "300"))),
        spool_dir=os.environ.get("LWCKPT_SPOOL_DIR", ""),
    )


_current: list[Settings] = [_from_env()]


def settings() -> Settings:
    """Return the tunables in force."""
    return _current[-1]


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change tunables inside a ``with`` block (tests, benchmarks)."""
    _current.append(dataclasses.replace(_current[-1], **changes))
    try:
        yield _current[-1]
    finally:
        _current.pop()
