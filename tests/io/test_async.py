"""AsyncCheckpointIO: the snapshot is a real copy, failures are never lost, commits stay atomic."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import CheckpointWriteError, Fabric
from lightweight_ckpt.io import AsyncCheckpointIO, CheckpointIO, TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.helpers.models import Tiny, make_state, train_steps


def _mutate_everything(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for param in state["model"].parameters():
            param.add_(1.0)
        for buffer in state["model"].buffers():
            buffer.add_(1)
    for entry in state["optimizer"].state.values():
        for value in entry.values():
            value.add_(1.0)
    state["hparams"]["lr"] = -1.0


def test_mutating_right_after_save_does_not_reach_the_checkpoint(tmp_path: Path) -> None:
    io = AsyncCheckpointIO()
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    for step in range(3):  # steady state: buffers are reused from save to save
        expected = {k: snapshot(v) for k, v in state.items()}
        path = tmp_path / f"step{step}.ckpt"
        fabric.save(path, state)
        _mutate_everything(state)  # at once, while the write may still run
        fabric.wait()
        assert io.is_durable
        saved = torch.load(path, weights_only=True)
        assert_states_equal(saved["model"], expected["model"])
        assert_states_equal(saved["optimizer"], expected["optimizer"])
        assert saved["hparams"]["lr"] == expected["hparams"]["lr"]
        assert_states_differ(state["model"].state_dict(), expected["model"])
    fabric.teardown()


class _FailingIO(TorchCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if self.fail:
            raise CheckpointWriteError(f"{path}: disk full (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.parametrize("surface", ["next_save", "wait", "teardown"])
def test_background_failure_surfaces(tmp_path: Path, surface: str) -> None:
    inner = _FailingIO()
    io = AsyncCheckpointIO(inner)
    fabric = Fabric(checkpoint_io=io)
    state = {"model": Tiny()}
    fabric.save(tmp_path / "a.ckpt", state)  # returns: the failure happens in the background
    inner.fail = False
    actions = {
        "next_save": lambda: fabric.save(tmp_path / "b.ckpt", state),
        "wait": fabric.wait,
        "teardown": fabric.teardown,
    }
    with pytest.raises(CheckpointWriteError, match="disk full"):
        actions[surface]()
    assert not (tmp_path / "a.ckpt").exists()
    fabric.wait()  # reported once, not again
    fabric.teardown()


class _SlowIO(TorchCheckpointIO):
    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.started, self.release = started, release

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.started.set()
        self.release.wait(30)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_load_of_a_path_being_written_waits_for_it(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    io = AsyncCheckpointIO(_SlowIO(started, release))
    fabric = Fabric(checkpoint_io=io)
    state = {"model": Tiny()}
    expected = snapshot(state["model"])
    fabric.save(tmp_path / "a.ckpt", state)
    started.wait(30)
    assert io.pending == 1
    assert not io.is_durable
    threading.Timer(0.3, release.set).start()
    target = Tiny(width=8)
    assert_states_differ(target, expected)
    fabric.load(tmp_path / "a.ckpt", {"model": target})  # waits for the write, then loads it
    assert_states_equal(target, expected)
    fabric.teardown()


def test_back_pressure_keeps_at_most_max_pending(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    io = AsyncCheckpointIO(_SlowIO(started, release), max_pending=1)
    fabric = Fabric(checkpoint_io=io)
    fabric.save(tmp_path / "a.ckpt", {"w": torch.ones(3)})
    started.wait(30)
    threading.Timer(0.3, release.set).start()
    fabric.save(tmp_path / "b.ckpt", {"w": torch.ones(3)})  # waits for a.ckpt first
    assert (tmp_path / "a.ckpt").exists()
    fabric.teardown()
    assert (tmp_path / "b.ckpt").exists()
    with pytest.raises(ValueError, match="max_pending"):
        AsyncCheckpointIO(max_pending=0)


def test_wraps_any_user_checkpoint_io(tmp_path: Path) -> None:
    calls: list[str] = []

    class UserIO(CheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            calls.append("save")
            TorchCheckpointIO().save_checkpoint(checkpoint, path)

        def load_checkpoint(
            self, path: Any, map_location: Any = None, weights_only: Any = None
        ) -> Any:
            calls.append("load")
            return TorchCheckpointIO().load_checkpoint(path, map_location, weights_only)

        def remove_checkpoint(self, path: Any) -> None:
            calls.append("remove")
            os.remove(path)

    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(UserIO()))
    fabric.save(tmp_path / "a.ckpt", {"step": torch.tensor(3)})
    assert fabric.load(tmp_path / "a.ckpt")["step"] == 3
    fabric.strategy.checkpoint_io.remove_checkpoint(tmp_path / "a.ckpt")
    assert calls == ["save", "load", "remove"]
    fabric.teardown()


def test_killed_during_a_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    old = {"w": torch.arange(10.0)}
    Fabric().save(path, old)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from lightweight_ckpt import Fabric
        from lightweight_ckpt.io import AsyncCheckpointIO
        fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
        big = {{"w": torch.randn(64 * 2**20)}}  # 256 MiB: the write takes a while
        fabric.save({str(path)!r}, big)
        print("returned", flush=True)
        fabric.wait()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "returned"  # save returned; write is running
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    loaded = Fabric().load(path)
    if loaded["w"].numel() == old["w"].numel():
        assert_states_equal(loaded, old)  # killed before the commit: the old one, intact
    else:
        assert loaded["w"].numel() == 64 * 2**20  # the commit won the race: the whole new one
    leftovers = [name for name in os.listdir(tmp_path) if name != "last.ckpt"]
    assert all(name.startswith(".last.ckpt.tmp-") for name in leftovers)


def _ddp_async(rank: int, world_size: int, directory: str) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(Tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 1)
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    path = os.path.join(directory, "ddp.ckpt")
    fabric.save(path, {"model": model, "optimizer": optimizer})
    expected = [snapshot(model.module)]
    torch.distributed.broadcast_object_list(expected, src=0)
    train_steps(model, optimizer, 1)  # training goes on while rank 0 writes
    fabric.wait()
    fabric.barrier()
    fabric.load(path, {"model": model, "optimizer": optimizer})
    assert_states_equal(model.module, expected[0])
    fabric.teardown()


@pytest.mark.distributed
def test_async_under_ddp(tmp_path: Path) -> None:
    run_distributed(_ddp_async, 2, tmp_path, args=(str(tmp_path),))


class _RecordingIO(TorchCheckpointIO):
    """Writes normally and remembers where each tensor it was handed lives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        weights = checkpoint["model"]
        self.seen.append(
            {
                "ptr": weights["fc1.weight"].data_ptr(),
                "device": weights["fc1.weight"].device.type,
                "pinned": all(t.is_pinned() for t in weights.values()),
            }
        )
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.parametrize("max_pending", [1, 2])
def test_steady_state_saves_reuse_the_host_buffers(tmp_path: Path, max_pending: int) -> None:
    inner = _RecordingIO()
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(inner, max_pending=max_pending))
    state = make_state()
    live = state["model"].fc1.weight.data_ptr()
    for step in range(2 * max_pending + 1):
        fabric.save(tmp_path / f"{step}.ckpt", state)
    fabric.teardown()
    ptrs = [seen["ptr"] for seen in inner.seen]
    assert live not in ptrs  # a copy, not the live parameter
    assert len(set(ptrs)) == max_pending  # one buffer set per slot, reused from then on
    assert ptrs == [ptrs[i % max_pending] for i in range(len(ptrs))]
    assert {seen["device"] for seen in inner.seen} == {"cpu"}


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.decoder = torch.nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight


