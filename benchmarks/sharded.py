"""Sharded (FSDP2) benchmark: save and load a ``fully_shard`` model + AdamW at world size 2.

The state is a stack of ``nn.Linear(d, d)`` layers, each wrapped with
``torch.distributed.fsdp.fully_shard`` (and the root too), plus AdamW after one real step; by
default model + exp_avg + exp_avg_sq is ~400 MB in total, ~200 MB per rank. Every (round,
contender, op) runs in a fresh group of 2 processes (``torchrun --standalone``, gloo on the CPU;
``--device cuda``: NCCL, the state on GPU ``LOCAL_RANK``, ``--world-size`` up to the GPU count).
Each rank builds the same state, takes a memory baseline, runs the op once, and reports its wall
time (CUDA: after ``torch.cuda.synchronize``), peak extra RSS and, on CUDA, its peak extra GPU
memory (``torch.cuda.max_memory_allocated`` over the baseline). Contenders are interleaved
within a round; the table shows the median time over the rounds, as a ratio to
``torch.distributed.checkpoint`` called directly.

With ``--store s3`` or ``--store gs`` the checkpoints go to an object store instead of a local
folder: the test suite's local server (moto or fake-gcs-server on 127.0.0.1, benchmarks/stores.py)
runs for the whole run, every (round, contender) saves under a fresh prefix of one bucket and
its load reads that prefix back. There ``dcp`` is DCP's fsspec writer and reader, and a contender
that treats the URL as a local path (Lightning does) runs in a scratch working directory and is
recorded with what it did in place of a time, like any contender whose save or load fails.

Run ``python benchmarks/sharded.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import harness
import stores

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
WORLD_SIZE = 2
SEED = 1234
SAVED_STEP = 1
MB = 1_000_000
DEFAULT_SIZE_MB = 400.0
N_LAYERS = 8
DIM_STEP = 64  # d is a multiple of this (so it divides evenly over the ranks)
COLLECTIVE_TIMEOUT_S = 300
# Where a checkpoint goes: a local directory, or a URL (``s3://bucket/prefix``) with --store
Target = Path | str

# --------------------------------------------------------------------------------------------
# The training state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """``n_layers`` square ``Linear(d, d)`` layers (with bias), ReLU in between."""

    d: int
    n_layers: int = N_LAYERS

    def n_params(self) -> int:
        """Parameter count."""
        return self.n_layers * (self.d * self.d + self.d)

    def state_bytes(self) -> int:
        """Global bytes of model + AdamW (exp_avg, exp_avg_sq, fp32 ``step`` per parameter)."""
        return 3 * 4 * self.n_params() + 4 * 2 * self.n_layers


def config_for_size(size_mb: float) -> ModelConfig:
    """The config whose global model + AdamW state is closest to ``size_mb`` MB."""
    per_layer_params = size_mb * MB / 12 / N_LAYERS
    d = max(DIM_STEP, round(math.sqrt(per_layer_params) / DIM_STEP) * DIM_STEP)
    return ModelConfig(d=d)


def build_state(cfg: ModelConfig, device: str = "cpu") -> tuple[Any, Any]:
    """Build the model on every rank (same seed), shard it with ``fully_shard``, take one step.

    ``device``: "cpu", or "cuda" (this rank's current GPU).
    """
    import torch
    from torch import nn

    from lightweight_ckpt.compat import fully_shard

    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for index in range(cfg.n_layers):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(cfg.d, cfg.d))
    model = nn.Sequential(*layers).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(SEED + 1 + torch.distributed.get_rank())  # each rank its own batch
    model(torch.randn(8, cfg.d, device=device)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _local(tensor: Any) -> Any:
    """The rank-local part of a DTensor (its storage, so in-place ops change the DTensor)."""
    from lightweight_ckpt.compat import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_tensors(model: Any, opt: Any) -> list[Any]:
    """Every state tensor this rank holds: parameter shards and AdamW state (shards and steps)."""
    import torch

    out = [_local(p.detach()) for p in model.parameters()]
    for param in model.parameters():
        out += [_local(v) for v in opt.state[param].values() if isinstance(v, torch.Tensor)]
    return out


def local_state_bytes(model: Any, opt: Any) -> int:
    """Bytes of the state this rank holds (its share)."""
    return sum(t.numel() * t.element_size() for t in local_tensors(model, opt))


def perturb(model: Any, opt: Any) -> None:
    """Add 1.0 to every local state tensor in place, so a load that restores nothing is caught."""
    import torch

    with torch.no_grad():
        for tensor in local_tensors(model, opt):
            tensor.add_(1.0)


def full_digest(model: Any, opt: Any) -> dict[str, str] | None:
    """Gather the full (unsharded) model and optimizer state; SHA-1 per tensor on rank 0.

    A collective: every rank calls it; the other ranks get ``None``.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = get_optimizer_state_dict(model, opt, options=full)
    if torch.distributed.get_rank() != 0:
        return None
    named = [(f"model.{k}", v) for k, v in model_sd.items()]
    optim_state: dict[str, dict[str, Any]] = optim_sd["state"]  # type: ignore[assignment]
    for fqn, entry in optim_state.items():
        named += [(f"optim.{fqn}.{k}", v) for k, v in entry.items()]
    digest = {}
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            digest[name] = repr(value)
            continue
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest[name] = hashlib.sha1(
            flat.view(torch.uint8).numpy().data, usedforsecurity=False
        ).hexdigest()
    return digest


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Contender:
    """One way to save and load the sharded state; every method runs on every rank."""

    name: ClassVar[str]
    description: ClassVar[str]
    verify_s = 0.0  # time spent verifying checksums inside the timed load (ours only)
    device = "cpu"  # where the state lives: "cpu" or "cuda" (set by the rank worker)
    # fsspec options of the object store when the target is a URL (set by the rank worker)
    storage_options: dict[str, Any] | None = None

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (checked by the orchestrator), or ``None``."""
        return None

    def setup(self) -> None:
        """Import and construct what the ops need (in each rank, outside the timed region)."""

    def save(self, path: Target, model: Any, opt: Any) -> None:
        """Write this rank's part of the state under ``path`` (a local directory or a URL)."""
        raise NotImplementedError

    def load(self, path: Target, model: Any, opt: Any) -> int | None:
        """Restore the state in place; return the loaded ``step``."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait for what the last save left running in the background (never timed)."""


def _step_after_load(state: dict[str, Any], returned: object) -> int | None:
    step = state.get("step")
    if step in (None, 0) and isinstance(returned, dict):
        step = returned.get("step", step)
    return int(step) if step is not None else None


class LightweightCkpt(Contender):
    """``lightweight_ckpt.Fabric()`` ("auto" picks its FSDPStrategy: a sharded DCP directory)."""

    name = "lightweight_ckpt"
    description = 'lightweight_ckpt.Fabric().save(dir, state) / .load(dir, state); "auto" -> FSDP'

    def unavailable(self) -> str | None:
        """Not importable until the package exports ``Fabric``."""
        try:
            from lightweight_ckpt import Fabric  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return f"cannot import lightweight_ckpt.Fabric: {type(exc).__name__}: {exc}"
        return None

    def setup(self) -> None:
        """Construct the Fabric object; time the checksum verification inside loads."""
        import time

        from lightweight_ckpt import Fabric
        from lightweight_ckpt.formats import dcp_checksums

        self.fabric = Fabric()
        verify = dcp_checksums.verify_items

        def timed_verify(*args: Any) -> None:
            start = time.perf_counter()
            try:
                verify(*args)
            finally:
                self.verify_s += time.perf_counter() - start

        # the reader looks it up at call time; timing it adds two clock reads per load
        dcp_checksums.verify_items = timed_verify  # type: ignore[assignment]

    def save(self, path: Target, model: Any, opt: Any) -> None:
        """Save model, optimizer and step (to a URL: with the store's ``storage_options``)."""
        self.fabric.save(
            path,
            {"model": model, "optimizer": opt, "step": SAVED_STEP},
            storage_options=self.storage_options,
        )

    def load(self, path: Target, model: Any, opt: Any) -> int | None:
        """Load in place; ``step`` comes back in the state dict."""
        state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
        returned = self.fabric.load(path, state, storage_options=self.storage_options)
        return _step_after_load(state, returned)

    def settle(self) -> None:
        """Wait for the background removal of a replaced version."""
        self.fabric.wait()


class Dcp(Contender):
    """``torch.distributed.checkpoint`` called directly, with the state-dict helpers."""

    name = "dcp"
    description = (
        "get_state_dict -> dcp.save(storage_writer=FileSystemWriter(dir, sync_files=True)); "
        "get_state_dict -> dcp.load(FileSystemReader(dir)) (in place) -> set_state_dict; "
        "on a store: FsspecWriter(url, sync_files=False, **storage_options) / "
        "FsspecReader(url, **storage_options)"
    )

    def save(self, path: Target, model: Any, opt: Any) -> None:
        """Save the sharded model and optimizer state dicts plus the step into a directory."""
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": optim_sd, "step": SAVED_STEP}
        if isinstance(path, Path):
            writer: Any = FileSystemWriter(path, sync_files=True)
        else:
            # sync_files=False: an object-store file has no fileno(), so DCP's default would
            # call os.sync() (the whole machine's page cache) after every file it uploads
            writer = FsspecWriter(path, sync_files=False, **(self.storage_options or {}))
        dcp_save(state, storage_writer=writer)

    def load(self, path: Target, model: Any, opt: Any) -> int | None:
        """Load into the live shards, then apply with ``set_state_dict``."""
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        from torch.distributed.checkpoint.filesystem import FileSystemReader
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        model_sd, optim_sd = get_state_dict(model, opt)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "step": 0}
        if isinstance(path, Path):
            reader: Any = FileSystemReader(path)
        else:
            reader = FsspecReader(path, **(self.storage_options or {}))
        dcp_load(state, storage_reader=reader)
        set_state_dict(
            model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        return int(state["step"])


def _lightning_fsdp_refusal() -> str | None:
    """Construct Lightning's FSDP Fabric on the CPU as the issue asks; return its error, if any."""
    try:
        from lightning.fabric import Fabric
        from lightning.fabric.strategies.fsdp import FSDPStrategy
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"cannot import lightning.fabric: {type(exc).__name__}: {exc}"
    try:
        Fabric(strategy=FSDPStrategy(state_dict_type="sharded"), accelerator="cpu", devices=2)
    except Exception as exc:  # noqa: BLE001 - report whatever Lightning raises
        return f"{type(exc).__name__}: {exc}"
    return None


class LightningFsdp(Contender):
    """Lightning Fabric's ``FSDPStrategy(state_dict_type="sharded")`` on the CPU, 2 devices.

    Lightning 2.6 refuses it on the CPU in ``Fabric.__init__`` ("FSDP is only available on
    GPU"), so this contender only records the refusal. Were it accepted, it would still need an
    FSDP1 model (``fabric.setup_module`` wraps with ``FullyShardedDataParallel``), not this
    benchmark's ``fully_shard`` one; that path is not implemented here.
    """

    name = "lightning-fsdp"
    description = (
        'lightning.fabric.Fabric(strategy=FSDPStrategy(state_dict_type="sharded"), '
        'accelerator="cpu", devices=2)'
    )

    def unavailable(self) -> str | None:
        """Lightning's refusal, verbatim (or that this benchmark lacks the FSDP1 path)."""
        refusal = _lightning_fsdp_refusal()
        if refusal is not None:
            return f"Lightning refuses it: {refusal}"
        return (
            "Lightning accepted FSDPStrategy on the CPU, but it wraps models with FSDP1; this "
            "benchmark's fully_shard (FSDP2) model does not fit it (not implemented)"
        )


def _as_is(module: Any, _device_mesh: Any) -> Any:
    """``parallelize_fn`` for ModelParallelStrategy: the model is already ``fully_shard``-ed."""
    return module


class LightningModelParallel(Contender):
    """Lightning Fabric's ``ModelParallelStrategy``: Lightning's FSDP2 path, which runs on CPU."""

    name = "lightning-mp"
    description = (
        "lightning.fabric.Fabric(strategy=ModelParallelStrategy(parallelize_fn=as_is), "
        'accelerator="cpu", devices=2).save / .load (sharded DCP dir + meta.pt)'
    )

    def unavailable(self) -> str | None:
        """Needs ``lightning`` with ``ModelParallelStrategy``."""
        try:
            from lightning.fabric.strategies.model_parallel import ModelParallelStrategy  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return f"cannot import ModelParallelStrategy: {type(exc).__name__}: {exc}"
        return None

    def setup(self) -> None:
        """Construct the Fabric; torchrun's environment tells it the ranks (no re-launch)."""
        from lightning.fabric import Fabric
        from lightning.fabric.strategies.model_parallel import ModelParallelStrategy

        warnings.filterwarnings("ignore", module="lightning")
        self.fabric = Fabric(
            strategy=ModelParallelStrategy(parallelize_fn=_as_is),
            accelerator=self.device,
            devices=int(os.environ["WORLD_SIZE"]),
        )
        self.fabric.launch()  # joins the existing process group

    def save(self, path: Target, model: Any, opt: Any) -> None:
        """Save model, optimizer and step (a DCP directory plus ``meta.pt`` from rank 0).

        Lightning takes no storage options here and turns a URL into ``Path(url)``: a local
        folder ``s3:/bucket/...`` in the working directory (see ``_check_stored``).
        """
        self.fabric.save(path, {"model": model, "optimizer": opt, "step": SAVED_STEP})

    def load(self, path: Target, model: Any, opt: Any) -> int | None:
        """Load in place; ``step`` comes back in the state dict."""
        state: dict[str, Any] = {"model": model, "optimizer": opt, "step": 0}
        returned = self.fabric.load(path, state)
        return _step_after_load(state, returned)


class LightweightCkptBuffered(LightweightCkpt):
    """Ours with ``direct_io=False``: pieces written through the page cache, written behind."""

    name = "lightweight_ckpt-buffered"
    description = "lightweight_ckpt as above, LWCKPT_DIRECT_IO=off"

    def setup(self) -> None:
        """As ours, with direct I/O off for the rest of this worker process."""
        from lightweight_ckpt import config

        self._tunables = config.override(direct_io=False)
        self._tunables.__enter__()
        super().setup()


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        LightweightCkpt,
        LightweightCkptBuffered,
        Dcp,
        LightningFsdp,
        LightningModelParallel,
    )
}
BASELINE = "dcp"

