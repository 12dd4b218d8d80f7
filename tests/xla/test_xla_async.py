"""AsyncCheckpointIO with XLA tensors (real torch_xla, PJRT_DEVICE=CPU, one replica).

The XLA staging (one graph execution, one batched transfer to the CPU) runs on the caller
before ``save`` returns; the worker thread writes CPU tensors only. Mutating the XLA state right
after ``save`` returns must not reach the file. The two-replica test emulates only the
replicas' coordinator (``tests/xla/emulation.py``); tensors, files and the pipeline are real.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

SKIP_REASON = "torch_xla is not installed (it needs torch==2.9.0): run bash scripts/xla-tests"
torch_xla = pytest.importorskip("torch_xla", reason=SKIP_REASON)
import torch_xla.debug.metrics as met  # noqa: E402

from lightweight_ckpt import Fabric  # noqa: E402
from lightweight_ckpt.io import AsyncCheckpointIO, TorchCheckpointIO, XLACheckpointIO  # noqa: E402
from lightweight_ckpt.strategies import SingleDeviceStrategy, XLAStrategy  # noqa: E402
from tests.helpers.asserts import assert_states_differ, assert_states_equal  # noqa: E402
from tests.xla.emulation import run_replicas, unwrap  # noqa: E402

pytestmark = pytest.mark.xla


@pytest.fixture(autouse=True)
def _no_pending_graph():
    """Leave no pending XLA work behind (later tests count graph executions)."""
    yield
    torch_xla.sync()


def _executions() -> int:
    return int(met.counter_value("ExecuteComputation") or 0)


def _cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()  # a copy, also of CPU tensors (AdamW's step)
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 6, device=torch_xla.device())).pow(2).sum().backward()
    optimizer.step()  # no sync: the new values are pending graphs when save is called


def _state() -> dict:
    torch.manual_seed(0)
    # two layers of one shape: same-shaped tensors must not be taken for one another
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)).to(torch_xla.device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, optimizer)
    torch_xla.sync()
    _train_step(model, optimizer)
    return {"model": model, "optimizer": optimizer, "step": 2}


def _expected(state: dict) -> dict:
    return {
        "model": _cpu(state["model"].state_dict()),
        "optimizer": _cpu(state["optimizer"].state_dict()),
    }


@torch.no_grad()
def _mutate(state: dict) -> None:
    for param in state["model"].parameters():
        param.mul_(-2.0).add_(1.0)
    for entry in state["optimizer"].state.values():
        for value in entry.values():
            value.add_(1.0)


class _GatedIO(TorchCheckpointIO):
    """Writes only once its gate opens; records what each write was handed, and where."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.seen: list[tuple[str, set[str], int]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        assert self.gate.wait(60)
        devices = {t.device.type for t in _tensors(checkpoint)}
        self.seen.append((threading.current_thread().name, devices, _executions()))
        super().save_checkpoint(checkpoint, path, storage_options)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def _fabric(setup: str, gated: _GatedIO) -> Fabric:
    if setup == "async(XLACheckpointIO())":
        return Fabric(strategy="single_device", checkpoint_io=AsyncCheckpointIO(gated))
    if setup == "XLAStrategy + async()":
        return Fabric(strategy=XLAStrategy(checkpoint_io=AsyncCheckpointIO(gated)))
    return Fabric(strategy=SingleDeviceStrategy(checkpoint_io=AsyncCheckpointIO(gated)))


class _GatedXLA(_GatedIO, XLACheckpointIO):
    pass


@pytest.mark.parametrize(
    "setup", ["async(XLACheckpointIO())", "XLAStrategy + async()", "single device + async()"]
)
def test_mutating_xla_state_right_after_an_async_save(tmp_path, setup) -> None:
    gated = _GatedXLA() if setup == "async(XLACheckpointIO())" else _GatedIO()
    fabric = _fabric(setup, gated)
    state = _state()
    for step in range(2):  # the second save reuses the host buffers
        _train_step(state["model"], state["optimizer"])  # new values, still pending graphs
        path = tmp_path / f"{step}.ckpt"
        before = _executions()
        handle = fabric.save(str(path), state)
        assert _executions() - before == 1  # one graph for the whole checkpoint, on the caller
        assert not handle.done()  # save returned before the write (gated) ran
        expected = _expected(state)  # the values save saw (their graph has run)
        _mutate(state)  # in place, at once
        torch_xla.sync()
        assert not path.exists()
        gated.gate.set()
        handle.wait(timeout=60)
        gated.gate.clear()
        thread, devices, _ = gated.seen[-1]
        assert thread.startswith("lwckpt-async")
        assert devices == {"cpu"}  # the worker is handed CPU tensors only
        saved = torch.load(path, weights_only=True)
        assert_states_equal(saved["model"], expected["model"])
        assert_states_equal(saved["optimizer"]["state"], expected["optimizer"]["state"])
        assert saved["step"] == 2
        assert_states_differ(_cpu(state["model"].state_dict()), expected["model"])
    fabric.teardown()