def test_tied_weights_stay_shared_in_the_snapshot(tmp_path: Path) -> None:
    model = _Tied()
    sync_path, async_path = tmp_path / "sync.ckpt", tmp_path / "async.ckpt"
    Fabric().save(sync_path, {"model": model})
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    fabric.save(async_path, {"model": model})
    fabric.save(async_path, {"model": model})  # reused buffers keep the sharing
    fabric.teardown()
    saved = torch.load(async_path, weights_only=True)["model"]
    encoder, decoder = saved["encoder.weight"], saved["decoder.weight"]
    assert encoder.untyped_storage().data_ptr() == decoder.untyped_storage().data_ptr()
    assert_states_equal(saved, model.state_dict())
    assert _storage_records(async_path) == _storage_records(sync_path) == 3  # weight, 2 biases


def _storage_records(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum("/data/" in name and not name.endswith("/") for name in archive.namelist())


def test_views_of_one_tensor_are_copied_separately(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    checkpoint = {"whole": base, "head": base[:4], "strided": base[::3]}
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    fabric.save(tmp_path / "a.ckpt", checkpoint)
    base.add_(100.0)
    fabric.teardown()
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert_states_differ(saved["whole"], base)
    assert torch.equal(saved["whole"], torch.arange(12.0))
    assert torch.equal(saved["head"], torch.arange(4.0))
    assert torch.equal(saved["strided"], torch.arange(0.0, 12.0, 3.0))


# -- CUDA: pinned buffers, non-blocking copies, one synchronize; skipped without a GPU --------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Tiny(width=64).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # train_steps' batches are CPU tensors: these are on the GPU
        optimizer.zero_grad()
        model(torch.randn(4, 64, device="cuda")).pow(2).sum().backward()
        optimizer.step()
    return {"model": model, "optimizer": optimizer, "cpu_extra": torch.randn(5), "step": 2}


@pytest.mark.gpu
@needs_cuda
def test_cuda_mutating_right_after_save_does_not_reach_the_checkpoint(tmp_path: Path) -> None:
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    state = _cuda_state()
    for step in range(3):
        expected = {k: snapshot(v) for k, v in state.items()}
        path = tmp_path / f"step{step}.ckpt"
        fabric.save(path, state)
        with torch.no_grad():  # queued on the current stream right after the copies
            for param in state["model"].parameters():
                param.mul_(-3.0).add_(1.0)
            for entry in state["optimizer"].state.values():
                for value in entry.values():
                    value.add_(1.0)
        state["cpu_extra"].add_(1.0)
        fabric.wait()
        saved = torch.load(path, weights_only=True)
        assert_states_equal(saved["model"], expected["model"])
        assert_states_equal(saved["optimizer"], expected["optimizer"])
        assert_states_equal(saved["cpu_extra"], expected["cpu_extra"])
        assert_states_differ(state["model"], expected["model"])
    fabric.teardown()


@pytest.mark.gpu
@needs_cuda
def test_cuda_snapshot_is_pinned_reused_and_takes_no_gpu_memory(tmp_path: Path) -> None:
    inner = _RecordingIO()
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(inner))
    state = _cuda_state()
    fabric.save(tmp_path / "warm.ckpt", state)
    fabric.wait()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        fabric.save(tmp_path / f"{step}.ckpt", state)
    fabric.teardown()
    assert torch.cuda.max_memory_allocated() == before  # no GPU-side clone
    assert all(seen["pinned"] and seen["device"] == "cpu" for seen in inner.seen)
    assert len({seen["ptr"] for seen in inner.seen}) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensors_on_two_devices_are_all_synchronized(tmp_path: Path) -> None:
    tensors = {f"d{i}": torch.randn(1 << 20, device=f"cuda:{i}") for i in range(2)}
    expected = snapshot(tensors)
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    fabric.save(tmp_path / "a.ckpt", tensors)
    for tensor in tensors.values():
        tensor.zero_()
    fabric.teardown()
    assert_states_equal(torch.load(tmp_path / "a.ckpt", weights_only=True), expected)


# -- the handle fabric.save returns ----------------------------------------------------------


class _GatedIO(TorchCheckpointIO):
    """Writes each path only once its gate opens; fails the paths in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.gates: dict[str, threading.Event] = {}
        self.fail = fail

    def gate(self, path: Any) -> threading.Event:
        return self.gates.setdefault(os.path.basename(path), threading.Event())

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        assert self.gate(path).wait(30)
        if os.path.basename(path) in self.fail:
            raise CheckpointWriteError(f"{path}: disk full (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)

    def save_sharded(
        self, checkpoint: Any, path: Any, version: str, storage_options: Any = None
    ) -> None:
        assert self.gate(path).wait(30)
        super().save_sharded(checkpoint, path, version, storage_options)


def test_handle_wait_returns_once_the_file_is_committed_and_loadable(tmp_path: Path) -> None:
    inner = _GatedIO()
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(inner))
    state = make_state()
    expected = {k: snapshot(v) for k, v in state.items()}
    path = tmp_path / "a.ckpt"
    handle = fabric.save(path, state)
    _mutate_everything(state)
    assert handle.path == str(path)
    assert not handle.done()
    assert not handle.is_durable
    with pytest.raises(TimeoutError, match=r"a\.ckpt: the save is not durable after 0.05 s"):
        handle.wait(timeout=0.05)
    assert not path.exists()  # nothing visible before the commit
    threading.Timer(0.2, inner.gate(path).set).start()
    handle.wait()
    assert handle.done()
    assert handle.is_durable
    assert handle.exception() is None
    saved = torch.load(path, weights_only=True)
    assert_states_equal(saved["model"], expected["model"])
    assert_states_equal(saved["optimizer"], expected["optimizer"])
    assert_states_differ(state["model"].state_dict(), expected["model"])
    assert "durable" in repr(handle)
    fabric.teardown()


def test_handle_wait_raises_the_background_failure_which_is_then_reported_once(
    tmp_path: Path,
) -> None:
    inner = _GatedIO(fail=("a.ckpt",))
    io = AsyncCheckpointIO(inner)
    fabric = Fabric(checkpoint_io=io)
    state = {"model": Tiny()}
    inner.gate("a.ckpt").set()
    handle = fabric.save(tmp_path / "a.ckpt", state)
    with pytest.raises(CheckpointWriteError, match=r"a\.ckpt: disk full") as raised:
        handle.wait()
    assert handle.done()
    assert not handle.is_durable
    assert handle.exception() is raised.value  # the handle keeps telling its save's outcome
    with pytest.raises(CheckpointWriteError):
        handle.wait()
    assert "failed" in repr(handle)
    assert not (tmp_path / "a.ckpt").exists()
    # seen through the handle: the next save, wait() and teardown() do not raise it again
    inner.gate("b.ckpt").set()
    fabric.save(tmp_path / "b.ckpt", state).wait()
    fabric.wait()
    fabric.teardown()
    assert (tmp_path / "b.ckpt").exists()


def test_a_failure_raised_by_the_next_save_is_still_told_by_its_handle(tmp_path: Path) -> None:
    inner = _GatedIO(fail=("a.ckpt",))
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(inner))
    state = {"model": Tiny()}
    inner.gate("a.ckpt").set()
    first = fabric.save(tmp_path / "a.ckpt", state)
    assert not first.is_durable  # running or failed: never durable
    inner.gate("b.ckpt").set()
    with pytest.raises(CheckpointWriteError, match=r"a\.ckpt: disk full") as raised:
        fabric.save(tmp_path / "b.ckpt", state)  # not looked at through the handle: raised here
    assert first.exception() is raised.value
    fabric.wait()  # raised once by the IO, not again
    fabric.teardown()


def test_handles_of_two_successive_saves_track_their_own_write(tmp_path: Path) -> None:
    inner = _GatedIO(fail=("b.ckpt",))
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(inner, max_pending=2))
    state = make_state()
    first = fabric.save(tmp_path / "a.ckpt", state)
    expected_first = snapshot(state["model"])
    _mutate_everything(state)
    second = fabric.save(tmp_path / "b.ckpt", state)
    assert not first.done()
    assert not second.done()
    inner.gate("a.ckpt").set()
    first.wait(timeout=30)
    assert first.is_durable
    assert not second.done()  # its own write has not run
    assert_states_equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["model"], expected_first)
    inner.gate("b.ckpt").set()
    with pytest.raises(CheckpointWriteError, match=r"b\.ckpt"):
        second.wait(timeout=30)
    assert first.is_durable  # a later failure is not the first save's
    assert first.exception() is None
    fabric.teardown()


def _bump(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)


def test_handle_of_a_sharded_save_waits_for_the_commit(tmp_path: Path) -> None:
    inner = _GatedIO()
    fabric = Fabric(strategy=FSDPStrategy(checkpoint_io=AsyncCheckpointIO(inner)))
    path = tmp_path / "sharded"
    model = Tiny()
    inner.gate(path).set()
    fabric.save(path, {"model": model}).wait()  # a first version, which the second replaces
    first = snapshot(model)
    _bump(model)
    second = snapshot(model)
    inner.gate(path).clear()
    handle = fabric.save(path, {"model": model})
    _bump(model)  # training goes on while the piece is written
    assert not handle.done()
    committed = Tiny()
    Fabric().load(path, {"model": committed})  # a reader that does not wait: the first one
    assert_states_equal(committed, first)
    inner.gate(path).set()
    handle.wait(timeout=30)
    assert handle.is_durable
    Fabric().load(path, {"model": committed})
    assert_states_equal(committed, second)
    assert_states_differ(model, second)
    fabric.teardown()


class _Uncopyable:
    def __deepcopy__(self, memo: Any) -> Any:
        raise RuntimeError("cannot be copied")


def test_the_collector_is_paused_only_while_the_caller_copies(tmp_path: Path) -> None:
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    assert gc.isenabled()
    fabric.save(tmp_path / "a.ckpt", {"w": torch.ones(3)})
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="cannot be copied"):
        fabric.save(tmp_path / "b.ckpt", {"w": torch.ones(3), "odd": _Uncopyable()})
    assert gc.isenabled()  # enabled again after a failed copy too
    gc.disable()
    try:
        fabric.save(tmp_path / "c.ckpt", {"w": torch.ones(3)})
        assert not gc.isenabled()  # a user who turned it off keeps it off
    finally:
        gc.enable()
    fabric.teardown()
    assert not (tmp_path / "b.ckpt").exists()