# --------------------------------------------------------------------------------------------
# Rank worker: one op on every rank of a fresh process group (started by torchrun)
# --------------------------------------------------------------------------------------------


def _expected_path(path: Path) -> Path:
    return path.with_name(path.name + ".expected.json")


def _check_loaded(
    expected: dict[str, str] | None, actual: dict[str, str] | None, steps: list[int | None]
) -> str | None:
    """Rank 0's verdict on a load: ``None`` if the state and every rank's step match."""
    if expected is None or actual is None:
        return None  # not rank 0
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
        return f"{len(bad)} of {len(expected)} full-state tensors differ after load, e.g. {bad[:5]}"
    if any(step != SAVED_STEP for step in steps):
        return f"loaded step per rank is {steps}, saved {SAVED_STEP}"
    return None


def _after_trim(measurement: Any) -> dict[str, Any]:
    """The measurement, plus the extra RSS still there after ``gc`` and ``malloc_trim``.

    ``retained_extra_rss`` (right after the op) includes freed heap that glibc keeps;
    ``trimmed_extra_rss`` is what is still live (or cannot be trimmed) once that is returned.
    """
    harness.release_free_memory()
    trimmed = harness.read_mem_status().rss - measurement.baseline_rss
    return {**measurement.to_json(), "trimmed_extra_rss": trimmed}


