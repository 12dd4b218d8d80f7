"""Progress bars for long operations and remote transfers, through ``tqdm`` when installed.

``tqdm`` is optional (``pip install 'lightweight-ckpt[progress]'``): without it, or when
disabled, ``progress_bar`` hands out a callback that does nothing. The command line enables bars
only when stderr is a terminal and ``--quiet`` is not given, so scripts and logs stay clean.
Library code takes a plain ``Callable[[int], None]`` (bytes done) and never imports tqdm.

``transfer_bar`` is the storage layer's: a bar for one remote upload or download, shown after
``TRANSFER_DELAY_S`` (short transfers show none), as ``LWCKPT_PROGRESS`` says (``config``):
``auto`` (the default) when stderr is a terminal, ``on`` always, ``off`` never.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from typing import IO, TYPE_CHECKING

from lightweight_ckpt.config import settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger("lightweight_ckpt")

TRANSFER_DELAY_S = 1.0  # a transfer's bar appears only once it has run this long


def no_progress(nbytes: int) -> None:
    """Do nothing (the callback when no bar is shown)."""


def wants_progress(quiet: bool, stream: IO[str] | None = None) -> bool:
    """Return True when a bar should be shown: not ``quiet`` and ``stream`` is a terminal."""
    stream = sys.stderr if stream is None else stream
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


def transfers_shown(stream: IO[str] | None = None) -> bool:
    """Return True when remote transfers show a bar (``LWCKPT_PROGRESS``: auto, on, off)."""
    mode = settings().progress
    return mode == "on" or (mode == "auto" and wants_progress(False, stream))


@contextlib.contextmanager
def transfer_bar(description: str) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe byte callback for one remote transfer's bar (see the docstring)."""
    with progress_bar(None, description, transfers_shown(), delay_s=TRANSFER_DELAY_S) as advance:
        yield advance


@contextlib.contextmanager
def progress_bar(
    total_bytes: int | None,
    description: str,
    enabled: bool,
    stream: IO[str] | None = None,
    delay_s: float = 0.0,
) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a byte-counting bar on ``stream`` (default stderr).

    ``total_bytes`` None counts bytes and their rate without a total. The callback may be
    called from several threads. With ``enabled`` False, or without tqdm installed, it does
    nothing.
    """
    if not enabled:
        yield no_progress
        return
    try:
        tqdm = importlib.import_module("tqdm").tqdm  # optional (and untyped): loaded when used
    except ImportError:
        log.debug("no progress bar: pip install 'lightweight-ckpt[progress]' for one")
        yield no_progress
        return
    lock = threading.Lock()
    with tqdm(
        total=total_bytes,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr if stream is None else stream,
        leave=False,
        dynamic_ncols=True,
        delay=delay_s,
    ) as bar:

        def advance(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        yield advance