def test_same_shaped_xla_tensors_are_not_taken_for_one_another(tmp_path) -> None:
    device = torch_xla.device()
    tensors = {"zeros": torch.zeros(3, device=device), "ones": torch.ones(3, device=device)}
    tensors["again"] = tensors["ones"]  # the same tensor twice stays one
    torch_xla.sync()
    fabric = Fabric(strategy="single_device", checkpoint_io=AsyncCheckpointIO())
    fabric.save(str(tmp_path / "a.ckpt"), tensors).wait()
    fabric.teardown()
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(saved["zeros"], torch.zeros(3))
    assert torch.equal(saved["ones"], torch.ones(3))
    assert saved["again"].untyped_storage().data_ptr() == saved["ones"].untyped_storage().data_ptr()


def test_two_replicas_the_master_writes_in_the_background(tmp_path) -> None:
    """Emulated coordinator: two replicas (threads); the XLA tensors and files are real."""
    ios = [_GatedIO(), _GatedIO()]
    states = [_state(), _state()]  # data parallel: equal on both replicas
    path = str(tmp_path / "ckpt")
    expected: list[dict] = []

    for state in states:
        _train_step(state["model"], state["optimizer"])
        torch_xla.sync()  # XLA work in the replica threads is their save alone

    def replica(rank, coordinator):
        fabric = Fabric(strategy=XLAStrategy(AsyncCheckpointIO(ios[rank]), coordinator=coordinator))
        state = states[rank]
        handle = fabric.save(path, state)
        if rank == 0:
            assert not handle.done()
            expected.append(_expected(state))
            _mutate(state)  # right after save returned, while the write waits for its gate
            torch_xla.sync()
        else:
            assert handle.done()  # it writes nothing: nothing to wait for here
        ios[rank].gate.set()
        handle.wait(timeout=60)
        fabric.wait()
        fabric.barrier()
        fabric.teardown()

    unwrap(run_replicas(2, replica))
    assert len(ios[0].seen) == 1
    assert ios[1].seen == []
    saved = torch.load(path, weights_only=True)
    assert_states_equal(saved["model"], expected[0]["model"])
    assert_states_differ(_cpu(states[0]["model"].state_dict()), expected[0]["model"])


class _SlowIO(TorchCheckpointIO):
    """Each write waits a moment first, so an early commit would be seen."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        threading.Event().wait(0.5)
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_xla_fsdp_async_save_commits_only_written_shards(tmp_path, state_dict_type) -> None:
    """XLA FSDP at world size 1 (real): whenever a checkpoint is visible, it is complete."""
    from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as XlaFsdp

    from lightweight_ckpt.formats import xla_shards
    from lightweight_ckpt.storage import resolve
    from lightweight_ckpt.strategies import XLAFSDPStrategy

    torch.manual_seed(0)
    model = XlaFsdp(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch_xla.device()))
    torch_xla.sync()
    expected = _cpu(model.state_dict())
    io = AsyncCheckpointIO(_SlowIO())
    fabric = Fabric(strategy=XLAFSDPStrategy(checkpoint_io=io, state_dict_type=state_dict_type))
    path = str(tmp_path / "ckpt")
    try:
        handle = fabric.save(path, {"model": model})
        if state_dict_type == "sharded":
            xla_shards.read_marker(resolve(path, {}))  # visible now: every shard is there
        handle.wait(timeout=60)
    finally:
        io.teardown()
    target = XlaFsdp(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch_xla.device()))
    assert_states_differ(_cpu(target.state_dict()), expected)
    Fabric(strategy=XLAFSDPStrategy()).load(path, {"model": target})
    assert_states_equal(_cpu(target.state_dict()), expected)