def _fsync_present(path: Path) -> None:
    """``harness.fsync_path``, skipping files removed meanwhile (a replaced version going away)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for target in [*(Path(dirpath) / name for name in filenames), Path(dirpath)]:
            with contextlib.suppress(FileNotFoundError):
                descriptor = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
    harness.fsync_path(path.parent)


def _make_durable(path: Target) -> None:
    """Rank 0, after a save: fsync a local directory; an upload is durable once it returns."""
    if isinstance(path, Path):
        _fsync_present(path)


def _timed_save(
    contender: Contender, path: Target, model: Any, opt: Any, overwrite: bool = False
) -> dict[str, Any]:
    """Save on every rank, then fsync the whole directory on rank 0; all of it is timed.

    To a URL there is nothing to fsync: the save's uploads have completed when it returns.

    With ``overwrite``, two untimed saves of the same state to ``path`` come first, so the timed
    save replaces a checkpoint that itself replaced one: a training run's steady state, from its
    third save on (``lightweight_ckpt`` then overwrites the pieces of the version two saves
    back; DCP rewrites its files in place from the second save on).
    """
    import torch.distributed as dist

    for _ in range(2 if overwrite else 0):
        contender.save(path, model, opt)
        dist.barrier()
        if dist.get_rank() == 0:
            _make_durable(path)
        contender.settle()
        dist.barrier()

    def op() -> None:
        contender.save(path, model, opt)
        dist.barrier()
        if dist.get_rank() == 0:  # make every file durable, for every contender alike
            _make_durable(path)
        dist.barrier()

    return _measure(op, contender.device)[0]


def _timed_load(
    contender: Contender, path: Target, expected_file: Path, model: Any, opt: Any
) -> dict[str, Any]:
    """Perturb the state, load it in place (timed), then check it against the saved digest.

    ``expected_file``: the digest the save group left (rank 0 reads it).
    """
    import torch.distributed as dist

    expected = None
    if dist.get_rank() == 0:
        expected = json.loads(expected_file.read_text(encoding="utf-8"))
    perturb(model, opt)

    def op() -> int | None:
        loaded = contender.load(path, model, opt)
        dist.barrier()
        return loaded

    measured, step = _measure(op, contender.device)
    actual = full_digest(model, opt)
    steps: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    verdict = [_check_loaded(expected, actual, steps)]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:  # every rank fails, naming the mismatch
        raise AssertionError(f"{contender.name} load did not restore the state: {verdict[0]}")
    return measured


def _stored_files(path: Target, options: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0, after a save: the bytes and files (objects) the checkpoint takes."""
    if isinstance(path, Path):
        return {"file_bytes": harness.path_size(path), "files": len(list(harness.iter_files(path)))}
    size, count = stores.stored_size(path, options or {})
    return {"file_bytes": size, "files": count}


