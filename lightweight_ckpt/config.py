"""Tunables, in one place: each has a default, an environment override and a test override.

``LWCKPT_IO_THREADS``: threads that verify and read records in parallel (default: up to 4, one
per CPU core). ``LWCKPT_CHUNK_BYTES``: the largest single read or remote write (default 16 MiB).

    with config.override(io_threads=1):
        fabric.load(path, state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True)
class Settings:
    """The tunables in force."""

    io_threads: int
    chunk_bytes: int


def _from_env() -> Settings:
    return Settings(
        io_threads=max(
            1, int(os.environ.get("LWCKPT_IO_THREADS", str(min(4, os.cpu_count() or 1))))
        ),
        chunk_bytes=max(1 << 16, int(os.environ.get("LWCKPT_CHUNK_BYTES", str(16 << 20)))),
    )


_current: list[Settings] = [_from_env()]


def settings() -> Settings:
    """Return the tunables in force."""
    return _current[-1]


@contextlib.contextmanager
def override(**changes: int) -> Iterator[Settings]:
    """Change tunables inside a ``with`` block (tests, benchmarks)."""
    _current.append(dataclasses.replace(_current[-1], **changes))
    try:
        yield _current[-1]
    finally:
        _current.pop()
