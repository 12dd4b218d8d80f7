"""A user object refusing its load on one rank changes no module or optimizer on any rank.

All or nothing across ranks: when one rank's ``Stateful.load_state_dict`` raises, every rank
raises, and on every rank the model's parameters, the optimizer's state, the user objects and
the plain values are what they were before the load (they differ from the checkpoint's). A
sharded read used to write the tensors into FSDP2's (and DDP's) own parameters and optimizer
moments before the user objects were restored, so a refusal on rank 1 left every rank's model
loaded and its user objects rolled back. Then the same load goes through once nobody refuses.
Real processes, gloo on CPU, nothing mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightweight_ckpt import Fabric
from lightweight_ckpt.collectives import RankFailedError
from lightweight_ckpt.io import AsyncCheckpointIO
from lightweight_ckpt.strategies import DDPStrategy, FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build, from_rank_zero, perturb, reference

pytestmark = pytest.mark.distributed


SAVED_EPOCH = 7


class Hook:
    """A stateful object with a tensor and an int; refuses the saved state on ``fail_load_on``."""

    def __init__(self, fail_load_on: int = -1) -> None:
        self.fail_load_on = fail_load_on
        self.epoch = 1
        self.counts = torch.arange(4, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "counts": self.counts}  # its live tensor, as users do

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # refuses the checkpoint's content only: its own previous state, put back, it accepts
        if dist.get_rank() == self.fail_load_on and state_dict["epoch"] == SAVED_EPOCH:
            raise RuntimeError("load_state_dict refused on this rank (injected)")
        self.epoch = state_dict["epoch"]
        self.counts.copy_(state_dict["counts"])


# case: (model kind, layout written, strategy that saves, IO that loads)
CASES = {
    "fsdp2-sharded": ("fsdp2", "sharded"),
    "fsdp2-sharded-async-io": ("fsdp2", "sharded"),
    "fsdp1-sharded": ("fsdp1", "sharded"),
    "fsdp2-full-file": ("fsdp2", "file"),
    "ddp-file": ("ddp", "file"),
    "ddp-from-sharded": ("ddp", "sharded"),
}


def _saver(case: str) -> Fabric:
    if case == "ddp-file":
        return Fabric(strategy=DDPStrategy())
    if case == "fsdp2-full-file":
        return Fabric(strategy=FSDPStrategy(state_dict_type="full"))
    return Fabric(strategy=FSDPStrategy())  # sharded, for DDP modules too


def _loader(case: str) -> Fabric:
    if case == "fsdp2-sharded-async-io":  # an IO with its own (collective) sharded read
        return Fabric(strategy=FSDPStrategy(checkpoint_io=AsyncCheckpointIO()))
    return Fabric()  # "auto": FSDP for the FSDP models, DDP for the DDP one


def _live(kind: str, model: Any, optimizer: Any) -> dict[str, Any]:
    """This rank's model and optimizer state as they are now (DDP: the replica, index-keyed)."""
    return reference(kind, model, optimizer)


def _refused_on_rank_one(rank: int, world_size: int, case: str, directory: str) -> None:
    kind, layout = CASES[case]
    path = os.path.join(directory, "ckpt" if layout == "sharded" else "ckpt.pt")
    model, optimizer = build(kind, arch="mlp")
    saved_hook = Hook()
    saved_hook.epoch, saved_hook.counts = SAVED_EPOCH, torch.full((4,), 7.0)
    _saver(case).save(path, {"model": model, "optimizer": optimizer, "hook": saved_hook, "step": 2})
    expected = _live(kind, model, optimizer)
    if kind == "ddp" and layout == "file":
        expected = from_rank_zero(expected)  # rank 0 wrote the file

    perturb(model, optimizer)
    before = snapshot(_live(kind, model, optimizer))
    assert_states_differ(before["model"], expected["model"])
    assert_states_differ(before["optimizer"]["state"], expected["optimizer"]["state"])

    hook = Hook(fail_load_on=1)
    hook.epoch = 0
    state = {"model": model, "optimizer": optimizer, "hook": hook, "step": 0}
    fabric = _loader(case)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type differs by rank
        fabric.load(path, state)
    if rank == 1:
        assert "load_state_dict refused" in str(raised.value), repr(raised.value)
    else:
        assert isinstance(raised.value, RankFailedError), repr(raised.value)
        assert "failed on rank(s) [1]" in str(raised.value)

    # nothing changed on any rank: tensors, optimizer state and hyperparameters, user objects
    after = _live(kind, model, optimizer)
    assert_states_equal(after["model"], before["model"])
    assert_states_equal(after["optimizer"], before["optimizer"])
    assert hook.epoch == 0
    assert_states_equal(hook.counts, torch.arange(4, dtype=torch.float32))
    assert state["step"] == 0
    fabric.barrier()

    # the same load goes through once nobody refuses: the checkpoint's state on every rank
    hook.fail_load_on = -1
    fabric.load(path, state)
    after = _live(kind, model, optimizer)
    if kind == "ddp" and layout == "sharded":  # DDP's optimizer: index-keyed, its own order
        assert_states_equal(after["model"], expected["model"])
    else:
        assert_states_equal(after, expected)
    assert hook.epoch == SAVED_EPOCH
    assert_states_equal(hook.counts, torch.full((4,), 7.0))
    assert state["step"] == 2
    fabric.barrier()
    fabric.teardown()


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_object_refusing_on_one_rank_changes_no_tensor_on_any_rank(
    tmp_path: Path, case: str
) -> None:
    run_distributed(_refused_on_rank_one, 2, tmp_path, args=(case, str(tmp_path)))
