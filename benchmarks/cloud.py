"""Object-store saves and in-place loads: lightweight_ckpt vs plain s3fs/gcsfs, one run, ratios.

The servers are the test suite's: moto (S3) and fake-gcs-server (GCS), each its own process on
127.0.0.1 (tests/helpers/servers.py). Every (contender, op) runs in a fresh worker process that
builds the same deterministic state (Linear layers + AdamW moments), measures one call with
``harness.measure`` (wall time, peak extra client RSS) and checks the loaded values bitwise.

Loads restore in place into a live model and optimizer:

- ``ours``: ``Fabric().load(url, state)``: CRC-verified reads as ``io_threads`` streams (one
  ranged GET each on S3, read in ``chunk_bytes`` pieces), bound tensors spooled, then copied
  into their memory (see formats/torch_file.py, formats/ranges.py);
- ``ours-64MiB``: the same with ``LWCKPT_CHUNK_BYTES`` = 64 MiB (larger pieces per stream);
- ``ours-nospool``: the same with ``LWCKPT_SPOOL_DIR=none``: no local spool, so the bound
  tensors are fetched twice (verified first, then read into their memory and checked again);
- ``ours-old``: the path before ranged in-place loads: read the whole checkpoint into new
  tensors (verified), then copy them in (``TorchCheckpointIO.load_checkpoint`` +
  ``load_state_dict``);
- ``cat+torch.load``: ``fs.cat_file`` the object, ``torch.load`` the bytes, ``load_state_dict``.

- ``lightning``: ``lightning.fabric.Fabric(accelerator="cpu", devices=1).load(url, state)``.

Plain transfers of the same bytes (the issue's throughput target): ``cat (bytes)`` (``fs.cat_file``
alone, nothing deserialized), ``pipe (bytes)`` and ``open+write (bytes)`` (the checkpoint
serialized before the clock starts, then ``fs.pipe`` or written in 8 MiB slices to ``fs.open(url,
"wb")``). "vs best bytes" divides by the fastest of them.

Saves: ``ours`` (``Fabric().save``: streamed multipart on S3, parallel components composed on
GCS; atomic), ``open+torch.save``
(``torch.save`` into ``fs.open(url, "wb")``: streamed, not atomic), ``pipe+torch.save``
(``torch.save`` into a BytesIO, then ``fs.pipe``), ``lightning``
(``lightning.fabric.Fabric(accelerator="cpu", devices=1).save(url, state)``).

Lightning's ``save``/``load`` take no storage options: its worker hands the server's options to
fsspec's own per-protocol defaults (``fsspec.config.conf``), which every filesystem it creates
picks up. A contender that cannot run (``lightning`` not installed, or it refuses the URL) is
recorded with its error in place of a time, as benchmarks/sharded.py records refusals.

    python benchmarks/cloud.py --size-mb 512 --stores s3,gs
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness
import torch
from stores import options_for
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 10**6
SEED = 1234
LOADS = (
    "ours",
    "ours-64MiB",
    "ours-nospool",
    "ours-old",
    "cat+torch.load",
    "lightning",
    "cat (bytes)",
)
SAVES = ("ours", "open+torch.save", "pipe+torch.save", "lightning", "pipe (bytes)",
         "open+write (bytes)")  # fmt: skip
# Plain transfers of the checkpoint's bytes alone: serialized before the clock starts (saves),
# or downloaded and not deserialized (loads). The throughput target is against these.
BYTES_ONLY = ("pipe (bytes)", "open+write (bytes)", "cat (bytes)")
_WRITE_SLICE = 8 * 2**20


def build_state(size_mb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Linear(d, d) layers whose params + AdamW moments come to about ``size_mb`` MB."""
    width = 2048
    layer_bytes = 3 * (width * width + width) * 4  # weight, bias, and two moments of each
    layers = max(1, round(size_mb * MB / layer_bytes))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, width)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for tensor in state_tensors(model, optimizer):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter and AdamW moment, in a fixed order."""
    out: list[torch.Tensor] = list(model.parameters())
    for param in model.parameters():
        moments = optimizer.state[param]
        out += [moments["exp_avg"], moments["exp_avg_sq"]]
    return out


def digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-1 over every state tensor's bytes."""
    sha = hashlib.sha1(usedforsecurity=False)
    for tensor in state_tensors(model, optimizer):
        sha.update(tensor.detach().numpy().tobytes())
    return sha.hexdigest()


