"""NCCL on two GPUs: the broadcast of a file read once, and DDP/FSDP2 round trips.

NCCL sends only CUDA tensors, so ``collectives.broadcast_tree`` stages CPU tensors through the
current device; every DDP/FSDP load of a remote file goes through it. Marked ``gpu``: skipped
unless two CUDA devices are present (run them where a GPU machine is lent).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightweight_ckpt import Fabric
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed
from tests.strategies.test_ddp import _broadcast_tree

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs two CUDA devices",
    ),
]


def _staged_broadcast(rank: int, world_size: int) -> None:
    from lightweight_ckpt import collectives

    assert collectives.staging_device() == torch.device("cuda", rank)
    _broadcast_tree(rank, world_size)  # the gloo test's tree, bitwise, through the GPU
    collectives.STAGE_BYTES = 1000  # a tensor in several pieces through one buffer
    big = torch.arange(3001, dtype=torch.float64)
    got = collectives.broadcast_tree({"big": big} if rank == 0 else None)
    assert got["big"].device.type == "cpu"
    assert torch.equal(got["big"], big)


def test_broadcast_tree_under_nccl(tmp_path: Path) -> None:
    run_distributed(_staged_broadcast, 2, tmp_path, backend="nccl")


def _round_trip(rank: int, world_size: int, directory: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lightweight_ckpt.compat import fully_shard
    from lightweight_ckpt.strategies import DDPStrategy, FSDPStrategy
    from tests.strategies.test_matrix import mlp, reference

    device = torch.device("cuda", rank)
    ddp = DistributedDataParallel(mlp(0).to(device), device_ids=[rank])
    fabric = Fabric()
    path = os.path.join(directory, "ddp.pt")
    fabric.save(path, {"model": ddp})
    assert isinstance(fabric.strategy, DDPStrategy)
    expected = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    with torch.no_grad():
        for param in ddp.parameters():
            param.add_(1.0)
    assert_states_differ(ddp.module.state_dict(), expected)
    fabric.load(path, {"model": ddp})
    assert_states_equal(ddp.module.state_dict(), expected)

    model = mlp(1).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8, device=device)).sum().backward()
    optimizer.step()
    fabric = Fabric()
    sharded = os.path.join(directory, "sharded")
    fabric.save(sharded, {"model": model, "optimizer": optimizer})
    assert isinstance(fabric.strategy, FSDPStrategy)
    saved = reference("fsdp2", model, optimizer)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert_states_differ(reference("fsdp2", model, optimizer)["model"], saved["model"])
    fabric.load(sharded, {"model": model, "optimizer": optimizer})
    assert_states_equal(reference("fsdp2", model, optimizer), saved)
    fabric.barrier()


def test_ddp_and_fsdp2_round_trips_under_nccl(tmp_path: Path) -> None:
    run_distributed(_round_trip, 2, tmp_path, args=(str(tmp_path),), backend="nccl")
