"""The least a verified warm in-place load can cost on this machine, pass by pass.

A warm in-place load copies the file's cached pages into the caller's tensors. Verifying every
byte first (all or nothing: no target changes before every CRC32 matched) adds one read pass over
the same pages. This measures, on one cached file read through a memory map as the load reads it,
with the load's thread count, each pass alone:

- ``read (sum)``: the cheapest possible pass over every byte (an int64 sum): no checksum, however
  fast, can cost less than this;
- ``CRC32``: the CRC32 pass our loads run (ISA-L where installed, as ``zip_records.crc32``);
- ``copy``: the copy into existing tensors (what an unverified in-place load does);
- ``fused copy + CRC32``: copy each 1 MiB piece, then hash it from the CPU cache. This is what
  an in-place load *without* the all-or-nothing promise could do; it is not a product option.

The shares printed are each verification pass against the copy it is added to.

    python benchmarks/verify_floor.py --size-mb 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import harness
import torch

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
_WINDOW = 16 << 20
_PIECE = 1 << 20


def on_threads(threads: int, size: int, work: Callable[[int, int], None]) -> float:
    """Time ``work(start, end)`` over ``_WINDOW``-sized windows split between ``threads``."""
    windows = [(s, min(s + _WINDOW, size)) for s in range(0, size, _WINDOW)]
    shares = [windows[i::threads] for i in range(threads)]

    def run(mine: list[tuple[int, int]]) -> None:
        for start, end in mine:
            work(start, end)

    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began


def passes(path: Path, threads: int) -> dict[str, float]:
    """One timing of each pass over the cached ``path``."""
    size = path.stat().st_size - path.stat().st_size % 8
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        return _timed_passes(mapped, size, threads)
    finally:
        mapped.close()  # the pass tensors are gone with their frame: nothing exports the map


def _timed_passes(mapped: mmap.mmap, size: int, threads: int) -> dict[str, float]:
    from lightweight_ckpt.formats.zip_records import crc32

    view = memoryview(mapped)
    words = torch.frombuffer(mapped, dtype=torch.int64)
    source = torch.frombuffer(mapped, dtype=torch.uint8)
    target = torch.ones(size, dtype=torch.uint8)
    target_view = memoryview(target.numpy())

    def fused(start: int, end: int) -> None:
        for piece in range(start, end, _PIECE):
            stop = min(piece + _PIECE, end)
            target[piece:stop].copy_(source[piece:stop])
            crc32(target_view[piece:stop], 0)

    try:
        return {
            "read (sum)": on_threads(threads, size, lambda s, e: words[s // 8 : e // 8].sum()),
            "CRC32": on_threads(threads, size, lambda s, e: crc32(view[s:e], 0)),
            "copy": on_threads(threads, size, lambda s, e: target[s:e].copy_(source[s:e])),
            "fused copy + CRC32": on_threads(threads, size, fused),
        }
    finally:
        view.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: repo)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    from lightweight_ckpt.config import settings

    torch.set_num_threads(1)  # the load's own threads do the work, one core each
    threads = settings().io_threads
    with harness.scratch_dir(args.dir, REPO_ROOT) as scratch:
        info = harness.machine_info(scratch)
        path = scratch / "pages.bin"
        with path.open("wb") as file:
            for _ in range(max(1, round(args.size_mb * 1e6 / _WINDOW))):
                file.write(os.urandom(_WINDOW))
        harness.warm_page_cache(path)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, seconds in passes(path, threads).items():
                times.setdefault(name, []).append(seconds)
        size = path.stat().st_size
    copy = harness.median(times["copy"])
    rows = []
    for name, values in times.items():
        median = harness.median(values)
        added = median if name in ("read (sum)", "CRC32") else median - copy
        share = "-" if name == "copy" else f"{100 * added / (copy + added):.0f}%"
        rows.append([name, f"{median:.3f} ({min(values):.3f}-{max(values):.3f})", share])
    print(
        f"file: {size / 1e6:.0f} MB, cached; {threads} threads; rounds: {args.rounds}; machine: "
        f"{info['cpu']}, {info['cores']} cores; torch {torch.__version__}\n"
    )
    headers = ["pass", "median s (min-max)", "verification share of a verified load"]
    print(harness.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