def run_worker_op(args: argparse.Namespace) -> dict[str, Any]:
    """One measured save or load in this (fresh) process."""
    import fsspec

    options = options_for(args.store, args.endpoint)
    fs, path = fsspec.core.url_to_fs(args.url, **options)
    model, optimizer = build_state(args.size_mb)
    expected = digest(model, optimizer)
    if args.op == "load":
        with torch.no_grad():
            for tensor in state_tensors(model, optimizer):
                tensor.add_(1.0)
        if digest(model, optimizer) == expected:
            raise SystemExit("perturbing the state changed nothing")
    if args.contender in BYTES_ONLY:
        transfer, expected_size = _bytes_transfer(args, fs, path, model, optimizer)
        measurement, _ = harness.measure(transfer)
        if fs.info(path)["size"] != expected_size():
            raise SystemExit(f"{args.contender}: transferred size differs from the object's")
    else:
        op = _contender_op(args, options, fs, path, model=model, optimizer=optimizer)
        measurement, _ = harness.measure(op)
        if args.op == "load" and digest(model, optimizer) != expected:
            raise SystemExit(f"{args.contender}: the loaded state differs from the saved one")
    nbytes = sum(t.numel() * t.element_size() for t in state_tensors(model, optimizer))
    return {**measurement.to_json(), "state_bytes": nbytes}


