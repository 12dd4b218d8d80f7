"""DDPStrategy on real processes: gloo on CPU, real DistributedDataParallel, nothing mocked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import CheckpointError, CheckpointWriteError, Fabric
from lightweight_ckpt.strategies import DDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.helpers.models import Tiny, train_steps

pytestmark = pytest.mark.distributed


def _ddp_state() -> tuple[DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
    model = DistributedDataParallel(Tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + torch.distributed.get_rank())  # different data per rank
    train_steps(model, optimizer, 2)
    return model, optimizer


def _perturb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for entry in optimizer.state.values():
        entry["exp_avg"].add_(1.0)


def _round_trip(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "ddp.ckpt")
    model, optimizer = _ddp_state()
    fabric = Fabric()
    assert isinstance(fabric.strategy, DDPStrategy)
    assert (fabric.global_rank, fabric.world_size) == (rank, world_size)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    # save returned: the file is committed and complete on every rank
    assert sorted(os.listdir(directory)) == ["ddp.ckpt"]
    # the checkpoint holds rank 0's state (BatchNorm statistics differ per rank after the last
    # forward): every rank restores rank 0's.
    expected = [{"model": snapshot(model.module), "optimizer": snapshot(optimizer)}]
    torch.distributed.broadcast_object_list(expected, src=0)
    expected = expected[0]
    _perturb(model, optimizer)
    assert_states_differ(model.module, expected["model"])
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(path, state)
    assert remainder == {}
    assert state["step"] == 2
    assert_states_equal(model.module, expected["model"])
    assert_states_equal(optimizer, expected["optimizer"])
    # one file in the single-device format: keys without the DDP "module." prefix
    raw = torch.load(path, weights_only=True)
    assert_states_equal(raw["model"], expected["model"])
    fabric.barrier()


def test_ddp_round_trip_world_2(tmp_path: Path) -> None:
    run_distributed(_round_trip, 2, tmp_path, args=(str(tmp_path / "ckpt"),))
    # the DDP file loads into a plain model in a single process with no process group
    model = Tiny()
    before = snapshot(model)
    Fabric().load(tmp_path / "ckpt" / "ddp.ckpt", {"model": model}, strict=True)
    assert_states_differ(model, before)


def _rank_zero_fails(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "ddp.ckpt")
    model, _ = _ddp_state()
    fabric = Fabric(strategy="ddp")
    fabric.save(path, {"model": model})
    good = torch.load(path, weights_only=True)["model"]  # rank 0's state
    fabric.barrier()
    if rank == 0:
        os.rename(path, path + ".bak")
        os.mkdir(path)  # a directory in the way: rank 0's write fails
    fabric.barrier()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    error_type = CheckpointWriteError if rank == 0 else CheckpointError
    with pytest.raises(error_type) as info:
        fabric.save(path, {"model": model})
    assert "save failed on rank(s) [0]" in str(info.value) or rank == 0
    fabric.barrier()
    if rank == 0:
        os.rmdir(path)
        os.rename(path + ".bak", path)
    fabric.barrier()
    # the previous checkpoint is intact and loads on every rank
    assert_states_differ(model.module.state_dict(), good)
    fabric.load(path, {"model": model})
    assert_states_equal(model.module.state_dict(), good)


def test_ddp_failure_on_rank_zero_raises_on_every_rank(tmp_path: Path) -> None:
    run_distributed(_rank_zero_fails, 2, tmp_path, args=(str(tmp_path),))


def _rank_one_mismatch(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "ddp.ckpt")
    model, optimizer = _ddp_state()
    fabric = Fabric(strategy="ddp")
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    _perturb(model, optimizer)
    before = {"model": snapshot(model.module), "optimizer": snapshot(optimizer)}
    state: dict[str, object] = {"model": model, "optimizer": optimizer, "step": 0}
    if rank == 1:
        state["scaler"] = {}  # not in the file: a strict load fails on this rank only
    with pytest.raises(CheckpointError) as info:
        fabric.load(path, state)
    if rank == 0:
        assert "read failed on rank(s) [1]" in str(info.value)
    # checked on every rank before any rank restored: no rank's state changed
    assert state["step"] == 0
    assert_states_equal(model.module, before["model"])
    assert_states_equal(optimizer, before["optimizer"])
    state.pop("scaler", None)
    fabric.load(path, state)  # the same load without the mismatch restores on every rank
    assert state["step"] == 2
    assert_states_differ(model.module, before["model"])


def test_ddp_load_failing_on_one_rank_changes_no_rank(tmp_path: Path) -> None:
    run_distributed(_rank_one_mismatch, 2, tmp_path, args=(str(tmp_path),))


def _load_raw(rank: int, world_size: int, path: str) -> None:
    model, _ = _ddp_state()
    expected = torch.load(path, weights_only=True)
    assert_states_differ(model.module.state_dict(), expected)
    Fabric().load_raw(path, model)
    assert_states_equal(model.module.state_dict(), expected)


def test_ddp_load_raw_of_plain_file(tmp_path: Path) -> None:
    torch.manual_seed(7)
    path = tmp_path / "friend.pt"
    torch.save(Tiny().state_dict(), path)
    run_distributed(_load_raw, 2, tmp_path, args=(str(path),))


# -- broadcast_tree: what DDP uses to share a remote file read once ------------------------------


class Pair(NamedTuple):
    a: torch.Tensor
    b: str


def _broadcast_tree(rank: int, world_size: int) -> None:
    import collections

    from lightweight_ckpt.collectives import broadcast_tree

    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tree = {
        "weights": {"tied": shared, "also": shared, "t": shared.t()},  # a view, non-contiguous
        "kinds": [torch.tensor([True, False]), torch.ones(3, dtype=torch.bfloat16) / 3],
        "empty": torch.empty(0, 4),
        "pair": Pair(torch.tensor(7), "label"),
        "ordered": collections.OrderedDict(z=1, a=torch.tensor([2, 3], dtype=torch.int64)),
        "plain": {"step": 3, "name": "x", "none": None},
    }
    got = broadcast_tree(tree if rank == 0 else None)
    if rank == 0:
        assert got is tree
        return
    assert got["weights"]["tied"] is got["weights"]["also"]  # shared once, stays shared
    assert torch.equal(got["weights"]["tied"], shared)
    assert torch.equal(got["weights"]["t"], shared.t())
    assert got["kinds"][0].dtype == torch.bool
    assert torch.equal(got["kinds"][0], tree["kinds"][0])
    assert torch.equal(got["kinds"][1], tree["kinds"][1])
    assert got["empty"].shape == (0, 4)
    assert isinstance(got["pair"], Pair)
    assert got["pair"].a.item() == 7
    assert got["pair"].b == "label"
    assert isinstance(got["ordered"], collections.OrderedDict)
    assert list(got["ordered"]) == ["z", "a"]
    assert torch.equal(got["ordered"]["a"], tree["ordered"]["a"])
    assert got["plain"] == tree["plain"]


def test_broadcast_tree_gives_every_rank_rank0s_tensors_and_values(tmp_path: Path) -> None:
    run_distributed(_broadcast_tree, 2, tmp_path)


def _broadcast_staged(rank: int, world_size: int) -> None:
    from lightweight_ckpt import collectives

    # the staged path NCCL takes, through a CPU buffer here: 10 pieces of 1000 bytes and a rest
    collectives.STAGE_BYTES = 1000
    data = torch.arange(10_500, dtype=torch.int64).view(torch.uint8)[:10_500].clone()
    got = data.clone() if rank == 0 else torch.zeros_like(data)
    assert rank == 0 or not torch.equal(got, data)
    collectives.broadcast_bytes(got, 0, torch.device("cpu"))
    assert torch.equal(got, data)
    assert collectives.staging_device() is None  # gloo sends CPU tensors itself


@pytest.mark.distributed
def test_broadcast_bytes_staged_in_pieces(tmp_path: Path) -> None:
    run_distributed(_broadcast_staged, 2, tmp_path)
