"""FSDPStrategy on real processes: FSDP1 and FSDP2 (fully_shard) on CPU with gloo, real DCP.

Sharded saves, loads at the same and other world sizes and into plain models, full saves, and
all-or-nothing commits. Nothing is mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel

from lightweight_ckpt import CheckpointError, Fabric
from lightweight_ckpt.compat import fully_shard
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _sharded(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _mlp()
    if kind == "fsdp2":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    else:
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(10 + torch.distributed.get_rank())
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Gathered, unsharded model and optimizer state on every rank (for comparisons)."""
    return {
        "model": get_model_state_dict(model, options=FULL),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL)["state"],
    }


def _perturb(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for entry in optimizer.state.values():
        entry["exp_avg"].add_(1.0)


def _save_and_reload(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = _sharded(kind)
    fabric = Fabric()
    state = {"model": model, "optimizer": optimizer, "step": 2, "hparams": {"lr": 1e-2}}
    fabric.save(path, state)
    assert isinstance(fabric.strategy, FSDPStrategy)  # "auto" saw sharded modules
    expected = _full_state(model, optimizer)
    if rank == 0:
        torch.save(expected["model"], os.path.join(directory, "expected_model.pt"))
    _perturb(model, optimizer)
    assert_states_differ(_full_state(model, optimizer), expected)
    target = {"model": model, "optimizer": optimizer, "step": 0, "hparams": {}}
    remainder = fabric.load(path, target)
    assert remainder == {}
    assert_states_equal(_full_state(model, optimizer), expected)
    assert target["step"] == 2
    assert target["hparams"] == {"lr": 1e-2}
    fabric.barrier()


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_sharded_round_trip_and_plain_reload(tmp_path: Path, kind: str) -> None:
    run_distributed(_save_and_reload, 2, tmp_path, args=(kind, str(tmp_path)))
    path = tmp_path / "sharded"
    # one DCP directory: .metadata committed last, one piece per rank in one version folder
    entries = sorted(os.listdir(path))
    assert entries[0] == ".metadata"
    assert len(entries) == 2
    assert sorted(os.listdir(path / entries[1])) == [
        "__0_0.distcp",
        "__0_0.distcp.crc32",
        "__1_0.distcp",
        "__1_0.distcp.crc32",
    ]
    # stock DCP tooling reads it
    dcp_to_torch_save(path, tmp_path / "converted.pt")
    converted = torch.load(tmp_path / "converted.pt", weights_only=False)
    assert converted["step"] == 2
    expected = torch.load(tmp_path / "expected_model.pt", weights_only=True)
    assert_states_equal(converted["model"], expected)
    # world size 2 -> a plain, unsharded model in one process with no process group
    model = _mlp()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert_states_differ(model.state_dict(), expected)
    state: dict[str, Any] = {"model": model, "step": 0}
    remainder = Fabric().load(path, state)
    assert_states_equal(model.state_dict(), expected)
    assert state["step"] == 2
    assert remainder["hparams"] == {"lr": 1e-2}


def _full_save(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "full.ckpt")
    model, optimizer = _sharded(kind)
    fabric = Fabric(strategy=FSDPStrategy(state_dict_type="full"))
    fabric.save(path, {"model": model, "optimizer": optimizer})
    expected = _full_state(model, optimizer)
    if rank == 0:
        torch.save(expected["model"], os.path.join(directory, "expected_model.pt"))
    # one consolidated file written by rank 0, readable by plain torch.load
    raw = torch.load(path, weights_only=True)
    assert_states_equal(raw["model"], expected["model"])
    _perturb(model, optimizer)
    # the full file loads back into the sharded model
    Fabric(strategy="fsdp").load(path, {"model": model, "optimizer": optimizer})
    assert_states_equal(_full_state(model, optimizer), expected)


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_full_state_dict_file(tmp_path: Path, kind: str) -> None:
    run_distributed(_full_save, 2, tmp_path, args=(kind, str(tmp_path)))
    assert sorted(os.listdir(tmp_path))[:2] == ["expected_model.pt", "full.ckpt"]
    model = _mlp()
    expected = torch.load(tmp_path / "expected_model.pt", weights_only=True)
    assert_states_differ(model.state_dict(), expected)
    Fabric().load(tmp_path / "full.ckpt", {"model": model})
    assert_states_equal(model.state_dict(), expected)


class _FailOnRankOne(TorchCheckpointIO):
    """Fails the second save on rank 1 before any piece is written."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def prepare_sharded(self, path: Any, version: str, storage_options: Any = None) -> None:
        self.saves += 1
        if self.saves == 2 and torch.distributed.get_rank() == 1:
            raise OSError("disk full (injected)")
        super().prepare_sharded(path, version, storage_options)


def _failing_save(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = _sharded("fsdp2")
    fabric = Fabric(strategy=FSDPStrategy(checkpoint_io=_FailOnRankOne()))
    fabric.save(path, {"model": model})
    good = get_model_state_dict(model, options=FULL)
    _perturb(model, optimizer)
    with pytest.raises((CheckpointError, OSError)):
        fabric.save(path, {"model": model})  # every rank raises; none hangs
    fabric.barrier()
    fabric.load(path, {"model": model})  # the previous checkpoint is intact
    assert_states_equal(get_model_state_dict(model, options=FULL), good)


def test_failure_on_one_rank_raises_everywhere_and_keeps_previous(tmp_path: Path) -> None:
    run_distributed(_failing_save, 2, tmp_path, args=(str(tmp_path),))