def _local_litter() -> str:
    """What a save left in this rank's scratch working directory (a URL taken as a path)."""
    found = [p for p in Path.cwd().rglob("*") if p.is_file()]
    if not found:
        return "and wrote nothing locally either"
    size = sum(p.stat().st_size for p in found)
    top = sorted({p.relative_to(Path.cwd()).parts[0] for p in found})
    return (
        f"it wrote {len(found)} local files ({size / MB:.1f} MB) under {top} in its working "
        "directory instead (the URL taken as a local path)"
    )


def _check_stored(contender: Contender, path: Target, stored: dict[str, Any] | None) -> None:
    """Every rank fails, naming what happened, if a save to a URL left nothing in the store.

    ``stored``: rank 0's ``_stored_files``; ``None`` on the other ranks.
    """
    import torch.distributed as dist

    verdict: list[str | None] = [None]
    if stored is not None and not isinstance(path, Path) and not stored["files"]:
        verdict = [f"{contender.name} save put nothing under {path}: {_local_litter()}"]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RuntimeError(verdict[0])


def _measure(op: Any, device: str) -> tuple[dict[str, Any], Any]:
    """Time ``op`` on every rank with its peak extra RSS (and GPU memory, on CUDA).

    On CUDA the op's queued kernels and copies are waited for inside the timed region.
    """
    import torch
    import torch.distributed as dist

    cuda = device == "cuda"

    def timed() -> Any:
        out = op()
        if cuda:
            torch.cuda.synchronize()
        return out

    harness.release_free_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    dist.barrier()
    measurement, out = harness.measure(timed)
    measured = _after_trim(measurement)
    if cuda:
        measured["peak_extra_gpu"] = torch.cuda.max_memory_allocated() - gpu_baseline
    return measured, out


