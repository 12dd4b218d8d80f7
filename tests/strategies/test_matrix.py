"""Save → load is bitwise for model AND optimizer state, for every strategy and world size.

{single process, DDP, FSDP1, FSDP2} x {world 1, 2, 4}: one ``run_distributed`` call per cell
does the save, perturbs the live state (so it differs), loads it back with ``strict=True`` and
compares. World 1 for DDP/FSDP is a real one-rank process group. Sharded checkpoints also load at
other world sizes (FSDP2 4 → 2, FSDP1 2 → 1, FSDP1 and FSDP2 2 → 4), model and optimizer
bitwise, strict. Real processes, gloo on CPU, nothing mocked.

The helpers here (``build``, ``reference``, ``perturb``) are shared with ``test_crossload`` and
``test_sharded_faults``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import Fabric
from lightweight_ckpt.compat import fully_shard
from lightweight_ckpt.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.helpers.models import Tiny
from tests.helpers.processes import run_cli

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)
SHARDED_KINDS = ("fsdp1", "fsdp2")


def mlp(seed: int = 0) -> nn.Module:
    """A model FSDP shards layer by layer (no BatchNorm: FSDP does not sync buffers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def wrap(kind: str, model: nn.Module) -> nn.Module:
    """Wrap a plain model as ``kind`` ("plain", "ddp", "fsdp1", "fsdp2")."""
    if kind == "ddp":
        return DistributedDataParallel(model)
    if kind == "fsdp1":
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    if kind == "fsdp2":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    return model


def build(
    kind: str, seed: int = 0, steps: int = 2, arch: str | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A wrapped model of ``kind`` and its AdamW after ``steps`` real steps (optimizer state).

    ``arch``: ``"mlp"`` (the default for sharded kinds) or ``"tiny"`` (``Tiny``: BatchNorm
    buffers and a non-persistent buffer; the default for the others). ``seed`` picks the initial
    weights (the same on every rank) and the data (different on every rank).
    """
    arch = arch or ("mlp" if kind in SHARDED_KINDS else "tiny")
    if arch == "mlp":
        model = wrap(kind, mlp(seed))
    else:
        torch.manual_seed(seed)
        model = wrap(kind, Tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(1000 * seed + 10 + rank)  # different data on every rank
    train_steps(model, optimizer, steps)
    return model, optimizer


def reference(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state a checkpoint of ``model`` holds, as plain tensors, on this rank.

    Sharded kinds: the gathered full model and optimizer state dicts (param_groups included).
    Others: the unwrapped module's and the optimizer's own state dicts (cloned).
    """
    if kind in SHARDED_KINDS:
        # cloned: at world 1 the "gathered" tensors may be the live parameters themselves
        return snapshot(
            {
                "model": get_model_state_dict(model, options=FULL),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
            }
        )
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {"model": snapshot(inner), "optimizer": snapshot(optimizer)}


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (DDP checkpoints hold rank 0's state)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Real optimizer steps (input width 8 for both models; FSDP1 flattens parameters)."""
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()


def perturb(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Change weights, buffers, every optimizer moment and step, and a hyperparameter."""
    train_steps(model, optimizer, 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for entry in optimizer.state.values():
        entry["exp_avg"].add_(1.0)
    for group in optimizer.param_groups:
        group["lr"] = 0.5


def checkpoint_path(kind: str, directory: str) -> str:
    """Sharded kinds save a directory, the others one file."""
    return os.path.join(directory, "ckpt" if kind in SHARDED_KINDS else "ckpt.pt")


def _round_trip(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = checkpoint_path(kind, directory)
    model, optimizer = build(kind)
    # "auto" picks DDP only for more than one rank; a one-rank DDP group names it
    fabric = Fabric(strategy="ddp") if kind == "ddp" and world_size == 1 else Fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    wanted = {"ddp": DDPStrategy, "fsdp1": FSDPStrategy, "fsdp2": FSDPStrategy}[kind]
    assert type(fabric.strategy) is wanted
    expected = reference(kind, model, optimizer)
    if kind == "ddp":
        expected = from_rank_zero(expected)
    if rank == 0:
        torch.save(expected, os.path.join(directory, "expected.pt"))

    perturb(model, optimizer)
    assert_states_differ(reference(kind, model, optimizer)["model"], expected["model"])
    assert_states_differ(reference(kind, model, optimizer)["optimizer"], expected["optimizer"])

    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(path, state)  # strict=True
    assert remainder == {}
    assert state["step"] == 2
    assert fabric.last_load_report is not None
    assert fabric.last_load_report.clean
    after = reference(kind, model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"], expected["optimizer"])
    # training goes on from the restored state on every rank alike
    train_steps(model, optimizer, 1)
    fabric.barrier()


def test_single_process_round_trip(tmp_path: Path) -> None:
    model, optimizer = build("plain")
    fabric = Fabric()
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    assert type(fabric.strategy) is SingleDeviceStrategy
    expected = reference("plain", model, optimizer)
    perturb(model, optimizer)
    assert_states_differ(reference("plain", model, optimizer)["model"], expected["model"])
    assert_states_differ(reference("plain", model, optimizer)["optimizer"], expected["optimizer"])
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(path, state) == {}
    assert state["step"] == 2
    after = reference("plain", model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"], expected["optimizer"])


def _check_layout(kind: str, directory: Path, world_size: int) -> None:
    path = Path(checkpoint_path(kind, str(directory)))
    if kind not in SHARDED_KINDS:
        assert path.is_file()
        return
    entries = sorted(os.listdir(path))
    assert entries[0] == ".metadata"
    versions = [e for e in entries if e.startswith("v-")]
    assert len(versions) == 1
    assert entries == [".metadata", versions[0]]
    pieces = sorted(os.listdir(path / versions[0]))
    names = [
        f"__{rank}_0.distcp{suffix}" for rank in range(world_size) for suffix in ("", ".crc32")
    ]
    assert pieces == sorted(names)  # one piece per rank, each with its checksum record


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2"])
def test_round_trip_matrix(tmp_path: Path, kind: str, world_size: int) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    run_distributed(_round_trip, world_size, tmp_path, args=(kind, str(directory)))
    _check_layout(kind, directory, world_size)
    if kind in SHARDED_KINDS and world_size == 2:
        _check_consolidated(directory, tmp_path / "consolidated.pt")


def _check_consolidated(directory: Path, out: Path) -> None:
    """``python -m lightweight_ckpt consolidate`` of the world-2 checkpoint: the full state."""
    result = run_cli("consolidate", str(directory / "ckpt"), str(out))
    assert result.returncode == 0, result.stderr
    consolidated = torch.load(out, weights_only=True)
    expected = torch.load(directory / "expected.pt", weights_only=True)
    assert consolidated["step"] == 2
    assert_states_equal(consolidated["model"], expected["model"])
    assert_states_equal(consolidated["optimizer"]["state"], expected["optimizer"]["state"])


def _load_at_other_world(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = checkpoint_path(kind, directory)
    expected = torch.load(os.path.join(directory, "expected.pt"), weights_only=True)
    model, optimizer = build(kind, seed=5, steps=1)
    perturb(model, optimizer)
    assert_states_differ(reference(kind, model, optimizer)["model"], expected["model"])
    assert_states_differ(reference(kind, model, optimizer)["optimizer"], expected["optimizer"])
    fabric = Fabric()
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(path, state) == {}  # strict=True
    assert state["step"] == 2
    after = reference(kind, model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"], expected["optimizer"])
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("kind", "save_world", "load_world"),
    [
        pytest.param("fsdp2", 4, 2, marks=pytest.mark.slow),
        ("fsdp1", 2, 1),
        ("fsdp2", 2, 4),
        pytest.param("fsdp1", 2, 4, marks=pytest.mark.slow),
    ],
)
def test_sharded_reshard(tmp_path: Path, kind: str, save_world: int, load_world: int) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    run_distributed(_round_trip, save_world, tmp_path, args=(kind, str(directory)))
    run_distributed(_load_at_other_world, load_world, tmp_path, args=(kind, str(directory)))