def _bytes_transfer(
    args: argparse.Namespace,
    fs: Any,
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[Callable[[], None], Callable[[], int]]:
    """A plain transfer of the checkpoint's bytes, and the object size it must leave."""
    if args.op == "load":
        fetched: list[int] = []
        return lambda: fetched.append(len(fs.cat_file(path))), lambda: sum(fetched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    payload = buffer.getvalue()
    del buffer

    def upload() -> None:
        if args.contender == "pipe (bytes)":
            fs.pipe_file(path, payload)
            return
        view = memoryview(payload)
        with fs.open(path, "wb") as file:
            for start in range(0, len(view), _WRITE_SLICE):
                file.write(view[start : start + _WRITE_SLICE])

    return upload, lambda: len(payload)


def _contender_op(
    args: argparse.Namespace,
    options: dict[str, Any],
    fs: Any,
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Callable[[], None]:
    """The measured call of ``args.contender`` for ``args.op`` (save or in-place load)."""
    from lightweight_ckpt import Fabric
    from lightweight_ckpt.config import override
    from lightweight_ckpt.io import TorchCheckpointIO

    state = {"model": model, "optimizer": optimizer}
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    lightning = _lightning_fabric(args.store, options) if args.contender == "lightning" else None

    def save() -> None:
        if lightning is not None:
            lightning.save(args.url, state)
        elif args.contender == "ours":
            Fabric().save(args.url, state, storage_options=options)
        elif args.contender == "open+torch.save":
            with fs.open(path, "wb") as file:
                torch.save(checkpoint, file)
        else:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            fs.pipe_file(path, buffer.getvalue())

    def load() -> None:
        if lightning is not None:
            lightning.load(args.url, state)
            return
        if args.contender in ("ours", "ours-64MiB", "ours-nospool"):
            changes: dict[str, Any] = {
                "ours": {},
                "ours-64MiB": {"chunk_bytes": 64 * 2**20},
                "ours-nospool": {"spool_dir": "none"},
            }
            with override(**changes[args.contender]):
                Fabric().load(args.url, state, storage_options=options)
            return
        if args.contender == "ours-old":
            loaded = TorchCheckpointIO(options).load_checkpoint(args.url)
        else:
            loaded = torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])

    return save if args.op == "save" else load


def _lightning_fabric(store: str, options: dict[str, Any]) -> Any:
    """Lightning Fabric on one CPU device, its filesystems reaching the local server.

    Exits with the import error when ``lightning`` is missing (recorded as the result).
    """
    import fsspec

    try:
        from lightning.fabric import Fabric as LightningFabric
    except ImportError as exc:
        raise SystemExit(f"cannot import lightning.fabric: {type(exc).__name__}: {exc}") from exc
    for protocol in ("s3", "s3a") if store == "s3" else ("gs", "gcs"):
        fsspec.config.conf[protocol] = dict(options)
    return LightningFabric(accelerator="cpu", devices=1)


def _worker_args(args: argparse.Namespace, **fields: str) -> list[str]:
    out = ["--worker", "--size-mb", str(args.size_mb)]
    for key, value in fields.items():
        out += [f"--{key}", value]
    return out


def run_store(store: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """All contenders against one local server; return one row per (op, contender)."""
    import fsspec

    from tests.helpers.servers import create_bucket, running, start_fake_gcs, start_moto

    rows = []
    with running(start_moto if store == "s3" else start_fake_gcs, log_dir) as server:
        options = options_for(store, server.endpoint)
        bucket = create_bucket(fsspec.filesystem(store, **options), store)
        common = {"store": store, "endpoint": server.endpoint}
        ops, picked = args.ops.split(","), args.contenders.split(",")
        saves_ours = "save" in ops and (not args.contenders or "ours" in picked)
        if "load" in ops and not saves_ours:  # the loads read what ``ours`` saves: save it once
            print(f"[{store}] setup: save ours (not measured)", file=sys.stderr)
            harness.run_worker(
                Path(__file__),
                _worker_args(
                    args, **common, url=f"{store}://{bucket}/ours.ckpt", op="save", contender="ours"
                ),
                extra_pythonpath=[REPO_ROOT],
            )
        for op, names in (("save", SAVES), ("load", LOADS)):
            if op not in ops:
                continue
            chosen = [n for n in names if not args.contenders or n in picked]
            for rnd in range(args.rounds):  # contenders interleaved, so drift hits them alike
                for name in chosen:
                    url = f"{store}://{bucket}/{'ours' if op == 'load' else name}.ckpt"
                    print(f"[{store}] round {rnd + 1}: {op} {name}", file=sys.stderr)
                    try:
                        result = harness.run_worker(
                            Path(__file__),
                            _worker_args(args, **common, url=url, op=op, contender=name),
                            extra_pythonpath=[REPO_ROOT],
                        )
                    except harness.WorkerError as exc:
                        if name != "lightning":
                            raise
                        result = {"error": _last_line(str(exc))}
                        print(f"[{store}] {op} {name} failed: {result['error']}", file=sys.stderr)
                    rows.append({"store": store, "op": op, "contender": name, **result})
    return rows


def _last_line(text: str) -> str:
    """The last non-empty line of a worker's failure (the exception it ended with)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else text[:300]


def summarize(rows: list[dict[str, Any]]) -> list[list[object]]:
    """Median time and worst peak per (store, op, contender), with ratios to the baseline.

    A contender whose every run failed gets one row with its error instead of numbers.
    """
    table: list[list[object]] = []
    keys = sorted({(r["store"], r["op"], r["contender"]) for r in rows}, key=_order)
    done = [r for r in rows if "error" not in r]
    medians = {
        key: harness.median(
            [r["seconds"] for r in done if (r["store"], r["op"], r["contender"]) == key]
        )
        for key in keys
        if any((r["store"], r["op"], r["contender"]) == key for r in done)
    }
    for key in keys:
        store, op, name = key
        runs = [r for r in done if (r["store"], r["op"], r["contender"]) == key]
        if not runs:
            error = next(r["error"] for r in rows if (r["store"], r["op"], r["contender"]) == key)
            table.append([store, op, name, f"failed: {error}", "", "", "", "", ""])
            continue
        state = runs[0]["state_bytes"]
        peak = max(r["peak_extra_rss"] for r in runs)
        base = medians.get((store, op, "cat+torch.load" if op == "load" else "pipe+torch.save"))
        transfers = [medians[(store, op, n)] for n in BYTES_ONLY if (store, op, n) in medians]
        table.append(
            [
                store,
                op,
                name,
                f"{medians[key]:.2f}",
                f"{state / MB / medians[key]:.0f}",
                f"{medians[key] / base:.2f}" if base else "",
                f"{medians[key] / min(transfers):.2f}" if transfers else "",
                f"{peak / harness.MIB:.0f}",
                f"{100 * peak / state:.0f}%",
            ]
        )
    return table


def _order(key: tuple[str, str, str]) -> tuple[str, int, int]:
    store, op, name = key
    names = SAVES if op == "save" else LOADS
    return store, 0 if op == "save" else 1, names.index(name)


def orchestrate(args: argparse.Namespace) -> int:
    """Run every contender against every store; print the table."""
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    rows: list[dict[str, Any]] = []
    with harness.scratch_dir(args.dir, REPO_ROOT) as log_dir:
        info = harness.machine_info(log_dir)
        for store in args.stores.split(","):
            rows += run_store(store, args, log_dir)
    state = next(r["state_bytes"] for r in rows if "error" not in r)
    print(
        f"state: {state / MB:.0f} MB (Linear(2048, 2048) layers + AdamW moments); rounds: "
        f"{args.rounds} (median time, worst peak); servers: local moto / fake-gcs-server  \n"
        f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; "
        f"torch {torch.__version__}\n"
    )
    headers = ["store", "op", "contender", "s", "MB/s", "time vs plain", "vs best bytes",
               "peak extra MiB", "peak / state"]  # fmt: skip
    print(harness.markdown_table(headers, summarize(rows)))
    if args.json:
        harness.dump_json(args.json, {"machine": info, "runs": rows}, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options for the orchestrator and the worker."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size-mb", type=float, default=512.0, help="state size in MB (default 512)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per contender (median shown)")
    p.add_argument("--stores", default="s3,gs", help="comma list of s3, gs")
    p.add_argument("--ops", default="save,load", help="comma list of save, load")
    p.add_argument(
        "--contenders",
        default="",
        help=f"comma list (default all); saves: {', '.join(SAVES)}; loads: {', '.join(LOADS)}",
    )
    p.add_argument("--dir", type=Path, default=None, help="scratch dir for server logs")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    worker = p.add_argument_group("worker (internal)")
    for name in ("worker",):
        worker.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    for name in ("store", "endpoint", "url", "op", "contender", "result"):
        worker.add_argument(f"--{name}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Orchestrator by default; one measurement with ``--worker``."""
    args = parse_args(argv)
    if not args.worker:
        return orchestrate(args)
    harness.write_result(args.result, run_worker_op(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
