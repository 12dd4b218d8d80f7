"""What write-behind does for local saves: steady-state saves in one process, with and without.

A training job saves again and again in one long-lived process whose memory has long been
touched. ``save_load.py`` runs every save in a fresh process, where this VM's cost of handing
out never-touched memory (page cache included) dominates and hides the disk. Here one process
builds the state once, saves once untimed, then runs interleaved rounds (the order rotates each
round), deleting each file after its save so every round writes new pages.

Contenders, each ending durable (fsync):

- ``ours``: ``Fabric().save`` as configured by default (direct I/O where the filesystem allows);
- ``ours-4k-pages``: ``ours`` with its direct-I/O buffers on 4 KiB pages, as before they asked
  for huge pages (a pool of its own, so neither reuses the other's buffers);
- ``ours-buffered`` / ``ours-no-wb``: through the page cache (``direct_io=False``), written behind
  at the default ``write_behind_bytes`` and at ``0`` (everything written back at the fsync);
- ``ours-sharded`` / ``ours-sharded-buffered`` / ``ours-sharded-no-wb``: the same three for a
  sharded save in one process (``TorchCheckpointIO.save_sharded``, one DCP piece);
- ``dcp``: ``torch.distributed.checkpoint.save`` with ``FileSystemWriter`` (``sync_files=True``,
  its default), no process group;
- ``raw``: ``os.write`` of every tensor's bytes, then fsync (no serialization at all);
- ``torch``: ``torch.save`` into a file, then fsync.

The table gives the median (min-max) time of the whole save and of the time spent inside
``os.fsync`` (the tail the disk still owed when the last byte was written).

    python benchmarks/write_behind.py --rounds 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness
import save_load
import torch

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]


class FsyncClock:
    """Seconds spent inside ``os.fsync`` while installed (every caller, ours and baselines)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._real = os.fsync

    def __enter__(self) -> FsyncClock:
        def timed(fd: Any) -> None:
            start = time.perf_counter()
            try:
                self._real(fd)
            finally:
                self.seconds += time.perf_counter() - start

        os.fsync = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


def contenders(
    model: torch.nn.Module, opt: torch.optim.Optimizer
) -> dict[str, Callable[[Path], None]]:
    """``{name: save(path)}``."""
    import torch.distributed.checkpoint as dcp

    from lightweight_ckpt import Fabric, config, local_files
    from lightweight_ckpt.io import TorchCheckpointIO

    fabric = Fabric()
    state = {"model": model, "optimizer": opt, "step": save_load.SAVED_STEP}

    def ours(**changes: Any) -> Callable[[Path], None]:
        def save(path: Path) -> None:
            with config.override(**changes):
                fabric.save(path, state)

        return save

    small_pages = local_files._BufferPool(kept=4)

    def ours_4k_pages(path: Path) -> None:
        pool, huge = local_files._POOL, local_files._HUGE_PAGE_BYTES
        local_files._POOL, local_files._HUGE_PAGE_BYTES = small_pages, 1 << 62
        try:
            fabric.save(path, state)
        finally:
            local_files._POOL, local_files._HUGE_PAGE_BYTES = pool, huge

    def ours_sharded(**changes: Any) -> Callable[[Path], None]:
        def save(path: Path) -> None:
            io = TorchCheckpointIO()
            flat = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            with config.override(**changes):
                io.prepare_sharded(str(path), "v-bench")
                io.save_sharded(flat, str(path), "v-bench")

        return save

    def dcp_save(path: Path) -> None:
        flat = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)

    def raw(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _name, tensor in save_load.state_tensors(model, opt):
                save_load._write_all(fd, save_load._byte_view(tensor))
            os.fsync(fd)
        finally:
            os.close(fd)

    def torch_save(path: Path) -> None:
        with open(path, "wb") as file:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)
            file.flush()
            os.fsync(file.fileno())

    return {
        "ours": ours(),
        "ours-4k-pages": ours_4k_pages,
        "ours-buffered": ours(direct_io=False),
        "ours-no-wb": ours(direct_io=False, write_behind_bytes=0),
        "ours-sharded": ours_sharded(),
        "ours-sharded-buffered": ours_sharded(direct_io=False),
        "ours-sharded-no-wb": ours_sharded(direct_io=False, write_behind_bytes=0),
        "dcp": dcp_save,
        "raw": raw,
        "torch": torch_save,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=None, help="state size (default ~1493)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--contenders", default="", help="comma list (default: all)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    cfg = save_load.config_for_size(args.size_mb)
    model, opt = save_load.build_state(cfg)
    saves = contenders(model, opt)
    names = harness.parse_contenders(args.contenders, saves) if args.contenders else list(saves)
    totals: dict[str, list[float]] = {name: [] for name in names}
    tails: dict[str, list[float]] = {name: [] for name in names}
    with harness.scratch_dir(args.dir, REPO_ROOT) as folder:
        print(f"state: {cfg.state_bytes() / 1e6:.0f} MB; rounds: {args.rounds}; {folder}")
        saves[names[0]](folder / "warm-up")  # untimed: the process's memory is touched once
        harness.remove_path(folder / "warm-up")
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                path = folder / f"{name}.ckpt"
                with FsyncClock() as clock:
                    start = time.perf_counter()
                    saves[name](path)
                    totals[name].append(time.perf_counter() - start)
                tails[name].append(clock.seconds)
                harness.remove_path(path)
                print(f"round {round_index + 1} {name:>18} {totals[name][-1]:.2f}s", flush=True)
                time.sleep(0.5)

    def spread(values: list[float]) -> str:
        return f"{harness.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    base = harness.median(totals["raw"]) if "raw" in totals else None
    rows = [
        [
            name,
            spread(totals[name]),
            f"{harness.median(totals[name]) / base:.2f}x" if base else "-",
            spread(tails[name]),
        ]
        for name in names
    ]
    print(f"machine: {harness.machine_info(REPO_ROOT)}")
    print(harness.markdown_table(["contender", "save s", "vs raw", "in fsync s"], rows))


if __name__ == "__main__":
    main()
