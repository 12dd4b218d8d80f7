"""Sharded loads: tensor items read straight into their targets, in two agreed steps.

On local disk the reader parses each stored item's zip directory and pickle (as a description
only) and reads its bytes into the target with one copy. Items it does not handle (a strided
stored tensor, non-tensor values) go through DCP's own path. The load is two steps agreed by
every rank: plan, check every CRC and read the plain values; then read the tensors and restore.
Real files and processes, nothing mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from lightweight_ckpt import Fabric, UnsafeCheckpointError
from lightweight_ckpt.collectives import RankFailedError
from lightweight_ckpt.formats import dcp_items, dcp_reader
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build


class Mixed(nn.Module):
    """Parameters and buffers of several dtypes and layouts, one stored strided."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(16, 8)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(8, 16, generator=generator))
        # a transposed view of a compact storage: saved as is (strided), off the fast path
        self.transposed = nn.Parameter(torch.randn(6, 4, generator=generator).t())
        self.register_buffer("bf16", torch.randn(5, 3, generator=generator).to(torch.bfloat16))
        self.register_buffer("counts", torch.randint(0, 1000, (7,), generator=generator))
        self.register_buffer("scalar", torch.tensor(float(seed)))
        self.register_buffer("empty", torch.empty(0, 3))


def _read_item(path: Path, fqn: str) -> tuple[int, int, int]:
    with (path / ".metadata").open("rb") as file:
        metadata = dcp_reader.MetadataUnpickler(file).load()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    fd = os.open(path / info.relative_path, os.O_RDONLY)
    return fd, int(info.offset), int(info.length)


def test_a_sharded_load_restores_every_dtype_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    source = Mixed(seed=1)
    expected = snapshot(source)
    Fabric(strategy=FSDPStrategy()).save(path, {"model": source, "step": 5})

    target = Mixed(seed=2)
    assert_states_differ(target, expected)
    state: dict[str, Any] = {"model": target, "step": 0}
    Fabric().load(path, state)
    assert_states_equal(target, expected)
    assert state["step"] == 5
    assert target.bf16.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("fqn", "fast"),
    [("model.linear.weight", True), ("model.bf16", True), ("model.transposed", False)],
)
def test_which_items_are_read_directly(tmp_path: Path, fqn: str, fast: bool) -> None:
    path = tmp_path / "sharded"
    source = Mixed(seed=1)
    Fabric(strategy=FSDPStrategy()).save(path, {"model": source})
    stored = dict(source.state_dict())[fqn.removeprefix("model.")]
    target = torch.zeros_like(stored).contiguous()
    request = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(fqn),
        dest_offsets=torch.Size([0] * stored.dim()),
        storage_index=MetadataIndex(fqn, (0,) * stored.dim()),
        storage_offsets=torch.Size([0] * stored.dim()),
        lengths=stored.shape,
    )
    fd, offset, length = _read_item(path, fqn)
    try:
        if fast:
            dcp_items.read_tensor_item(fd, offset, length, request, target)
            assert torch.equal(target, stored)
        else:
            with pytest.raises(dcp_items.OffFastPathError):
                dcp_items.read_tensor_item(fd, offset, length, request, target)
            assert not target.any()  # nothing was written before it gave up
    finally:
        os.close(fd)


def test_a_block_of_rows_is_read_directly(tmp_path: Path) -> None:
    # loading at another world size reads parts of stored items: rows 2..5 of the weight
    path = tmp_path / "sharded"
    source = Mixed(seed=1)
    Fabric(strategy=FSDPStrategy()).save(path, {"model": source})
    fqn = "model.linear.weight"
    request = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(fqn),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex(fqn, (0, 0)),
        storage_offsets=torch.Size([2, 0]),
        lengths=torch.Size([4, 16]),
    )
    fd, offset, length = _read_item(path, fqn)
    try:
        target = torch.zeros(4, 16)
        dcp_items.read_tensor_item(fd, offset, length, request, target)
        assert torch.equal(target, source.linear.weight.detach()[2:6])
        columns = ReadItem(
            **{
                **request.__dict__,
                "storage_offsets": torch.Size([0, 4]),
                "lengths": torch.Size([8, 8]),
            }
        )
        with pytest.raises(dcp_items.OffFastPathError):  # not one block: DCP's path reads it
            dcp_items.read_tensor_item(fd, offset, length, columns, torch.zeros(8, 8))
        outside = ReadItem(**{**request.__dict__, "storage_offsets": torch.Size([6, 0])})
        with pytest.raises(dcp_items.OffFastPathError):  # rows 6..9 of 8: never read
            dcp_items.read_tensor_item(fd, offset, length, outside, torch.zeros(4, 16))
    finally:
        os.close(fd)


# -- two agreed steps: everything that can fail is checked before any target is written --------


class Opaque:
    """A plain value ``weights_only=True`` refuses (any class outside torch's allowlist)."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_a_refused_value_fails_the_load_before_any_tensor_is_written(tmp_path: Path) -> None:
    # values are read in the first step: DCP's own pass read them after the tensors before it
    path = tmp_path / "sharded"
    source = Mixed(seed=1)
    Fabric(strategy=FSDPStrategy()).save(path, {"model": source, "extra": Opaque(3)})
    target = Mixed(seed=2)
    before = snapshot(target)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        Fabric().load(path, {"model": target, "extra": None})
    assert_states_equal(target, before)  # nothing restored
    state: dict[str, Any] = {"model": target, "extra": None}
    Fabric().load(path, state, weights_only=False)  # trusted: loads
    assert state["extra"].value == 3
    assert_states_equal(target, snapshot(source))


class _FailsOnRank:
    """A stateful object whose ``load_state_dict`` raises on one rank."""

    def __init__(self, failing_rank: int) -> None:
        self.failing_rank = failing_rank
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": torch.tensor(7)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if dist.get_rank() == self.failing_rank:
            raise RuntimeError("refused on this rank (injected)")
        self.loaded = state_dict


def _restore_fails_on_one_rank(rank: int, world_size: int, directory: str) -> None:
    path = Path(directory) / "sharded"
    model, optimizer = build("fsdp2")
    fabric = Fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer, "hook": _FailsOnRank(-1)})
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type differs by rank
        fabric.load(path, {"model": model, "optimizer": optimizer, "hook": _FailsOnRank(1)})
    if rank == 1:
        assert "refused on this rank" in str(raised.value)
    else:
        assert isinstance(raised.value, RankFailedError)
        assert "restore failed on rank(s) [1]" in str(raised.value)
    fabric.barrier()  # no rank hangs: every one reached here


@pytest.mark.distributed
def test_a_restore_failing_on_one_rank_raises_on_every_rank(tmp_path: Path) -> None:
    run_distributed(_restore_fails_on_one_rank, 2, tmp_path, args=(str(tmp_path),))