def _stage(message: str) -> None:
    """Progress line in this rank's log (shown only when a rank fails; see ``launch``)."""
    print(f"{datetime.datetime.now():%H:%M:%S.%f} {message}", file=sys.stderr, flush=True)


def _enter_scratch(path: Path) -> None:
    """Work in ``path`` (a fresh local folder), so a contender that writes a URL as a relative
    local path leaves it there for the orchestrator to remove, not in the repository."""
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)


def _import_dcp() -> None:
    """Import DCP's modules before the baseline, for every contender alike.

    Otherwise a contender that imports them lazily (``dcp`` here, Lightning inside its save)
    pays a few MiB of module objects in its first op, which a training run pays only once.
    """
    import torch.distributed.checkpoint
    import torch.distributed.checkpoint.filesystem
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.checkpoint.state_dict_loader
    import torch.distributed.checkpoint.state_dict_saver  # noqa: F401


def _save_op(
    contender: Contender, target: Target, local: Path, model: Any, opt: Any, *, overwrite: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The timed save; rank 0 then records the saved digest and what the checkpoint takes.

    Returns this rank's measurement and, on rank 0, ``{"file_bytes", "files"}``.
    """
    import torch.distributed as dist

    measurement = _timed_save(contender, target, model, opt, overwrite=overwrite)
    _stage(f"saved in {measurement['seconds']:.2f} s")
    contender.settle()
    digest = full_digest(model, opt)  # the saved state, gathered (the save changed none)
    stored = None
    if dist.get_rank() == 0:
        stored = _stored_files(target, contender.storage_options)
        _expected_path(local).write_text(json.dumps(digest), encoding="utf-8")
    _check_stored(contender, target, stored)
    return measurement, stored


def rank_worker(args: argparse.Namespace) -> None:
    """Run one op of one contender on this rank; rank 0 writes the merged result."""
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    backend = "gloo"
    if args.device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        rank = dist.get_rank()
        cfg = config_for_size(args.size_mb)
        local: Path = args.path.resolve()  # the checkpoint, or with --url the scratch folder
        target: Target = local
        _stage(f"{args.contender} {args.op}: process group up")
        _import_dcp()
        contender = CONTENDERS[args.contender]()
        contender.device = args.device
        if args.url:
            target = args.url
            contender.storage_options = stores.options_for(args.store, args.endpoint)
            stores.import_client(args.store)
            _enter_scratch(local)
        contender.setup()
        model, opt = build_state(cfg, args.device)
        _stage("state built")
        result: dict[str, Any] = {"contender": args.contender, "op": args.op}
        if args.op == "save":
            measurement, stored = _save_op(
                contender, target, local, model, opt, overwrite=args.overwrite
            )
            result.update(stored or {})
        else:
            measurement = _timed_load(contender, target, _expected_path(local), model, opt)
            measurement["verify_seconds"] = contender.verify_s
            _stage(f"loaded in {measurement['seconds']:.2f} s and verified")
            result["verified"] = True
        mine = {"rank": rank, "share_bytes": local_state_bytes(model, opt), **measurement}
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
        if rank == 0:
            result["state_bytes"] = cfg.state_bytes()
            result["ranks"] = per_rank
            result["seconds"] = max(r["seconds"] for r in per_rank)
            harness.write_result(args.result, result)
        dist.barrier()
        _stage("result written")
    finally:
        dist.destroy_process_group()
    _stage("process group destroyed")


def launch(argv: list[str], world_size: int) -> int:
    """Start the rank workers with torchrun (``--standalone``: local rendezvous, free port).

    Each rank's output goes to a log file; if a rank fails, the end of every rank's log is
    printed last, so ``harness.run_worker``'s error (the last lines of the output) shows it.
    """
    from torch.distributed import run as torchrun

    log_dir = Path(tempfile.mkdtemp(prefix="sharded-bench-logs-"))
    try:
        torchrun.main(
            [
                "--standalone",
                "--nnodes=1",
                f"--nproc-per-node={world_size}",
                "--max-restarts=0",
                f"--log-dir={log_dir}",
                "--redirects=3",
                str(SCRIPT),
                "--rank-worker",
                *argv,
            ]
        )
    except Exception as exc:  # noqa: BLE001 - torchrun's ChildFailedError; report the ranks
        _log(f"torchrun: {type(exc).__name__}")
        for log in sorted(log_dir.rglob("*.log")):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            if lines:
                _log(f"--- {log.relative_to(log_dir)} (last lines):")
                _log("\n".join(lines[-15:]))
        return 1
    finally:
        harness.remove_path(log_dir)
    return 0


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _launch_args(
    name: str, op: str, path: Path, args: argparse.Namespace, where: tuple[str, str] | None = None
) -> list[str]:
    """The rank workers' arguments; ``where``: ``(url, endpoint)`` when saving to a store."""
    store = ["--store", args.store, "--url", where[0], "--endpoint", where[1]] if where else []
    return [
        "--launch",
        "--contender",
        name,
        "--op",
        op,
        "--path",
        str(path),
        "--size-mb",
        str(args.size_mb),
        "--device",
        args.device,
        "--world-size",
        str(args.world_size),
        *(["--overwrite"] if args.overwrite else []),
        *store,
    ]


def _failure_reason(text: str) -> str:
    """The exception a failed run ended with (the last ``...Error: ...`` line of its output)."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    reason = (errors or lines or [text])[-1]
    return reason[:300]


def _run_op(
    name: str, op: str, path: Path, args: argparse.Namespace, where: tuple[str, str] | None
) -> dict[str, Any]:
    """One (contender, op) in a fresh process group; on a store a failure becomes the result.

    Locally any failure aborts the run, as does ours on a store; another contender's failure on
    a store (DCP's fsspec writer, Lightning with a URL) is recorded as ``{"error": ...}``.
    """
    try:
        return harness.run_worker(
            SCRIPT, _launch_args(name, op, path, args, where), extra_pythonpath=[REPO_ROOT]
        )
    except harness.WorkerError as exc:
        if where is None or name == LightweightCkpt.name:
            raise
        reason = _failure_reason(str(exc))
        _log(f"{name} {op} failed on {args.store}: {reason}")
        return {"contender": name, "op": op, "error": reason}


def run_round(
    rnd: int,
    names: list[str],
    data_dir: Path,
    args: argparse.Namespace,
    bucket: stores.Bucket | None = None,
) -> list[dict[str, Any]]:
    """One round: every contender (order rotated per round) saves, then loads its own checkpoint.

    With ``bucket``, each contender's checkpoint is a fresh prefix there (``data_dir`` then only
    holds the digest and the ranks' scratch working directory); it is deleted after the load.
    """
    shift = (rnd - 1) % len(names)
    results: list[dict[str, Any]] = []
    for name in names[shift:] + names[:shift]:
        path = data_dir / f"{name}-r{rnd}"
        where = (bucket.fresh_url(f"{name}-r{rnd}"), bucket.endpoint) if bucket else None
        try:
            for op in ("save", "load"):
                if op == "load" and bucket is None:
                    _settle_page_cache(path, cold=args.cold_cache)
                res = {**_run_op(name, op, path, args, where), "round": rnd}
                results.append(res)
                if "error" in res:
                    if op == "save":
                        results.append(
                            {"contender": name, "op": "load", "round": rnd,
                             "error": "not run: the save failed"}
                        )  # fmt: skip
                    break
                peak = max(r["peak_extra_rss"] for r in res["ranks"]) / harness.MIB
                _log(
                    f"round {rnd} {name:>16} {op} {res['seconds']:7.2f}s  peak/rank {peak:6.0f} MiB"
                )
        finally:
            harness.remove_path(path)
            harness.remove_path(_expected_path(path))
            if bucket is not None and where is not None:
                stores.remove_url(where[0], stores.options_for(bucket.store, bucket.endpoint))
    return results


def _settle_page_cache(path: Path, *, cold: bool) -> None:
    """Give every contender's load the same page cache: all of its files cached, or none.

    A save through the page cache leaves its files cached and one with direct I/O (ours, by
    default) leaves nothing; without this the load after it would compare a warm read with a
    cold one.
    """
    if cold:
        harness.drop_page_cache(path)
    else:
        harness.warm_page_cache(path)


def summarize(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Median time and the worst per-rank peak memory per (contender, op); ratios to DCP.

    Failed runs (on a store) are left out; a (contender, op) that never succeeded gets a row
    with its first error in place of figures.
    """
    rows: list[dict[str, Any]] = []
    for name in names:
        for op in ("save", "load"):
            tried = [r for r in results if r["contender"] == name and r["op"] == op]
            runs = [r for r in tried if "error" not in r]
            failed = [r for r in tried if "error" in r]
            if not runs:
                if failed:
                    rows.append({"contender": name, "op": op, "error": failed[0]["error"]})
                continue
            secs = [r["seconds"] for r in runs]
            verify = [max(rank.get("verify_seconds", 0.0) for rank in r["ranks"]) for r in runs]
            ranks = [rank for r in runs for rank in r["ranks"]]
            worst = max(ranks, key=lambda rank: rank["peak_extra_rss"])
            rows.append(
                {
                    "contender": name,
                    "op": op,
                    "median_s": harness.median(secs),
                    "median_verify_s": harness.median(verify),
                    "min_s": min(secs),
                    "max_s": max(secs),
                    "rounds": len(runs),
                    "state_bytes": runs[0]["state_bytes"],
                    "share_bytes": max(rank["share_bytes"] for rank in ranks),
                    "file_bytes": next((r["file_bytes"] for r in runs if "file_bytes" in r), None),
                    "files": next((r["files"] for r in runs if "files" in r), None),
                    "peak_extra_rss": worst["peak_extra_rss"],
                    "peak_extra_rss_share": worst["peak_extra_rss"] / worst["share_bytes"],
                    "peak_extra_anon": max(rank["peak_extra_anon"] for rank in ranks),
                    "peak_extra_gpu": max(rank.get("peak_extra_gpu", 0) for rank in ranks),
                    "trimmed_extra_rss": max(rank["trimmed_extra_rss"] for rank in ranks),
                    "failed_rounds": len(failed),
                }
            )
    for row in rows:
        base = [
            r
            for r in rows
            if r["contender"] == BASELINE and r["op"] == row["op"] and "error" not in r
        ]
        ok = base and "error" not in row
        row["ratio"] = row["median_s"] / base[0]["median_s"] if ok else None
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the summary rows."""
    headers = [
        "contender",
        "op",
        "median s (min-max)",
        "vs dcp",
        "peak extra RSS MiB/rank",
        "% of rank share",
        "peak extra anon MiB/rank",
        "left after trim MiB/rank",
        "peak extra GPU MiB/rank",
    ]
    body = [
        [r["contender"], r["op"], "failed (below)", *["-"] * (len(headers) - 3)]
        if "error" in r
        else [
            r["contender"],
            r["op"],
            f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})",
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
            f"{r['peak_extra_rss'] / harness.MIB:.0f}",
            f"{100 * r['peak_extra_rss_share']:.0f}%",
            f"{r['peak_extra_anon'] / harness.MIB:.0f}",
            f"{r['trimmed_extra_rss'] / harness.MIB:.0f}",
            f"{r['peak_extra_gpu'] / harness.MIB:.0f}" if r["peak_extra_gpu"] else "-",
        ]
        for r in rows
    ]
    return harness.markdown_table(headers, body)


def _where(bucket: stores.Bucket) -> str:
    """The header's line about the store: server, client library, how prefixes are used."""
    from importlib import metadata

    client = "s3fs" if bucket.store == "s3" else "gcsfs"
    return (
        f"store: {bucket.store} ({stores.SERVERS[bucket.store]} on {bucket.endpoint}, "
        f"{client} {metadata.version(client)}); bucket {bucket.name}, a fresh prefix per round "
        "and contender"
    )


def orchestrate(args: argparse.Namespace) -> int:
    """Run all rounds, print the markdown table and optionally dump raw JSON."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank (torchrun's default)
    names, not_run = harness.runnable(
        harness.parse_contenders(args.contenders, CONTENDERS), CONTENDERS
    )
    cfg = config_for_size(args.size_mb)
    world = args.world_size
    where = "NCCL, CUDA" if args.device == "cuda" else "gloo, CPU"
    if args.device == "cuda" and torch.cuda.device_count() < world:
        _log(f"--device cuda needs {world} GPUs (one per rank); {torch.cuda.device_count()} here")
        return 2
    with harness.scratch_dir(args.dir, REPO_ROOT) as data_dir, contextlib.ExitStack() as stack:
        bucket = None
        if args.store != "local":
            bucket = stack.enter_context(stores.serving(args.store, data_dir))
        info = harness.machine_info(data_dir)
        state = cfg.state_bytes()
        mode = "; each timed save overwrites a checkpoint" if args.overwrite else ""
        if bucket is None:
            mode += "; page cache before load: " + ("dropped" if args.cold_cache else "warm")
        header = (
            f"state: {N_LAYERS} x Linear({cfg.d}, {cfg.d}), {cfg.n_params() / 1e6:.1f}M params, "
            f"fully_shard over {world} ranks ({where}) + AdamW = {state / MB:.0f} MB "
            f"({state / harness.MIB:.0f} MiB), ~{state / world / harness.MIB:.0f} MiB per "
            f"rank; rounds: {args.rounds}{mode}"
            f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; "
            f"torch {torch.__version__}; "
            + (f"dir: {data_dir} on {info['filesystem']}" if bucket is None else _where(bucket))
        )
        _log(header)
        results: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            results.extend(run_round(rnd, names, data_dir, args, bucket))
    rows = summarize(results, names)
    print(header.replace("\n", "  \n") + "\n")
    print(render_table(rows))
    for row in rows:
        if "error" in row:
            print(f"\nFailed on {args.store}: `{row['contender']}` {row['op']}: {row['error']}")
        elif row.get("failed_rounds"):
            print(
                f"\n`{row['contender']}` {row['op']}: failed in {row['failed_rounds']} round(s) "
                "(left out of its figures)"
            )
    for row in rows:
        if row["op"] == "load" and row.get("median_verify_s"):
            share = row["median_verify_s"] / row["median_s"]
            print(
                f"\n`{row['contender']}` load: checksum verification {row['median_verify_s']:.3f} s"
                f" (median over rounds of the slowest rank), {100 * share:.0f}% of the median load"
            )
    if not_run:
        print()
        for name, reason in not_run.items():
            print(f"Not run: `{name}`: {reason}")
    if args.json:
        payload = {
            "config": asdict(cfg),
            "world_size": world,
            "store": args.store,
            "machine": info,
            "summary": rows,
            "runs": results,
            "not_run": not_run,
        }
        harness.dump_json(args.json, payload, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options for the orchestrator, the launcher and the rank workers."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument(
        "--size-mb",
        type=float,
        default=DEFAULT_SIZE_MB,
        help=f"global model + AdamW state in MB (default {DEFAULT_SIZE_MB:.0f}); half per rank",
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
        help="where checkpoints go (default: a temporary directory in the repository)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="time saves that replace a checkpoint (two untimed saves to the same path first)",
    )
    p.add_argument(
        "--cold-cache",
        action="store_true",
        help="evict each checkpoint from the page cache before its load (default: read it "
        "all once, so that every contender loads from a warm cache)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: gloo, CPU tensors (default); cuda: NCCL, each rank's state on its own GPU",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=WORLD_SIZE,
        help=f"ranks (default {WORLD_SIZE}); with --device cuda at most the GPU count",
    )
    p.add_argument(
        "--store",
        choices=("local", *stores.STORES),
        default="local",
        help="local: checkpoints in --dir (default); s3 / gs: in a bucket on the test suite's "
        "local moto / fake-gcs-server, started once for the run",
    )
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    internal = p.add_argument_group("internal")
    internal.add_argument("--launch", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--contender", help=argparse.SUPPRESS)
    internal.add_argument("--op", choices=("save", "load"), help=argparse.SUPPRESS)
    internal.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    internal.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    internal.add_argument("--url", help=argparse.SUPPRESS)
    internal.add_argument("--endpoint", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Orchestrator by default; ``--launch`` starts torchrun; ``--rank-worker`` is one rank."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rank_worker:
        rank_worker(args)
        harness.exit_rank_worker()
    elif args.launch:
        return launch([a for a in argv if a != "--launch"], args.world_size)
    else:
        return orchestrate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
