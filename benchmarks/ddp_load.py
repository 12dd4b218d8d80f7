"""DDP load: every rank reads the file, or rank 0 reads it once and shares it (world size 2).

A DDP checkpoint is one file (written by rank 0). Approaches to loading it:

- ``every-rank``: every rank reads the file (on local disk each rank maps it and reads from the
  one shared page-cache copy; on an object store each rank downloads what it reads);
- ``read-once``: rank 0 reads and verifies the file, the checkpoint is broadcast
  (``collectives.broadcast_tree``) and every rank restores from its copy;
- ``state-broadcast``: a prototype: rank 0 loads the file into its model and optimizer, then
  every state tensor is broadcast into the other ranks' live tensors.

``DDPStrategy`` (``Fabric().load``) does ``every-rank`` on local disk and ``read-once`` elsewhere;
the first two rows force one or the other through a ``DDPStrategy`` subclass.

The file lives on local disk, or on the test suite's local S3 server (moto on 127.0.0.1) with
``--locations local,s3``. Every (round, location, approach) runs in a fresh group of 2 processes
(torchrun, gloo, CPU), after the state is perturbed; the load is checked against the saved
digest. Reported: the slower rank's time (median over rounds) and the peak extra RSS per rank.
A first load of the file in each group is untimed (warm cache and connections, as a resumed
run that loads once is not; read the figures as steady state).

Run ``python benchmarks/ddp_load.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
WORLD_SIZE = 2
MB = 1_000_000
APPROACHES = ("every-rank", "read-once", "state-broadcast")
LOCATIONS = ("local", "s3")


def build_state(size_mb: float, seed: int) -> tuple[Any, Any]:
    """An MLP + AdamW after one step, ~``size_mb`` MB in all (params, exp_avg, exp_avg_sq)."""
    import torch
    from torch import nn

    d = max(64, round((size_mb * MB / 12 / 4) ** 0.5 / 64) * 64)
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(d, d) for _ in range(4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, d)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: Any, opt: Any) -> list[Any]:
    """Every tensor of the training state, in a fixed order."""
    import torch

    out = [p.detach() for p in model.parameters()]
    for param in model.parameters():
        out += [v for _, v in sorted(opt.state[param].items()) if isinstance(v, torch.Tensor)]
    return out


def digest(model: Any, opt: Any) -> str:
    """SHA-1 over every state tensor's bytes."""
    sha = hashlib.sha1(usedforsecurity=False)
    for tensor in state_tensors(model, opt):
        sha.update(tensor.contiguous().numpy().tobytes())
    return sha.hexdigest()


def _strategy(read_once: bool) -> Any:
    from lightweight_ckpt import collectives
    from lightweight_ckpt.io import LoadedReader
    from lightweight_ckpt.strategies import DDPStrategy

    class EveryRank(DDPStrategy):
        def read_shared(self, *args: Any) -> Any:
            return None

    class ReadOnce(DDPStrategy):
        def read_shared(self, path: Any, weights_only: Any, storage_options: Any) -> Any:
            def download() -> Any:
                if not self.is_global_zero:
                    return None
                with self.checkpoint_io.open_checkpoint(
                    path, weights_only=weights_only, storage_options=storage_options
                ) as reader:
                    checkpoint = reader.skeleton()
                    reader.verify({})
                    reader.fill()
                return checkpoint

            checkpoint = self.run_on_all_ranks("read once", download)
            return LoadedReader(collectives.broadcast_tree(checkpoint))

    return ReadOnce() if read_once else EveryRank()


def _load_with(read_once: bool) -> Any:
    def load(url: str, model: Any, opt: Any, options: dict[str, Any]) -> None:
        from lightweight_ckpt import Fabric

        state = {"model": model, "optimizer": opt}
        Fabric(strategy=_strategy(read_once)).load(url, state, storage_options=options or None)

    return load


def _load_broadcast(url: str, model: Any, opt: Any, options: dict[str, Any]) -> None:
    import torch.distributed as dist

    from lightweight_ckpt.io import TorchCheckpointIO

    if dist.get_rank() == 0:
        checkpoint = TorchCheckpointIO(options).load_checkpoint(url)
        model.module.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        del checkpoint
    for tensor in state_tensors(model.module, opt):
        dist.broadcast(tensor, src=0)


