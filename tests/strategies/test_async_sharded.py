"""Async sharded saves: ``Fabric(checkpoint_io=AsyncCheckpointIO())`` with FSDP1 and FSDP2 models.

Each rank's piece is copied to host memory on the caller and written by the IO's worker thread,
whose DCP collectives run on a gloo group of its own; ``.metadata`` is committed only once every
rank's piece is durable. Real processes, gloo on CPU, real FSDP, nothing mocked.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightweight_ckpt import CheckpointError, Fabric
from lightweight_ckpt.formats import dcp_staging
from lightweight_ckpt.io import AsyncCheckpointIO, TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build, perturb, reference
from tests.strategies.test_sharded_faults import HANG_GUARD_S, assert_commit_complete, versions


class _Recording(TorchCheckpointIO):
    """Records where each sharded write ran; on save ``fail_on`` rank ``victim`` breaks it.

    ``how="disk"``: a directory sits where the victim's piece goes, so DCP's own write fails
    (a real I/O error, reported by DCP to every rank). ``how="kill"``: the victim is SIGKILLed
    before it writes anything.
    """

    def __init__(self, fail_on: tuple[int, ...] = (), victim: int = 1, how: str = "disk") -> None:
        super().__init__()
        self.fail_on, self.victim, self.how = fail_on, victim, how
        self.saves = 0
        self.writers: list[tuple[str, Any]] = []

    def save_sharded(
        self, checkpoint: Any, path: Any, version: str, storage_options: Any = None
    ) -> None:
        self.saves += 1
        self.writers.append((threading.current_thread().name, dcp_staging.group_of_this_thread()))
        if self.saves in self.fail_on and dist.is_initialized() and dist.get_rank() == self.victim:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os.makedirs(os.path.join(path, version, f"__{self.victim}_0.distcp"))
        super().save_sharded(checkpoint, path, version, storage_options)


def _async_round_trip(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "ckpt")
    recording = _Recording()
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(recording))
    model, optimizer = build(kind)
    for step in (1, 2, 3):  # each replaces the last; the third overwrites the first's pieces
        perturb(model, optimizer)
        expected = reference(kind, model, optimizer)
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": step})
        perturb(model, optimizer)  # at once: the snapshot, not the live state, is written
    fabric.wait()
    assert_states_differ(reference(kind, model, optimizer), expected)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)
    assert state["step"] == 3
    assert_states_equal(reference(kind, model, optimizer), expected)
    # written by the worker thread, with collectives on a group of its own
    assert [name.startswith("lwckpt-async") for name, _ in recording.writers] == [True] * 3
    groups = {id(group) for _, group in recording.writers}
    assert len(groups) == 1
    group = recording.writers[0][1]
    assert group is not None
    assert group != dist.group.WORLD
    assert dist.get_world_size(group) == world_size
    fabric.barrier()
    if rank == 0:
        assert len(versions(Path(path))) == 2  # the committed one and the spare
    fabric.teardown()
    dist.barrier()
    if rank == 0:
        assert len(versions(Path(path))) == 1  # the spare is gone


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_async_sharded_save_then_load(tmp_path: Path, kind: str) -> None:
    run_distributed(_async_round_trip, 2, tmp_path, args=(kind, str(tmp_path)))
    assert_commit_complete(tmp_path / "ckpt")


def _failure_on_one_rank(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "ckpt")
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(_Recording(fail_on=(2, 3), victim=1)))
    model, optimizer = build(kind)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    fabric.wait()
    expected = reference(kind, model, optimizer)
    perturb(model, optimizer)

    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})  # fails in the worker
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp"):
        fabric.wait()  # on every rank, though only rank 1's disk failed
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})  # fails again
    with pytest.raises(CheckpointError):
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 4})  # ... raised here
    fabric.wait()  # raised once, then cleared

    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)  # the last good checkpoint, untouched by the failed ones
    assert state["step"] == 1
    assert_states_equal(reference(kind, model, optimizer), expected)
    fabric.teardown()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_async_sharded_failure_on_one_rank_raises_on_all(tmp_path: Path, kind: str) -> None:
    run_distributed(_failure_on_one_rank, 2, tmp_path, args=(kind, str(tmp_path)))


def _killed_before_commit(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "ckpt")
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(_Recording(fail_on=(2,), how="kill")))
    model, optimizer = build("fsdp2")
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    fabric.wait()
    expected = reference("fsdp2", model, optimizer)["model"]  # a collective: every rank
    if rank == 0:
        torch.save(expected, f"{directory}/expected.pt")
    perturb(model, optimizer)
    fabric.barrier()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})  # rank 1 dies in it
    fabric.wait()  # rank 0: the background save fails (its peer is gone) and raises here


@pytest.mark.distributed
def test_async_sharded_crash_before_commit_keeps_previous(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"rank|exited|hung"):
        run_distributed(
            _killed_before_commit, 2, tmp_path, args=(str(tmp_path),), timeout_s=HANG_GUARD_S
        )
    path = tmp_path / "ckpt"
    assert_commit_complete(path)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    model, _ = build("plain", seed=7, arch="mlp")
    assert_states_differ(model.state_dict(), expected)
    state: dict[str, Any] = {"model": model, "step": 0}
    Fabric().load(path, state)
    assert state["step"] == 1
    assert_states_equal(model.state_dict(), expected)


@pytest.mark.parametrize("url", [False, True])
def test_async_sharded_in_one_process(tmp_path: Path, url: bool) -> None:
    # no process group: no background group either; the worker still writes the snapshot
    path = "memory://async/sharded" if url else str(tmp_path / "sharded")
    recording = _Recording()
    io = AsyncCheckpointIO(recording)
    fabric = Fabric(strategy=FSDPStrategy(checkpoint_io=io))
    model, optimizer = build("plain", arch="mlp")
    expected = reference("plain", model, optimizer)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    perturb(model, optimizer)
    fabric.wait()
    assert_states_differ(reference("plain", model, optimizer), expected)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)
    assert state["step"] == 1
    assert_states_equal(reference("plain", model, optimizer), expected)
    assert [(name.startswith("lwckpt-async"), group) for name, group in recording.writers] == [
        (True, None)
    ]
    fabric.teardown()
