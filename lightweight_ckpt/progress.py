"""Progress bars for long command-line operations, through ``tqdm`` when it is installed.

``tqdm`` is optional (``pip install 'lightweight-ckpt[progress]'``): without it, or when
disabled, ``progress_bar`` hands out a callback that does nothing. The command line enables bars
only when stderr is a terminal and ``--quiet`` is not given, so scripts and logs stay clean.
Library code takes a plain ``Callable[[int], None]`` (bytes done) and never imports tqdm.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger("lightweight_ckpt")


def no_progress(nbytes: int) -> None:
    """Do nothing (the callback when no bar is shown)."""


def wants_progress(quiet: bool, stream: IO[str] | None = None) -> bool:
    """Return True when a bar should be shown: not ``quiet`` and ``stream`` is a terminal."""
    stream = sys.stderr if stream is None else stream
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def progress_bar(
    total_bytes: int, description: str, enabled: bool, stream: IO[str] | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a byte-counting bar on ``stream`` (default stderr).

    With ``enabled`` False, or without tqdm installed, the callback does nothing.
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
    with tqdm(
        total=total_bytes,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr if stream is None else stream,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        yield bar.update