def rank_worker(args: argparse.Namespace) -> None:
    """Perturb, load (timed), check; rank 0 writes the merged result."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        options = json.loads(args.options)
        model, opt = build_state(args.size_mb, seed=7)
        ddp = DistributedDataParallel(model)
        load = {
            "every-rank": _load_with(read_once=False),
            "read-once": _load_with(read_once=True),
            "state-broadcast": _load_broadcast,
        }[args.approach]
        load(args.url, ddp, opt, options)  # warm-up
        with torch.no_grad():
            for tensor in state_tensors(model, opt):
                tensor.add_(1.0)

        def op() -> None:
            load(args.url, ddp, opt, options)
            dist.barrier()

        dist.barrier()
        measurement, _ = harness.measure(op)
        ok = digest(model, opt) == args.expected
        mine = {"rank": dist.get_rank(), "ok": ok, **measurement.to_json()}
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if not all(r["ok"] for r in ranks):
            raise AssertionError(f"{args.approach}: the load did not restore the saved state")
        if dist.get_rank() == 0:
            result = {"ranks": ranks, "seconds": max(r["seconds"] for r in ranks)}
            harness.write_result(args.result, result)
        dist.barrier()
        ddp = None  # before the group goes (a torch 2.13 exit deadlock otherwise; see the examples)
    finally:
        dist.destroy_process_group()


def launch(argv: list[str]) -> int:
    """Start the two rank workers with torchrun (local rendezvous)."""
    from torch.distributed import run as torchrun

    log_dir = Path(tempfile.mkdtemp(prefix="ddp-load-logs-"))
    try:
        torchrun.main(
            [
                "--standalone",
                f"--nproc-per-node={WORLD_SIZE}",
                "--max-restarts=0",
                f"--log-dir={log_dir}",
                "--redirects=3",
                str(SCRIPT),
                "--rank-worker",
                *argv,
            ]
        )
    except Exception as exc:  # noqa: BLE001 - torchrun's ChildFailedError: show the ranks' logs
        print(f"torchrun: {type(exc).__name__}", file=sys.stderr)
        for log in sorted(log_dir.rglob("*.log")):
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        harness.remove_path(log_dir)
    return 0


def _save_file(url: str, size_mb: float, options: dict[str, Any]) -> str:
    """Write the checkpoint (one process, the single-file format DDP uses); return its digest."""
    from lightweight_ckpt import Fabric

    model, opt = build_state(size_mb, seed=1)
    Fabric().save(url, {"model": model, "optimizer": opt}, storage_options=options or None)
    return digest(model, opt)


def _locations(args: argparse.Namespace, data_dir: Path, stack: Any) -> dict[str, Any]:
    """``{location: (url, fsspec options)}``; S3 is the test suite's moto server."""
    found: dict[str, Any] = {}
    for name in args.locations.split(","):
        if name == "local":
            found[name] = (str(data_dir / "ddp.ckpt"), {})
        elif name == "s3":
            import fsspec

            sys.path.insert(0, str(REPO_ROOT))
            from tests.helpers import servers

            server = stack.enter_context(servers.running(servers.start_moto, data_dir))
            options = servers.s3_storage_options(server.endpoint)
            bucket = servers.create_bucket(fsspec.filesystem("s3", **options), "s3")
            found[name] = (f"s3://{bucket}/ddp.ckpt", options)
        else:
            raise SystemExit(f"unknown location {name!r}; choose from {', '.join(LOCATIONS)}")
    return found


def _row(location: str, approach: str, runs: list[dict[str, Any]]) -> list[str]:
    seconds = [run["seconds"] for run in runs]
    ranks = [rank for run in runs for rank in run["ranks"]]

    def worst(key: str, rank: int) -> str:
        return f"{max(r[key] for r in ranks if r['rank'] == rank) / harness.MIB:.0f}"

    return [
        location,
        approach,
        f"{harness.median(seconds):.3f}",
        f"{min(seconds):.3f}-{max(seconds):.3f}",
        *(worst("peak_extra_rss", k) for k in range(WORLD_SIZE)),
        *(worst("peak_extra_anon", k) for k in range(WORLD_SIZE)),
    ]


def orchestrate(args: argparse.Namespace) -> int:
    """Save once per location, then time each approach's load in fresh groups, interleaved."""
    import contextlib

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with harness.scratch_dir(args.dir, REPO_ROOT) as data_dir, contextlib.ExitStack() as stack:
        for location, (url, options) in _locations(args, data_dir, stack).items():
            expected = _save_file(url, args.size_mb, options)
            results: dict[str, list[dict[str, Any]]] = {a: [] for a in APPROACHES}
            for rnd in range(args.rounds):
                shift = rnd % len(APPROACHES)
                order = APPROACHES[shift:] + APPROACHES[:shift]
                for approach in order:
                    res = harness.run_worker(
                        SCRIPT,
                        [
                            "--launch",
                            "--approach",
                            approach,
                            "--url",
                            url,
                            "--options",
                            json.dumps(options),
                            "--expected",
                            expected,
                            "--size-mb",
                            str(args.size_mb),
                        ],
                        extra_pythonpath=[REPO_ROOT],
                    )
                    results[approach].append(res)
                    print(
                        f"{location} round {rnd + 1} {approach}: {res['seconds']:.3f} s",
                        file=sys.stderr,
                    )
            for approach, runs in results.items():
                rows.append(_row(location, approach, runs))
    print(
        f"DDP load, world size {WORLD_SIZE} (gloo, CPU), state ~{args.size_mb:.0f} MB, "
        f"rounds: {args.rounds}\n"
    )
    headers = ["location", "approach", "median s", "min-max s"]
    headers += [f"peak extra RSS MiB rank {k}" for k in range(WORLD_SIZE)]
    headers += [f"peak extra anon MiB rank {k}" for k in range(WORLD_SIZE)]
    print(harness.markdown_table(headers, rows))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options for the orchestrator, the launcher and the rank workers."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--size-mb", type=float, default=200.0, help="state size in MB (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows the median")
    p.add_argument(
        "--locations", default="local", help="comma list of: local, s3 (the local moto server)"
    )
    p.add_argument("--dir", type=Path, default=None, help="scratch directory")
    internal = p.add_argument_group("internal")
    internal.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--approach", choices=APPROACHES, help=argparse.SUPPRESS)
    internal.add_argument("--url", help=argparse.SUPPRESS)
    internal.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    internal.add_argument("--expected", help=argparse.SUPPRESS)
    internal.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Orchestrator by default; ``--launch`` starts torchrun; ``--rank-worker`` is one rank."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rank_worker:
        rank_worker(args)
        harness.exit_rank_worker()
    if args.launch:
        return launch([a for a in argv if a != "--launch"])
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
