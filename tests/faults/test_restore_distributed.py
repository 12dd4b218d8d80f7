"""A module load refused on one rank changes nothing on any rank (DDP file, FSDP2 directory).

The refusal (a ``load_state_dict`` pre-hook raising on rank 1 only) must come before any rank
writes checkpoint bytes into its parameters: ``state.rehearse_restore`` runs it before the fill,
so every rank raises and every rank's model and optimizer are bitwise as before; once the hook
accepts, the same checkpoint loads. Real processes, gloo, nothing mocked. For the FSDP2 sharded
cases ``strategies/steps.restore`` agrees on the rehearsal before its read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import Fabric
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed
from tests.helpers.models import add_load_pre_hook
from tests.strategies.test_matrix import build, checkpoint_path, from_rank_zero, reference

pytestmark = pytest.mark.distributed


class RefuseOnRank:
    """A ``load_state_dict`` pre-hook that raises on one rank while ``armed``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.armed = True

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.armed and dist.get_rank() == self.rank:
            raise RuntimeError("load refused on this rank (injected)")


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _compared(kind: str, model: nn.Module, optimizer: Any, entries: tuple[str, ...]) -> Any:
    return {key: reference(kind, model, optimizer)[key] for key in entries}


def _refused_on_one_rank(
    rank: int, world_size: int, kind: str, entries: tuple[str, ...], directory: str
) -> None:
    path = checkpoint_path(kind, directory)
    model, optimizer = build(kind)
    Fabric().save(path, {"model": model, "optimizer": optimizer, "step": 2})
    saved = _compared(kind, model, optimizer, entries)
    if kind == "ddp":
        saved = from_rank_zero(saved)

    model, optimizer = build(kind, seed=5, steps=1)
    hook = RefuseOnRank(rank=1)
    add_load_pre_hook(_inner(model), hook)
    objects = {"model": model, "optimizer": optimizer}
    state = {**{key: objects[key] for key in entries}, "step": 0}
    before = _compared(kind, model, optimizer, entries)
    for key in entries:
        assert_states_differ(before[key], saved[key])

    with pytest.raises(Exception) as raised:  # noqa: PT011 - rank 1 its own, others the agreed one
        Fabric().load(path, state)
    assert "refused" in str(raised.value), repr(raised.value)

    assert_states_equal(_compared(kind, model, optimizer, entries), before)
    assert state["step"] == 0

    hook.armed = False
    Fabric().load(path, state)
    assert_states_equal(_compared(kind, model, optimizer, entries), saved)
    assert state["step"] == 2


@pytest.mark.parametrize(
    ("kind", "entries"),
    [
        ("ddp", ("model", "optimizer")),
        ("fsdp2", ("model",)),
        ("fsdp2", ("model", "optimizer")),
    ],
    ids=["ddp-file", "fsdp2-dir-model", "fsdp2-dir-model+optimizer"],
)
def test_a_load_refused_on_one_rank_changes_no_rank(
    tmp_path: Path, kind: str, entries: tuple[str, ...]
) -> None:
    directory = str(tmp_path / "ckpt")
    os.makedirs(directory)
    run_distributed(_refused_on_one_rank, 2, tmp_path, (kind, entries, directory))
