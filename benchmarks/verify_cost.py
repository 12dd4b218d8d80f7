"""What checksum verification costs a local load: the same load with every CRC32 check, and
with the checks switched off, one run, as a share of the verified load's time.

Cases (one ~1 GB training state: ``Linear(2048, 2048)`` layers + AdamW moments, saved once):

- ``in place``: the model and optimizer already hold state; the load reads into their tensors
  (every record verified through the file's map first, then copied in);
- ``fresh``: a new model and an optimizer with no state yet, the usual resume; the moments are
  created by the load (each 1 MiB piece hashed right after it is read);

each with a warm page cache (the file just read) and a cold one (the file evicted with
``posix_fadvise(DONTNEED)`` after an ``fsync``, as when a job resumes); and

- ``resume``: what a job restarting after preemption does, in a new process for every load: a
  freshly built model (loaded in place) and an optimizer with no state yet, a cold page cache.
  Only ``Fabric.load`` is timed, in the new process.

"Unverified" replaces the two functions that hash (``torch_file.crc_of_map`` and
``torch_file.crc_into``) with ones that read the same bytes the same way without hashing, so the
difference is the verification and nothing else. This is an experiment switch, not a product
option: loads always verify.

    python benchmarks/verify_cost.py --size-mb 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import harness
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
_PIECE = 1 << 20
_ROWS = [(c, k) for c in ("in place", "fresh") for k in ("warm", "cold")] + [("resume", "cold")]


def build(size_mb: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Linear layers whose parameters and AdamW moments total about ``size_mb`` MB."""
    layer_bytes = 3 * (2048 * 2048 + 2048) * 4  # parameters + two moments, float32
    torch.manual_seed(seed)
    model = nn.Sequential(
        *[nn.Linear(2048, 2048) for _ in range(max(1, round(size_mb * 1e6 / layer_bytes)))]
    )
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()
    return model, optimizer


def checks(enabled: bool) -> None:
    """Switch the two hashing functions of the local load path on or off."""
    from lightweight_ckpt.formats import torch_file, zip_records

    if enabled:
        torch_file.crc_of_map = zip_records.crc_of_map  # type: ignore[attr-defined]
        torch_file.crc_into = zip_records.crc_into  # type: ignore[attr-defined]
        return

    def read_without_hash(source: Any, record: Any, view: memoryview) -> int:
        for start in range(0, record.size, _PIECE):
            source.readinto_at(
                record.offset + start, view[start : min(start + _PIECE, record.size)]
            )
        return int(record.crc)

    def stored_crc(source: Any, mapped: Any, record: Any, release: bool) -> int:
        del source, mapped, release
        return int(record.crc)

    torch_file.crc_of_map = stored_crc  # type: ignore[attr-defined]
    torch_file.crc_into = read_without_hash  # type: ignore[attr-defined]


def timed_load(path: Path, case: str, cache: str, size_mb: float, live: dict[str, Any]) -> float:
    """One load; ``live`` holds the in-place targets (built once)."""
    from lightweight_ckpt import Fabric

    if case == "fresh":
        model, optimizer = build(size_mb, seed=1)
        optimizer.state.clear()
        state: dict[str, Any] = {"model": model, "optimizer": optimizer}
    else:
        state = live
    if cache == "cold":
        harness.drop_page_cache(path)
    else:
        with path.open("rb") as file:
            while file.read(64 * _PIECE):
                pass
    start = time.perf_counter()
    Fabric().load(path, state)
    return time.perf_counter() - start


def resume_worker(path: Path, size_mb: float, verified: bool, result: Path) -> int:
    """One ``resume`` load in this (new) process; writes ``{"seconds": ...}`` to ``result``."""
    from lightweight_ckpt import Fabric

    model, optimizer = build(size_mb, seed=1)
    optimizer.state.clear()
    checks(verified)
    harness.drop_page_cache(path)
    start = time.perf_counter()
    Fabric().load(path, {"model": model, "optimizer": optimizer})
    harness.write_result(result, {"seconds": time.perf_counter() - start})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: repo)")
    parser.add_argument("--resume-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verified", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.resume_worker is not None:
        return resume_worker(args.resume_worker, args.size_mb, bool(args.verified), args.result)
    from lightweight_ckpt import Fabric

    with harness.scratch_dir(args.dir, REPO_ROOT) as scratch:
        info = harness.machine_info(scratch)
        path = scratch / "state.ckpt"
        model, optimizer = build(args.size_mb)
        Fabric().save(path, {"model": model, "optimizer": optimizer})
        live: dict[str, Any] = {"model": model, "optimizer": optimizer}
        times: dict[tuple[str, str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for case in ("in place", "fresh"):
                for cache in ("warm", "cold"):
                    for verified in (True, False):
                        checks(verified)
                        seconds = timed_load(path, case, cache, args.size_mb, live)
                        times.setdefault((case, cache, verified), []).append(seconds)
            for verified in (True, False):
                worker = ["--resume-worker", str(path), "--size-mb", str(args.size_mb)]
                result = harness.run_worker(__file__, [*worker, "--verified", str(int(verified))])
                times.setdefault(("resume", "cold", verified), []).append(result["seconds"])
        checks(True)
        size = path.stat().st_size
    print(
        f"file: {size / 1e6:.0f} MB; rounds: {args.rounds} (median, min-max); machine: "
        f"{info['cpu']}, {info['cores']} cores; torch {torch.__version__}\n"
    )
    rows = []

    def spread(values: list[float]) -> str:
        v = values
        return f"{harness.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"

    for case, cache in _ROWS:
        on, off = times[(case, cache, True)], times[(case, cache, False)]
        cost = harness.median(on) - harness.median(off)
        share = f"{100 * cost / harness.median(on):.0f}%"
        rows.append([case, cache, spread(on), spread(off), f"{cost:.3f}", share])
    headers = ["load", "cache", "verified s", "unverified s", "verification s", "share of load"]
    print(harness.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
