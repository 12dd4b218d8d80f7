"""A failure on one rank raises on every rank, promptly, and changes nothing, under FSDP1 too.

FSDP1's state-dict getters and setters are collectives. A save whose user ``state_dict()`` raises
on one rank, a load whose metadata or file read fails on one rank, and a restore a user object
refuses on one rank must not leave the other ranks inside those collectives: every rank raises
(the failing rank its own error, the others ``RankFailedError`` naming it, which only the
agreement raises: a collective timeout would raise something else), the previous checkpoint and
the live state are unchanged. Real processes, gloo on CPU, nothing mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from lightweight_ckpt import Fabric
from lightweight_ckpt.collectives import RankFailedError
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build, from_rank_zero, perturb, reference

pytestmark = pytest.mark.distributed


class Hook:
    """A stateful object whose ``state_dict`` or ``load_state_dict`` raises on one rank."""

    def __init__(self, fail_save_on: int = -1, fail_load_on: int = -1) -> None:
        self.fail_save_on = fail_save_on
        self.fail_load_on = fail_load_on
        self.epoch = 1

    def state_dict(self) -> dict[str, Any]:
        if dist.get_rank() == self.fail_save_on:
            raise RuntimeError("state_dict refused on this rank (injected)")
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if dist.get_rank() == self.fail_load_on:
            raise RuntimeError("load_state_dict refused on this rank (injected)")
        self.epoch = state_dict["epoch"]


def _raises_everywhere(rank: int, step: str, own: str, fn: Any) -> None:
    """``fn()`` raises on every rank: rank 1 its own error, the others the agreed one."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type differs by rank
        fn()
    if rank == 1:
        assert own in str(raised.value), repr(raised.value)
    else:
        assert isinstance(raised.value, RankFailedError), repr(raised.value)
        assert f"{step} failed on rank(s) [1]" in str(raised.value)


# -- save: a user state_dict() raising on one rank -----------------------------------------------


def _save_fails(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "sharded" if kind == "fsdp1" else "ckpt.pt")
    model, optimizer = build(kind)
    fabric = Fabric()
    fabric.save(path, {"hook": Hook(), "model": model, "optimizer": optimizer})
    good = from_rank_zero(reference(kind, model, optimizer))  # DDP: rank 0's buffers
    perturb(model, optimizer)
    # the failing object comes first: the old order let rank 1 skip FSDP1's getters
    state = {"hook": Hook(fail_save_on=1), "model": model, "optimizer": optimizer}
    _raises_everywhere(rank, "collect", "state_dict refused", lambda: fabric.save(path, state))
    fabric.barrier()
    state["hook"] = Hook()
    fabric.load(path, state)  # the previous checkpoint is intact
    after = reference(kind, model, optimizer)
    assert_states_equal(after["model"], good["model"])
    assert_states_equal(after["optimizer"]["state"], good["optimizer"]["state"])
    fabric.barrier()


@pytest.mark.parametrize("kind", ["ddp", "fsdp1"])
def test_a_state_dict_raising_on_one_rank_fails_the_save_everywhere(
    tmp_path: Path, kind: str
) -> None:
    run_distributed(_save_fails, 2, tmp_path, args=(kind, str(tmp_path)))


# -- load under FSDP1: open or restore failing on one rank ---------------------------------------


class _MetadataFailsOnRankOne(TorchCheckpointIO):
    """Reading a sharded checkpoint's metadata fails on rank 1 (an I/O error there)."""

    def read_sharded_metadata(self, path: Any, storage_options: Any = None) -> Any:
        if dist.get_rank() == 1:
            raise OSError("metadata unreadable on this rank (injected)")
        return super().read_sharded_metadata(path, storage_options)


class _OpenFailsOnRankOne(TorchCheckpointIO):
    """Opening a single file fails on rank 1."""

    def open_checkpoint(self, path: Any, **kwargs: Any) -> Any:
        if dist.get_rank() == 1:
            raise OSError("file unreadable on this rank (injected)")
        return super().open_checkpoint(path, **kwargs)


def _fsdp1_load_fails(rank: int, world_size: int, directory: str) -> None:
    sharded, full = os.path.join(directory, "sharded"), os.path.join(directory, "full.pt")
    model, optimizer = build("fsdp1")
    Fabric().save(sharded, {"model": model, "optimizer": optimizer, "hook": Hook()})
    Fabric(strategy=FSDPStrategy(state_dict_type="full")).save(
        full, {"model": model, "optimizer": optimizer}
    )
    expected = reference("fsdp1", model, optimizer)
    perturb(model, optimizer)
    before = reference("fsdp1", model, optimizer)
    assert_states_differ(before["model"], expected["model"])
    hook = Hook(fail_load_on=1)
    hook.epoch = 0
    state = {"model": model, "optimizer": optimizer, "hook": hook}
    state_file = {"model": model, "optimizer": optimizer}

    # the open step fails on rank 1 (sharded: metadata; full file: the file itself)
    failing = Fabric(strategy=FSDPStrategy(checkpoint_io=_MetadataFailsOnRankOne()))
    _raises_everywhere(rank, "open", "metadata unreadable", lambda: failing.load(sharded, state))
    failing = Fabric(strategy=FSDPStrategy(checkpoint_io=_OpenFailsOnRankOne()))
    _raises_everywhere(rank, "read", "file unreadable", lambda: failing.load(full, state_file))
    assert_states_equal(reference("fsdp1", model, optimizer), before)

    # the restore step fails on rank 1 (a user object refuses): nothing changes on any rank
    fabric = Fabric()
    _raises_everywhere(
        rank, "restore", "load_state_dict refused", lambda: fabric.load(sharded, state)
    )
    assert hook.epoch == 0
    assert_states_equal(reference("fsdp1", model, optimizer), before)

    # and the same load goes through once nobody refuses
    hook.fail_load_on = -1
    fabric.load(sharded, state)
    assert hook.epoch == 1
    assert_states_equal(reference("fsdp1", model, optimizer), expected)
    fabric.barrier()


def test_fsdp1_load_failing_on_one_rank_raises_everywhere_and_changes_nothing(
    tmp_path: Path,
) -> None:
    run_distributed(_fsdp1_load_fails, 2, tmp_path, args=(str(tmp_path),))
