"""XLAStrategy on real torch_xla (PJRT_DEVICE=CPU).

Single-replica tests run entirely for real. Multi-replica tests emulate only the replicas'
coordination (``tests/xla/emulation.py``: threads exchanging bytes in place of
``xm.rendezvous``, which cannot run across replicas on the CPU runtime); tensors are real XLA
tensors and files are real.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

SKIP_REASON = "torch_xla is not installed (it needs torch==2.9.0): run bash scripts/xla-tests"
torch_xla = pytest.importorskip("torch_xla", reason=SKIP_REASON)

from lightweight_ckpt import Fabric, StateMismatchError  # noqa: E402
from lightweight_ckpt.collectives import RankFailedError  # noqa: E402
from lightweight_ckpt.errors import CheckpointWriteError  # noqa: E402
from lightweight_ckpt.io import XLACheckpointIO  # noqa: E402
from lightweight_ckpt.strategies import XLAFSDPStrategy, XLAStrategy  # noqa: E402
from tests.helpers.asserts import assert_states_differ, assert_states_equal  # noqa: E402
from tests.xla.emulation import run_replicas, unwrap  # noqa: E402

pytestmark = pytest.mark.xla


def _cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    device = torch_xla.device()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 6, device=device)).pow(2).sum().backward()
        optimizer.step()
        torch_xla.sync()


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(torch_xla.device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    return {"model": model, "optimizer": optimizer, "step": seed}


def test_save_load_roundtrip_on_the_xla_device(tmp_path) -> None:
    fabric = Fabric(strategy="xla")
    assert isinstance(fabric.strategy, XLAStrategy)
    assert isinstance(fabric.strategy.checkpoint_io, XLACheckpointIO)
    assert (fabric.world_size, fabric.global_rank, fabric.is_global_zero) == (1, 0, True)
    state = _state(1)
    saved = _cpu({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()})
    path = str(tmp_path / "xla.ckpt")
    fabric.save(path, state)
    _train(state["model"], state["optimizer"])  # move away from the checkpoint
    state["step"] = 99
    assert_states_differ(_cpu(state["model"].state_dict()), saved["model"])
    remainder = fabric.load(path, state)
    assert remainder == {}
    assert state["step"] == 1
    assert_states_equal(_cpu(state["model"].state_dict()), saved["model"])
    assert_states_equal(_cpu(state["optimizer"].state_dict()), saved["optimizer"])
    assert all(p.device.type == "xla" for p in state["model"].parameters())
    exp_avg = state["optimizer"].state_dict()["state"][0]["exp_avg"]
    assert exp_avg.device.type == "xla"
    # the file is the single-device format: plain torch.load reads it (CPU tensors)
    plain = torch.load(path, weights_only=True)
    assert_states_equal(plain["model"], saved["model"])


def test_load_raw_and_load_without_state(tmp_path) -> None:
    fabric = Fabric(strategy="xla")
    source = nn.Linear(6, 5)
    raw = str(tmp_path / "raw.pt")
    torch.save(source.state_dict(), raw)
    target = nn.Linear(6, 5).to(torch_xla.device())
    assert_states_differ(_cpu(target.state_dict()), source.state_dict())
    report = fabric.load_raw(raw, target)
    assert report.clean
    assert_states_equal(_cpu(target.state_dict()), source.state_dict())
    assert target.weight.device.type == "xla"
    path = str(tmp_path / "whole.ckpt")
    fabric.save(path, {"model": target, "note": "x"})
    whole = fabric.load(path)
    assert whole["note"] == "x"
    assert_states_equal(whole["model"], source.state_dict())


def test_auto_picks_xla_under_torch_xla(tmp_path) -> None:
    fabric = Fabric()
    assert isinstance(fabric.strategy, XLAStrategy)
    assert not isinstance(fabric.strategy, XLAFSDPStrategy)
    with pytest.raises(ValueError, match="state_dict_type"):
        XLAFSDPStrategy(state_dict_type="bogus")  # type: ignore[arg-type]


class _RecordingIO(XLACheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        assert all(t.device.type == "cpu" for t in checkpoint["model"].values()), (
            "the IO must receive CPU tensors"
        )
        self.saved.append(os.fspath(path))
        super().save_checkpoint(checkpoint, path, storage_options)


def test_two_replicas_master_writes_once_at_its_path(tmp_path) -> None:
    """Emulated: two replicas (threads) coordinate through the strategy's seam."""
    ios = [_RecordingIO(), _RecordingIO()]
    models = [nn.Linear(6, 5).to(torch_xla.device()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())  # data parallel: replicas agree

    def replica(rank, coordinator):
        fabric = Fabric(strategy=XLAStrategy(ios[rank], coordinator=coordinator))
        assert (fabric.global_rank, fabric.world_size) == (rank, 2)
        fabric.save(str(tmp_path / f"from-rank{rank}.ckpt"), {"model": models[rank]})
        fabric.barrier()
        return sorted(os.listdir(tmp_path))

    listings = unwrap(run_replicas(2, replica))
    assert ios[0].saved == [str(tmp_path / "from-rank0.ckpt")]
    assert ios[1].saved == []
    assert listings == [["from-rank0.ckpt"], ["from-rank0.ckpt"]]
    loaded = torch.load(tmp_path / "from-rank0.ckpt", weights_only=True)
    assert_states_equal(loaded["model"], _cpu(models[0].state_dict()))


def test_a_failed_write_on_the_master_raises_on_every_replica(tmp_path) -> None:
    (tmp_path / "taken").mkdir()  # a directory where the file should go: the master fails
    model = nn.Linear(6, 5).to(torch_xla.device())

    def replica(rank, coordinator):
        fabric = Fabric(strategy=XLAStrategy(coordinator=coordinator))
        fabric.save(str(tmp_path / "taken"), {"model": model})

    results = run_replicas(2, replica)
    assert isinstance(results[0], CheckpointWriteError)
    assert str(tmp_path / "taken") in str(results[0])
    assert isinstance(results[1], RankFailedError)
    assert "replica(s) [0]" in str(results[1])


def test_a_load_failing_on_one_replica_raises_on_every_replica(tmp_path) -> None:
    path = str(tmp_path / "m.ckpt")
    Fabric(strategy="xla").save(path, {"model": nn.Linear(6, 5)})
    targets = [nn.Linear(6, 5), nn.Linear(6, 4)]  # replica 1's model does not fit
    targets = [t.to(torch_xla.device()) for t in targets]

    def replica(rank, coordinator):
        fabric = Fabric(strategy=XLAStrategy(coordinator=coordinator))
        fabric.load(path, {"model": targets[rank]})

    before = _cpu(targets[0].state_dict())
    results = run_replicas(2, replica)
    assert isinstance(results[1], StateMismatchError)
    assert path in str(results[1])
    assert isinstance(results[0], RankFailedError)
    assert "replica(s) [1]" in str(results[0])
    # every replica checked the file before any restored: replica 0's model is unchanged
    after = _cpu(targets[0].state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = torch.load(path, weights_only=True)["model"]
    assert not all(torch.equal(before[k], saved[k]) for k in before)
