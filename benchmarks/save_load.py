"""Save/load benchmark: one ~1.5 GB training state, saved and loaded in place by each contender.

The state is a GPT-2-small-sized model (124.4M fp32 parameters, built from plain ``torch.nn``
layers) plus its AdamW state after one real optimizer step: model + exp_avg + exp_avg_sq is
~1.49 GB. Every (round, contender, op) runs in a fresh worker process that builds the state,
takes a memory baseline, runs the op once and reports wall time and peak extra RSS (``--resume``
also times each load together with the first optimizer step after it). Contenders
are interleaved within each round; the table shows the median time over rounds.

Run ``python benchmarks/save_load.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import harness
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
SEED = 1234
SAVED_STEP = 1
MB = 1_000_000
HEAD_DIM = 64  # width of one attention head; --size-mb scales d_model in steps of this
MIN_VOCAB = 1024  # --size-mb shrinks d_model before the vocabulary goes below this

# --------------------------------------------------------------------------------------------
# The training state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT-2-like model; the defaults are GPT-2 small (124,439,808 parameters)."""

    vocab: int = 50257
    ctx: int = 1024
    d_model: int = 768
    n_layer: int = 12

    @property
    def n_head(self) -> int:
        """Attention heads of width 64."""
        return max(1, self.d_model // HEAD_DIM)

    def n_params(self) -> int:
        """Parameter count (the LM head reuses the token embedding, so it adds none)."""
        d = self.d_model
        block = 12 * d * d + 13 * d  # qkv, attn proj, mlp fc, mlp proj (+ biases), 2 layernorms
        return self.vocab * d + self.ctx * d + self.n_layer * block + 2 * d

    def n_tensors(self) -> int:
        """Number of parameter tensors (= number of AdamW ``step`` scalars)."""
        return 2 + 12 * self.n_layer + 2

    def state_bytes(self) -> int:
        """Bytes of model + AdamW (exp_avg, exp_avg_sq, fp32 step scalars)."""
        return 3 * 4 * self.n_params() + 4 * self.n_tensors()


def config_for_size(size_mb: float | None) -> ModelConfig:
    """GPT-2 small for ``None``, else a scaled model whose full state is about ``size_mb`` MB."""
    base = ModelConfig()
    if size_mb is None:
        return base
    target = size_mb * MB / 12  # parameters
    scale = math.sqrt(target / base.n_params())
    d = max(HEAD_DIM, round(base.d_model * scale / HEAD_DIM) * HEAD_DIM)
    while True:
        trunk = ModelConfig(vocab=0, d_model=d).n_params()
        vocab = int((target - trunk) // d)
        if vocab >= MIN_VOCAB or d == HEAD_DIM:
            return ModelConfig(vocab=max(vocab, 256), d_model=d)
        d -= HEAD_DIM


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention then the MLP, each with a residual connection."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        out: torch.Tensor = x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))
        return out


class TinyGPT(nn.Module):
    """GPT-2-shaped language model; the output projection reuses ``wte.weight`` (no alias key)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return next-token logits for a batch of token ids."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def build_state(cfg: ModelConfig, seed: int = SEED) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build the model and AdamW, and take one real optimizer step so the state is populated."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(cfg.vocab, (2, 65))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits, loss
    return model, opt


def build_fresh(cfg: ModelConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A process resuming a run: the model with other weights, AdamW with no state yet."""
    torch.manual_seed(SEED + 1)
    model = TinyGPT(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the training state, in a fixed order, as (name, tensor sharing storage)."""
    out = [(f"model.{k}", v) for k, v in model.state_dict().items()]
    for index, param in enumerate(model.parameters()):
        for key, value in sorted(opt.state[param].items()):
            if isinstance(value, torch.Tensor):
                out.append((f"optim.{index}.{key}", value))
    return out


def _byte_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        raise ValueError("state tensors are expected to be contiguous")
    return flat.view(torch.uint8).numpy().data


def state_digest(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """SHA-1 of every state tensor's bytes, by name."""
    return {
        name: hashlib.sha1(_byte_view(t), usedforsecurity=False).hexdigest()
        for name, t in state_tensors(model, opt)
    }


@torch.no_grad()
def perturb(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Add 1.0 to every state tensor in place, so a load that restores nothing is caught."""
    for _name, tensor in state_tensors(model, opt):
        tensor.add_(1.0)


def set_resume_grads(model: nn.Module) -> None:
    """Give every parameter the same deterministic gradient, so one step is reproducible."""
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3)


def digest_after_step(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """The state's digest after one optimizer step with ``set_resume_grads`` (changes the state)."""
    set_resume_grads(model)
    opt.step()
    return state_digest(model, opt)


def verify_restored(
    model: nn.Module, opt: torch.optim.Optimizer, expected: dict[str, str], step: int | None
) -> None:
    """Raise if the loaded state differs from the saved one (digest per tensor, and the step)."""
    actual = state_digest(model, opt)
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
        raise AssertionError(f"{len(bad)} state tensors differ after load, e.g. {bad[:5]}")
    if step is not None and step != SAVED_STEP:
        raise AssertionError(f"loaded step is {step!r}, saved {SAVED_STEP}")


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Contender:
    """One way to save and load the state. ``ops`` are the ops that are timed and reported.

    ``save`` is also used (untimed) to write the file for a load-only contender. ``load`` returns
    the restored ``step`` when the format stores it, else ``None``.
    """

    name: ClassVar[str]
    suffix: ClassVar[str] = ""
    ops: ClassVar[tuple[str, ...]] = ("save", "load")
    into_fresh: ClassVar[bool] = True  # can load into an optimizer that has no state yet
    description: ClassVar[str]

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or ``None``."""
        return None

    def setup(self) -> None:
        """Import and construct what the ops need (outside the timed region)."""

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Write the state to ``path`` (the harness fsyncs it afterwards, inside the timing)."""
        raise NotImplementedError

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Restore the state from ``path`` into ``model`` and ``opt`` in place."""
        raise NotImplementedError


def _import_error(module: str, attr: str | None = None) -> str | None:
    try:
        mod = __import__(module, fromlist=[attr] if attr else [])
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    if attr and not hasattr(mod, attr):
        return f"{module} has no attribute {attr}"
    return None


def _step_after_load(state: dict[str, Any], returned: object) -> int | None:
    step = state.get("step")
    if step in (None, 0) and isinstance(returned, dict):
        step = returned.get("step", step)
    return int(step) if step is not None else None


class LightweightCkpt(Contender):
    """``lightweight_ckpt.Fabric().save/load`` with the Lightning-style state dict."""

    name = "lightweight_ckpt"
    suffix = ".ckpt"
    description = "lightweight_ckpt.Fabric().save(path, state) / .load(path, state)"

    def unavailable(self) -> str | None:
        """Not importable until the package exports ``Fabric``."""
        return _import_error("lightweight_ckpt", "Fabric")

    def setup(self) -> None:
        """Construct the Fabric object."""
        from lightweight_ckpt import Fabric

        self.fabric = Fabric()

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Save model, optimizer and step."""
        self.fabric.save(path, {"model": model, "optimizer": opt, "step": SAVED_STEP})

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Load in place; ``step`` comes back in the state dict."""
        state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
        returned = self.fabric.load(path, state)
        return _step_after_load(state, returned)


class LightweightCkptBuffered(LightweightCkpt):
    """Ours writing through the page cache (``direct_io=False``), written behind."""

    name = "lightweight_ckpt-buffered"
    description = "lightweight_ckpt with LWCKPT_DIRECT_IO=off (page cache, write-behind)"
    changes: ClassVar[dict[str, Any]] = {"direct_io": False}

    def setup(self) -> None:
        """Change the tunables for this worker process, then construct the Fabric object."""
        from lightweight_ckpt import config

        self._tunables = config.override(**self.changes)
        self._tunables.__enter__()
        super().setup()


class LightweightCkptNoWriteBehind(LightweightCkptBuffered):
    """Ours through the page cache with ``write_behind_bytes=0``: all written back at fsync."""

    name = "lightweight_ckpt-no-wb"
    description = "lightweight_ckpt with LWCKPT_DIRECT_IO=off, LWCKPT_WRITE_BEHIND_BYTES=0"
    changes: ClassVar[dict[str, Any]] = {"direct_io": False, "write_behind_bytes": 0}


class TorchSave(Contender):
    """Plain ``torch.save`` of the state dicts / ``torch.load(weights_only=True)``."""

    name = "torch"
    suffix = ".pt"
    description = (
        "torch.save({model/optimizer state_dict, step}) + fsync; "
        "torch.load(weights_only=True) + load_state_dict"
    )
    mmap: ClassVar[bool] = False

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Serialize both state dicts and the step into one file."""
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": SAVED_STEP}
        torch.save(state, path)

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Load the whole file, then copy into the model and hand the tensors to the optimizer."""
        ckpt = torch.load(path, weights_only=True, mmap=self.mmap)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        return int(ckpt["step"])


class TorchLoadMmap(TorchSave):
    """``torch.load(mmap=True)`` of the file ``torch.save`` wrote (load only)."""

    name = "torch-mmap"
    ops = ("load",)
    description = "torch.load(weights_only=True, mmap=True) + load_state_dict (file by torch.save)"
    mmap = True


class TorchLoadMmapRead(TorchSave):
    """``torch-mmap``, then one byte of every page of the optimizer state read (load only).

    ``opt.load_state_dict`` adopts the mmap-backed tensors, so ``torch-mmap`` returns before two
    thirds of the file are read: the first optimizer step pays for it. Touching each page once
    is the least work that makes the load complete (it faults the pages in, from the page cache
    or the disk), so this row is ``torch-mmap`` with the load finished, still with no checks.
    """

    name = "torch-mmap-read"
    ops = ("load",)
    description = "torch-mmap + a read of one byte per page of the adopted optimizer state"
    mmap = True

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Load as ``torch-mmap``, then fault in every page the optimizer adopted."""
        step = super().load(path, model, opt)
        page = os.sysconf("SC_PAGE_SIZE")
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    value.detach().reshape(-1).view(torch.uint8)[::page].sum()
        return step


class LightningFabric(Contender):
    """Lightning Fabric 2.6 on CPU: ``fabric.save`` / ``fabric.load``."""

    name = "lightning"
    suffix = ".ckpt"
    description = 'lightning.fabric.Fabric(accelerator="cpu", devices=1).save / .load (+ fsync)'

    def unavailable(self) -> str | None:
        """Needs the ``lightning`` package."""
        return _import_error("lightning.fabric", "Fabric")

    def setup(self) -> None:
        """Construct a single-device CPU Fabric."""
        from lightning.fabric import Fabric

        self.fabric = Fabric(accelerator="cpu", devices=1)

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Save model, optimizer and step (Lightning does not fsync; the harness does)."""
        self.fabric.save(path, {"model": model, "optimizer": opt, "step": SAVED_STEP})

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Load in place; ``step`` comes back in the state dict."""
        state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
        returned = self.fabric.load(path, state)
        return _step_after_load(state, returned)


class Dcp(Contender):
    """``torch.distributed.checkpoint`` without a process group (single-process mode)."""

    name = "dcp"
    description = (
        "get_state_dict -> dcp.save(checkpoint_id=dir); get_state_dict -> dcp.load (in place) "
        "-> set_state_dict; no process group"
    )

    def setup(self) -> None:
        """Silence DCP's 'assuming single process' warning."""
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Save the FQN-keyed model and optimizer state dicts plus the step into a directory."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": optim_sd, "step": SAVED_STEP}
        dcp_save(state, checkpoint_id=path)

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Load into the live tensors, then apply with ``set_state_dict``."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        model_sd, optim_sd = get_state_dict(model, opt)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "step": 0}
        dcp_load(state, checkpoint_id=path)
        set_state_dict(
            model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        return int(state["step"])


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_all_into(fd: int, view: memoryview) -> None:
    while view:
        got = os.readv(fd, [view])
        if got == 0:
            raise EOFError("raw file is shorter than the state")
        view = view[got:]


class RawBytes(Contender):
    """The same bytes straight from/to tensor memory: the disk (save) and copy (load) ceiling."""

    name = "raw"
    suffix = ".bin"
    description = (
        "os.write of every tensor's bytes (memoryview, no serialization) + fsync; "
        "load = os.readv straight into the live tensors"
    )
    into_fresh = False  # it reads into existing tensors only

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Write every tensor's bytes back to back and fsync."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _name, tensor in state_tensors(model, opt):
                _write_all(fd, _byte_view(tensor))
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int | None:
        """Read the bytes back into the live tensors (no step is stored)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            for _name, tensor in state_tensors(model, opt):
                _read_all_into(fd, _byte_view(tensor))
        finally:
            os.close(fd)
        return None


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        LightweightCkpt,
        LightweightCkptBuffered,
        LightweightCkptNoWriteBehind,
        TorchSave,
        TorchLoadMmap,
        TorchLoadMmapRead,
        LightningFabric,
        Dcp,
        RawBytes,
    )
}
BASELINE = {"save": "torch", "load": "torch", "resume": "torch", "fresh": "torch"}
READ_OPS = ("load", "resume", "fresh")

# --------------------------------------------------------------------------------------------
# Worker: one op in a fresh process
# --------------------------------------------------------------------------------------------


def _expected_path(path: Path) -> Path:
    return path.with_name(path.name + ".expected.json")


def run_worker_op(
    contender_name: str, op: str, path: Path, cfg: ModelConfig, resume: bool = False
) -> dict[str, Any]:
    """Build the state, run one op of one contender, and return the measurement as a dict.

    ``resume`` times the load together with the first optimizer step after it (``--resume``):
    a load that leaves the state memory-mapped (``torch.load(mmap=True)``) returns early and
    the first step pays for the pages it did not read, and for copying each one it writes.
    ``fresh`` does the same in the usual resume: a new process whose optimizer has no state yet
    (``--fresh``), so nothing can be read in place and the load creates the moments.
    The save op then also records the state's digest after that step, which both check.
    """
    contender = CONTENDERS[contender_name]()
    contender.setup()
    model, opt = build_fresh(cfg) if op == "fresh" else build_state(cfg)
    result: dict[str, Any] = {"contender": contender_name, "op": op, "state_bytes": 0}
    result["state_bytes"] = cfg.state_bytes()
    if op in ("save", "prepare"):

        def do_save() -> None:
            contender.save(path, model, opt)
            harness.fsync_path(path)

        if op == "save":
            measurement, _ = harness.measure(do_save)
            result.update(measurement.to_json())
        else:
            do_save()
        result["file_bytes"] = harness.path_size(path)
        expected = {"digest": state_digest(model, opt)}
        if resume:
            expected["after_step"] = digest_after_step(model, opt)
        _expected_path(path).write_text(json.dumps(expected), encoding="utf-8")
    elif op == "load":
        expected = json.loads(_expected_path(path).read_text(encoding="utf-8"))
        perturb(model, opt)
        measurement, step = harness.measure(lambda: contender.load(path, model, opt))
        verify_restored(model, opt, expected["digest"], step)
        result.update(measurement.to_json())
        result["verified"] = True
    elif op in ("resume", "fresh"):
        expected = json.loads(_expected_path(path).read_text(encoding="utf-8"))
        perturb(model, opt)
        set_resume_grads(model)

        def load_and_step() -> int | None:
            step = contender.load(path, model, opt)
            opt.step()
            return step

        measurement, step = harness.measure(load_and_step)
        verify_restored(model, opt, expected["after_step"], step)
        result.update(measurement.to_json())
        result["verified"] = True
    else:
        raise ValueError(f"unknown op {op!r}")
    return result


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


def _worker_args(name: str, op: str, path: Path, args: argparse.Namespace, rnd: int) -> list[str]:
    argv = ["--worker", "--contender", name, "--op", op, "--path", str(path), "--round", str(rnd)]
    if args.size_mb is not None:
        argv += ["--size-mb", str(args.size_mb)]
    if args.resume or args.fresh:
        argv += ["--resume"]  # the save records the digest after one more step
    return argv


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_round(
    rnd: int, names: list[str], data_dir: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One round: every contender (order rotated per round) saves, then loads its own file."""
    shift = (rnd - 1) % len(names)
    results: list[dict[str, Any]] = []
    for name in names[shift:] + names[:shift]:
        contender = CONTENDERS[name]
        path = data_dir / f"{name}-r{rnd}{contender.suffix}"
        try:
            save_op = "save" if "save" in contender.ops else "prepare"
            res = harness.run_worker(
                SCRIPT, _worker_args(name, save_op, path, args, rnd), extra_pythonpath=[REPO_ROOT]
            )
            if save_op == "save":
                results.append({**res, "round": rnd})
                _log(f"round {rnd} {name:>16} save {res['seconds']:7.2f}s")
            read_ops = (
                ["load"] + ["resume"] * args.resume + ["fresh"] * contender.into_fresh * args.fresh
            )
            for op in read_ops if "load" in contender.ops else []:
                if args.cold_cache:
                    harness.drop_page_cache(path)
                else:  # the same for everyone: a direct-I/O save leaves no page cache behind
                    harness.warm_page_cache(path)
                res = harness.run_worker(
                    SCRIPT, _worker_args(name, op, path, args, rnd), extra_pythonpath=[REPO_ROOT]
                )
                results.append({**res, "round": rnd})
                _log(f"round {rnd} {name:>16} {op} {res['seconds']:7.2f}s")
        finally:
            harness.remove_path(path)
            harness.remove_path(_expected_path(path))
    return results


def summarize(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Median time and worst peak memory per (contender, op), with ratios to the torch baseline."""
    rows: list[dict[str, Any]] = []
    for name in names:
        for op in ("save", *READ_OPS):
            runs = [r for r in results if r["contender"] == name and r["op"] == op]
            if not runs:
                continue
            secs = [r["seconds"] for r in runs]
            rows.append(
                {
                    "contender": name,
                    "op": op,
                    "median_s": harness.median(secs),
                    "min_s": min(secs),
                    "max_s": max(secs),
                    "rounds": len(runs),
                    "state_bytes": runs[0]["state_bytes"],
                    "file_bytes": runs[0].get("file_bytes"),
                    "peak_extra_rss": max(r["peak_extra_rss"] for r in runs),
                    "peak_extra_anon": max(r["peak_extra_anon"] for r in runs),
                }
            )
    for row in rows:
        base = [r for r in rows if r["contender"] == BASELINE[row["op"]] and r["op"] == row["op"]]
        row["ratio"] = row["median_s"] / base[0]["median_s"] if base else None
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the summary rows."""
    headers = [
        "contender",
        "op",
        "median s (min-max)",
        "vs torch",
        "GB/s",
        "peak extra RSS MiB",
        "peak extra anon MiB",
        "RSS % of state",
        "anon % of state",
    ]
    body = []
    for r in rows:
        state = r["state_bytes"]
        body.append(
            [
                r["contender"],
                r["op"],
                f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})",
                f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                f"{state / r['median_s'] / 1e9:.2f}",
                f"{r['peak_extra_rss'] / harness.MIB:.0f}",
                f"{r['peak_extra_anon'] / harness.MIB:.0f}",
                f"{100 * r['peak_extra_rss'] / state:.0f}%",
                f"{100 * r['peak_extra_anon'] / state:.0f}%",
            ]
        )
    return harness.markdown_table(headers, body)


def orchestrate(args: argparse.Namespace) -> int:
    """Run all rounds, print the markdown table and optionally dump raw JSON."""
    sys.path.insert(0, str(REPO_ROOT))
    names, _ = harness.runnable(harness.parse_contenders(args.contenders, CONTENDERS), CONTENDERS)
    cfg = config_for_size(args.size_mb)
    with harness.scratch_dir(args.dir, REPO_ROOT) as data_dir:
        info = harness.machine_info(data_dir)
        state = cfg.state_bytes()
        header = (
            f"state: {cfg.n_params() / 1e6:.1f}M params (vocab {cfg.vocab}, d {cfg.d_model}, "
            f"{cfg.n_layer} layers) + AdamW = {state / MB:.0f} MB ({state / harness.MIB:.0f} "
            f"MiB); rounds: {args.rounds}; page cache before load: "
            f"{'dropped' if args.cold_cache else 'warm'}"
            f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; "
            f"torch {torch.__version__}; dir: {data_dir} on {info['filesystem']}"
        )
        _log(header)
        results: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            results.extend(run_round(rnd, names, data_dir, args))
    rows = summarize(results, names)
    print(header.replace("\n", "  \n") + "\n")
    print(render_table(rows))
    if args.json:
        payload = {"config": vars(cfg), "machine": info, "summary": rows, "runs": results}
        harness.dump_json(args.json, payload, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options for both the orchestrator and the worker."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--size-mb",
        type=float,
        default=None,
        help="total state size in MB (model + AdamW); default: GPT-2 small, ~1493 MB",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows the median")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma list, default all: " + ",".join(CONTENDERS),
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where checkpoints go (default: a "
        "temporary directory in the repository, i.e. on its filesystem)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument(
        "--cold-cache",
        action="store_true",
        help="evict each checkpoint from the page "
        "cache (POSIX_FADV_DONTNEED) before loading it; default: loads read a warm cache",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="also time 'resume': each load followed by the first optimizer step (where loads "
        "that leave state memory-mapped pay for the pages they did not read)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="also time 'fresh': the usual resume, a new process whose optimizer has no state "
        "yet, then the first optimizer step",
    )
    worker = p.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--contender", help=argparse.SUPPRESS)
    worker.add_argument("--op", choices=("save", "prepare", *READ_OPS), help=argparse.SUPPRESS)
    worker.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    worker.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: orchestrator by default, a single measurement with ``--worker``."""
    args = parse_args(argv)
    if not args.worker:
        return orchestrate(args)
    cfg = config_for_size(args.size_mb)
    result = run_worker_op(args.contender, args.op, args.path, cfg, args.resume)
    result["round"] = args.round
    harness.write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
