"""Async-save benchmark: how long a training loop is blocked per checkpoint, and its throughput.

A CPU training loop (an MLP of ``Linear(d, d)`` layers with AdamW, one torch thread) runs two
segments of ``3 * every`` steps in the same fresh worker process: one without checkpoints (the
reference) and one that checkpoints after steps ``every`` and ``2 * every``, so each background
write has ``every`` steps to finish inside the segment. Every contender runs in its own
worker; contenders are interleaved within a round and rotated across rounds; the table reports
medians over rounds.

With ``--device cuda`` the model, the optimizer state and the batches live on the GPU: the
floor is then a pinned device-to-host copy (non-blocking copies, one synchronize), a
``torch-save`` contender gives the synchronous ``torch.save`` total, and the table adds the
peak extra GPU memory of the checkpointing segment over the same segment without saves
(``torch.cuda.max_memory_allocated``). The GPU is synchronized before each timed save, so
"blocked" never includes training kernels that were still queued.

Run ``python benchmarks/async_save.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import harness
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
SEED = 1234
MB = 1_000_000
SAVES = 2  # checkpoints in the checkpointing segment


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def width_for(size_mb: float, layers: int) -> int:
    """Layer width (a multiple of 64) whose model + AdamW state is about ``size_mb`` MB."""
    params = size_mb * MB / 12  # fp32 weights, exp_avg, exp_avg_sq
    return max(64, round(math.sqrt(params / layers) / 64) * 64)


def build_state(
    width: int, layers: int, device: str = "cpu"
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP with AdamW (the optimizer state appears at the first step)."""
    torch.manual_seed(SEED)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def make_step(model: nn.Module, opt: torch.optim.Optimizer, width: int, rows: int) -> Any:
    """Return a function that runs one training step (forward, backward, AdamW)."""
    batch = torch.randn(rows, width, generator=torch.Generator().manual_seed(SEED))
    batch = batch.to(next(model.parameters()).device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()
        opt.step()

    return step


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of the model and the optimizer state."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for entry in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in entry.values() if torch.is_tensor(v))
    return total


@torch.no_grad()
def mutate(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Add 1.0 to every parameter and optimizer tensor in place."""
    for param in model.parameters():
        param.add_(1.0)
    for entry in opt.state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                value.add_(1.0)


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Contender:
    """One way to checkpoint from the loop: ``save`` is what the loop waits for."""

    name: ClassVar[str]
    description: ClassVar[str]
    writes: ClassVar[bool] = True

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or ``None``."""
        return None

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Construct what ``save`` needs (untimed)."""
        self.model, self.opt = model, opt

    def save(self, path: Path, step: int) -> None:
        """Checkpoint the state; return when the loop may go on."""
        raise NotImplementedError

    def wait(self) -> None:
        """Block until every save is durable (fsynced)."""

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Read back the model's state dict from the checkpoint at ``path``."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Stop background workers."""


class Sync(Contender):
    """Our synchronous save."""

    name = "sync"
    description = "lightweight_ckpt.Fabric().save(path, state) (fsynced, atomic)"

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Construct the Fabric."""
        super().setup(model, opt)
        from lightweight_ckpt import Fabric

        self.fabric = Fabric(checkpoint_io=self.make_io())

    def make_io(self) -> Any:
        """The CheckpointIO under test (``None``: the default, synchronous)."""
        return None

    def save(self, path: Path, step: int) -> None:
        """Save model, optimizer and step."""
        self.fabric.save(path, {"model": self.model, "optimizer": self.opt, "step": step})

    def wait(self) -> None:
        """Wait for background saves."""
        self.fabric.wait()

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Load the raw checkpoint."""
        loaded: dict[str, torch.Tensor] = self.fabric.load(path)["model"]
        return loaded

    def teardown(self) -> None:
        """Stop the writer."""
        self.fabric.teardown()


class AsyncThread(Sync):
    """Our ``AsyncCheckpointIO`` with its writer thread."""

    name = "async"
    description = "Fabric(checkpoint_io=AsyncCheckpointIO()).save (writer thread)"

    def make_io(self) -> Any:
        """AsyncCheckpointIO around the default IO."""
        from lightweight_ckpt.io import AsyncCheckpointIO

        return AsyncCheckpointIO()


class AsyncProcess(Contender):
    """Prototype: our snapshot into shared-memory buffers, written by a separate process."""

    name = "async-process"
    description = (
        "prototype: snapshot into /dev/shm buffers, a spawned writer process runs "
        "TorchCheckpointIO.save_checkpoint"
    )

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Start the writer process (spawn) before anything is timed."""
        super().setup(model, opt)
        self.writer = ProcessWriter()

    def save(self, path: Path, step: int) -> None:
        """Snapshot and hand over to the writer process."""
        from lightweight_ckpt.state import to_state_dict

        state = {"model": self.model, "optimizer": self.opt, "step": step}
        self.writer.save({k: to_state_dict(v) for k, v in state.items()}, str(path))

    def wait(self) -> None:
        """Wait for the writer process's reply."""
        self.writer.wait()

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Load with our Fabric."""
        from lightweight_ckpt import Fabric

        loaded: dict[str, torch.Tensor] = Fabric().load(path)["model"]
        return loaded

    def teardown(self) -> None:
        """Stop the writer process."""
        self.writer.close()


class DcpAsync(Contender):
    """``torch.distributed.checkpoint.async_save`` in single-process mode."""

    name = "dcp-async"
    description = (
        "get_state_dict -> dcp.async_save(no_dist=True) (thread); the previous future is awaited "
        "before the next save"
    )

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Silence DCP's single-process warning."""
        super().setup(model, opt)
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.future: Any = None

    def save(self, path: Path, step: int) -> None:
        """Back-pressure like ours, then stage and submit."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        state = {"model": model_sd, "optimizer": optim_sd, "step": step}
        self.future = dcp.async_save(state, checkpoint_id=str(path), no_dist=True)

    def wait(self) -> None:
        """Wait for the pending future."""
        if self.future is not None:
            self.future.result()
            self.future = None

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Load the model entries into fresh tensors."""
        import torch.distributed.checkpoint as dcp

        template = {k: torch.empty_like(v) for k, v in self.model.state_dict().items()}
        dcp.load({"model": template}, checkpoint_id=str(path), no_dist=True)
        return template


class LightningAsync(Contender):
    """Lightning Fabric with Lightning's ``AsyncCheckpointIO`` plugin."""

    name = "lightning-async"
    description = (
        'lightning.fabric.Fabric(accelerator="cpu", plugins=[AsyncCheckpointIO(TorchCheckpointIO())'
        "]).save; no fsync by Lightning (the benchmark fsyncs after its teardown)"
    )

    def unavailable(self) -> str | None:
        """Needs the ``lightning`` package (``bench`` extra)."""
        try:
            import lightning.pytorch.plugins.io  # noqa: F401
        except ImportError as err:
            return f"cannot import lightning: {err}"
        return None

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Construct Fabric with the async plugin around Lightning's TorchCheckpointIO."""
        super().setup(model, opt)
        from lightning.fabric import Fabric
        from lightning.fabric.plugins import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        self.io = AsyncCheckpointIO(TorchCheckpointIO())
        accelerator = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.fabric = Fabric(accelerator=accelerator, devices=1, plugins=[self.io])
        self.paths: list[Path] = []

    def save(self, path: Path, step: int) -> None:
        """Clone every tensor and queue the write (Lightning has no back-pressure)."""
        self.fabric.save(path, {"model": self.model, "optimizer": self.opt, "step": step})
        self.paths.append(path)

    def wait(self) -> None:
        """Lightning's only wait is the plugin's teardown (the next save restarts the pool)."""
        self.io.teardown()
        for path in self.paths:
            harness.fsync_path(path)
        self.paths.clear()

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Plain torch.load."""
        loaded: dict[str, torch.Tensor] = torch.load(path, weights_only=True)["model"]
        return loaded


class TorchSave(Contender):
    """Plain ``torch.save`` of the state dicts, synchronous (the issue's GPU reference total)."""

    name = "torch-save"
    description = "torch.save({model, optimizer, step}, path) + fsync (synchronous)"

    def save(self, path: Path, step: int) -> None:
        """Write and fsync."""
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        torch.save({**state, "step": step}, path)
        harness.fsync_path(path)

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """Plain torch.load to the CPU."""
        loaded = torch.load(path, weights_only=True, map_location="cpu")
        model: dict[str, torch.Tensor] = loaded["model"]
        return model


class Memcpy(Contender):
    """The floor: copy every state tensor into preallocated host buffers; nothing is written."""

    name = "memcpy"
    description = "copy_ of every state tensor into preallocated host buffers (no write)"
    writes = False

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Allocate the buffers and touch them once."""
        super().setup(model, opt)
        tensors = [(f"model.{k}", v) for k, v in model.state_dict().items()]
        for index, entry in enumerate(opt.state.values()):
            tensors += [(f"opt.{index}.{k}", v) for k, v in entry.items() if torch.is_tensor(v)]
        self.cuda = any(t.is_cuda for _, t in tensors)
        self.buffers = {
            name: torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for name, t in tensors
        }
        self.pairs = [(self.buffers[name], t.detach()) for name, t in tensors]
        self.save(Path(), 0)

    def save(self, path: Path, step: int) -> None:
        """Copy every tensor (the pairs are found once, at setup); CUDA: pinned, one sync."""
        for buffer, tensor in self.pairs:
            buffer.copy_(tensor, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize()

    def read_model(self, path: Path) -> dict[str, torch.Tensor]:
        """The model's buffers."""
        return {k[len("model.") :]: v for k, v in self.buffers.items() if k.startswith("model.")}


# --------------------------------------------------------------------------------------------
# Prototype: the writer as a process (thread vs process measurement)
# --------------------------------------------------------------------------------------------


class _Slot:
    """Where tensor ``index`` of the snapshot goes in the checkpoint tree."""

    def __init__(self, index: int) -> None:
        self.index = index


def _split(tree: Any, found: list[torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        found.append(tree)
        return _Slot(len(found) - 1)
    if isinstance(tree, dict):
        return {k: _split(v, found) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_split(v, found) for v in tree)
    return tree


def _join(tree: Any, buffers: list[torch.Tensor]) -> Any:
    if isinstance(tree, _Slot):
        return buffers[tree.index]
    if isinstance(tree, dict):
        return {k: _join(v, buffers) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_join(v, buffers) for v in tree)
    return tree


def _writer_main(requests: Any, replies: Any) -> None:
    """Writer process: keep the shared buffers; write each skeleton filled with them."""
    from lightweight_ckpt.io import TorchCheckpointIO

    io = TorchCheckpointIO()
    buffers: list[torch.Tensor] = []
    while (request := requests.get()) is not None:
        kind, payload, path = request
        if kind == "buffers":
            buffers = payload
            continue
        try:
            io.save_checkpoint(_join(payload, buffers), path)
        except Exception as err:  # noqa: BLE001 - sent back to the caller
            replies.put(repr(err))
        else:
            replies.put(None)


class ProcessWriter:
    """Snapshot into shared-memory buffers (reused); a spawned process writes them."""

    def __init__(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.SimpleQueue(), ctx.SimpleQueue()
        self.process = ctx.Process(target=_writer_main, args=(self.requests, self.replies))
        self.process.start()
        self.buffers: list[torch.Tensor] = []
        self.pending = False

    def save(self, checkpoint: Any, path: str) -> None:
        """Wait for the previous write, copy into the buffers, send the skeleton."""
        self.wait()
        tensors: list[torch.Tensor] = []
        skeleton = _split(checkpoint, tensors)
        layout = [(t.shape, t.dtype) for t in tensors]
        if layout != [(b.shape, b.dtype) for b in self.buffers]:
            self.buffers = [torch.empty(s, dtype=d).share_memory_() for s, d in layout]
            self.requests.put(("buffers", self.buffers, None))
        for buffer, tensor in zip(self.buffers, tensors, strict=True):
            buffer.copy_(tensor.detach())
        self.requests.put(("save", skeleton, path))
        self.pending = True

    def wait(self) -> None:
        """Wait for the writer's reply; raise its error."""
        if self.pending:
            self.pending = False
            error = self.replies.get()
            if error is not None:
                raise RuntimeError(f"writer process failed: {error}")

    def close(self) -> None:
        """Wait, then stop the process."""
        self.wait()
        self.requests.put(None)
        self.process.join(30)


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (Sync, AsyncThread, AsyncProcess, DcpAsync, LightningAsync, TorchSave, Memcpy)
}


# --------------------------------------------------------------------------------------------
# Worker: one contender in a fresh process
# --------------------------------------------------------------------------------------------


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed_segment(step: Any, steps: int, save_at: dict[int, Any]) -> tuple[float, list[float]]:
    """Run ``steps`` steps, calling ``save_at[i]`` after step ``i``; return total and blocks.

    On a GPU the queued training kernels are waited for before each save is timed, and at the
    end of the segment.
    """
    blocked: list[float] = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if i in save_at:
            _synchronize()
            t0 = time.perf_counter()
            save_at[i]()
            blocked.append(time.perf_counter() - t0)
    _synchronize()
    return time.perf_counter() - start, blocked


def _verify_snapshot(contender: Contender, path: Path) -> bool:
    """Save, mutate everything at once, wait, and check the file holds the values at save time."""
    expected = {k: v.detach().cpu().clone() for k, v in contender.model.state_dict().items()}
    contender.save(path, -1)
    mutate(contender.model, contender.opt)
    contender.wait()
    saved = contender.read_model(path)
    return all(torch.equal(saved[k].cpu(), v) for k, v in expected.items())


def _gpu_peak(fn: Any) -> tuple[Any, int | None]:
    """Run ``fn``; return its result and the peak GPU memory above the start (None on CPU)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return fn(), None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def run_worker_op(name: str, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Build the loop, run the reference and checkpointing segments, return the figures."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    width = width_for(args.size_mb, args.layers)
    model, opt = build_state(width, args.layers, args.device)
    step = make_step(model, opt, width, args.batch)
    for _ in range(3):  # warm-up: allocator, optimizer state
        step()
    contender = CONTENDERS[name]()
    harness.release_free_memory()
    base_rss = harness.read_mem_status()
    with harness.RssSampler() as sampler:
        contender.setup(model, opt)
        paths = [data_dir / f"{name}-{i}" for i in range(SAVES + 1)]
        t0 = time.perf_counter()
        contender.save(paths[0], 0)  # first save: allocations, worker start, imports
        first_blocked = time.perf_counter() - t0
        contender.wait()
        first_total = time.perf_counter() - t0
        steps = (SAVES + 1) * args.every
        (reference, _), reference_gpu = _gpu_peak(lambda: _timed_segment(step, steps, {}))
        save_at = {
            args.every * k: (lambda k=k: contender.save(paths[k], k)) for k in range(1, SAVES + 1)
        }

        def checkpointing() -> tuple[float, list[float], float]:
            total, blocked = _timed_segment(step, steps, save_at)
            t0 = time.perf_counter()
            contender.wait()
            return total, blocked, time.perf_counter() - t0

        (with_saves, blocked, drain), saves_gpu = _gpu_peak(checkpointing)
    correct = _verify_snapshot(contender, data_dir / f"{name}-verify") if contender.writes else None
    contender.teardown()
    return {
        "contender": name,
        "state_bytes": state_bytes(model, opt),
        "width": width,
        "step_s": reference / steps,
        "first_blocked_s": first_blocked,
        "first_total_s": first_total,
        "reference_s": reference,
        "with_saves_s": with_saves,
        "blocked_s": blocked,
        "drain_s": drain,
        "peak_extra_rss": sampler.peak_rss - base_rss.rss,
        "device": args.device,
        "peak_extra_gpu": None
        if saves_gpu is None or reference_gpu is None
        else saves_gpu - reference_gpu,
        "snapshot_correct": correct,
    }


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _worker_args(name: str, args: argparse.Namespace, data_dir: Path) -> list[str]:
    return [
        "--worker",
        "--contender",
        name,
        "--dir",
        str(data_dir),
        "--size-mb",
        str(args.size_mb),
        "--layers",
        str(args.layers),
        "--every",
        str(args.every),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
    ]


def run_round(rnd: int, names: list[str], data_dir: Path, args: argparse.Namespace) -> list[Any]:
    """One round: every contender (order rotated per round) in its own worker."""
    shift = (rnd - 1) % len(names)
    results = []
    for name in names[shift:] + names[:shift]:
        folder = data_dir / f"r{rnd}-{name}"
        folder.mkdir()
        try:
            res = harness.run_worker(
                SCRIPT, _worker_args(name, args, folder), extra_pythonpath=[REPO_ROOT]
            )
        finally:
            harness.remove_path(folder)
        results.append({**res, "round": rnd})
        blocked = harness.median(res["blocked_s"])
        speed = res["reference_s"] / res["with_saves_s"]
        _log(f"round {rnd} {name:>16} blocked {blocked:6.3f}s  loop speed {speed:6.1%}")
    return results


def summarize(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Medians over rounds per contender, with ratios to the floor and to the sync save."""
    rows = []
    for name in names:
        runs = [r for r in results if r["contender"] == name]
        blocked = [harness.median(r["blocked_s"]) for r in runs]
        interference = [
            (r["with_saves_s"] - sum(r["blocked_s"])) / r["reference_s"] - 1 for r in runs
        ]
        rows.append(
            {
                "contender": name,
                "rounds": len(runs),
                "state_bytes": runs[0]["state_bytes"],
                "step_s": harness.median([r["step_s"] for r in runs]),
                "blocked_s": harness.median(blocked),
                "blocked_min_s": min(blocked),
                "blocked_max_s": max(blocked),
                "first_blocked_s": harness.median([r["first_blocked_s"] for r in runs]),
                "write_s": harness.median([r["first_total_s"] for r in runs]),
                "speed": harness.median([r["reference_s"] / r["with_saves_s"] for r in runs]),
                "speed_min": min(r["reference_s"] / r["with_saves_s"] for r in runs),
                "interference": harness.median(interference),
                "drain_s": harness.median([r["drain_s"] for r in runs]),
                "peak_extra_rss": max(r["peak_extra_rss"] for r in runs),
                "peak_extra_gpu": _max_or_none([r.get("peak_extra_gpu") for r in runs]),
                "snapshot_correct": [r["snapshot_correct"] for r in runs],
            }
        )
    by_name = {r["contender"]: r for r in rows}
    for row in rows:
        for ref in ("memcpy", "sync"):
            base = by_name.get(ref)
            row[f"vs_{ref}"] = row["blocked_s"] / base["blocked_s"] if base else None
    return rows


def _max_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _correct(flags: list[bool | None]) -> str:
    if all(flag is None for flag in flags):
        return "-"
    return "yes" if all(flags) else f"NO ({flags.count(False)}/{len(flags)} rounds)"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the summary rows."""
    headers = [
        "contender",
        "blocked per save s (min-max)",
        "vs memcpy",
        "vs sync",
        "first save blocked s",
        "one save, start to durable s",
        "loop speed vs no saves (worst)",
        "slowdown outside saves",
        "peak extra RSS MiB (% of state)",
        "snapshot = values at save",
    ]
    gpu = any(r.get("peak_extra_gpu") is not None for r in rows)
    if gpu:
        headers.append("peak extra GPU MiB (% of state)")
    body = []
    for r in rows:
        state, peak = r["state_bytes"], r["peak_extra_rss"]
        extra_gpu = r.get("peak_extra_gpu")
        gpu_cell = (
            [f"{extra_gpu / harness.MIB:.0f} ({100 * extra_gpu / state:.0f}%)"]
            if extra_gpu is not None
            else ["-"]
        )
        body.append(
            [
                r["contender"],
                f"{r['blocked_s']:.3f} ({r['blocked_min_s']:.3f}-{r['blocked_max_s']:.3f})",
                _ratio(r["vs_memcpy"]),
                _ratio(r["vs_sync"]),
                f"{r['first_blocked_s']:.3f}",
                f"{r['write_s']:.2f}",
                f"{r['speed']:.1%} ({r['speed_min']:.1%})",
                f"{r['interference']:+.1%}",
                f"{peak / harness.MIB:.0f} ({100 * peak / state:.0f}%)",
                _correct(r["snapshot_correct"]),
                *(gpu_cell if gpu else []),
            ]
        )
    return harness.markdown_table(headers, body)


def orchestrate(args: argparse.Namespace) -> int:
    """Run all rounds, print the markdown table and optionally dump raw JSON."""
    sys.path.insert(0, str(REPO_ROOT))
    names, not_run = harness.runnable(
        harness.parse_contenders(args.contenders, CONTENDERS), CONTENDERS
    )
    width = width_for(args.size_mb, args.layers)
    with harness.scratch_dir(args.dir, REPO_ROOT) as data_dir:
        info = harness.machine_info(data_dir)
        results: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            results.extend(run_round(rnd, names, data_dir, args))
    rows = summarize(results, names)
    state = rows[0]["state_bytes"]
    header = (
        f"state: MLP {args.layers} x Linear({width}, {width}) + AdamW = {state / MB:.0f} MB; "
        f"step {rows[0]['step_s'] * 1000:.0f} ms ({args.threads} torch thread(s), batch "
        f"{args.batch})"
        f"; checkpoint every {args.every} steps ({args.every * rows[0]['step_s']:.2f} s), "
        f"{SAVES} per segment; rounds: {args.rounds}; load average before: "
        f"{os.getloadavg()[0]:.2f}\nmachine: {info['cpu']}, {info['cores']} cores, "
        f"{info['mem_gib']} GiB; torch {torch.__version__}; dir on {info['filesystem']}; "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    print(header.replace("\n", "  \n") + "\n")
    print(render_table(rows))
    for name, reason in not_run.items():
        print(f"Not run: `{name}`: {reason}")
    if args.json:
        harness.dump_json(args.json, {"machine": info, "summary": rows, "runs": results}, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options for both the orchestrator and the worker."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size-mb", type=float, default=120.0, help="model + AdamW state, MB")
    p.add_argument("--layers", type=int, default=8, help="Linear layers in the MLP")
    p.add_argument("--batch", type=int, default=16, help="rows per training batch")
    p.add_argument("--every", type=int, default=6, help="checkpoint every N steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the model, optimizer state and batches live (cuda: pinned D2H floor, GPU "
        "memory column, torch-save contender)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows the median")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma list, default all: " + ",".join(CONTENDERS),
    )
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints go")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    worker = p.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--contender", help=argparse.SUPPRESS)
    worker.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: orchestrator by default, one contender with ``--worker``."""
    args = parse_args(argv)
    if not args.worker:
        return orchestrate(args)
    harness.write_result(args.result, run_worker_op(args.contender, args, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
