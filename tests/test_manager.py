"""CheckpointManager: schedules, retention from the manifest, resume with fallback, real kills.

Checkpoints hold a ``Linear(4, 4)`` whose every weight equals the step that saved it, so a
resumed state tells which checkpoint it came from. Retention runs with the default synchronous
IO and with ``AsyncCheckpointIO``; the kill tests SIGKILL a real process at each stage of a
checkpoint's life (through the ``on_checkpoint_event`` hook) and resume in this one.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import pytest
import torch
from torch import nn

from lightweight_ckpt import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    Fabric,
    InvalidCheckpointError,
    StateMismatchError,
)
from lightweight_ckpt.io import AsyncCheckpointIO, TorchCheckpointIO
from lightweight_ckpt.manager import (
    MANIFEST_NAME,
    METADATA_KEY,
    POINTER_NAME,
    CheckpointManager,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.servers import s3_folder

# -- helpers ---------------------------------------------------------------------------------


def filled_state(value: float, step: int = 0) -> dict[str, Any]:
    """A Linear(4, 4) whose weights and bias all equal ``value``, plus a plain ``step``."""
    model = nn.Linear(4, 4)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(value)
    return {"model": model, "step": step}


def weight_value(state: dict[str, Any]) -> float:
    weight = state["model"].weight.detach()
    assert bool((weight == weight.flatten()[0]).all())
    return float(weight.flatten()[0])


def names(directory: Path) -> set[str]:
    """Visible files (hidden temp files of interrupted writes are not checkpoints)."""
    return {n for n in os.listdir(directory) if not n.startswith(".")}


def manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST_NAME).read_text())


def manifest_steps(directory: Path) -> list[int]:
    return [e["step"] for e in manifest(directory)["checkpoints"] if e["damaged"] is None]


def pointer(directory: Path) -> dict[str, Any]:
    return json.loads((directory / POINTER_NAME).read_text())


def flip_bytes(path: Path, value: float) -> None:
    """Flip a byte inside the tensor data (a weight row: four ``value``s as float32)."""
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<4f", *[value] * 4))
    assert at >= 0
    data[at + 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(params=["sync", "async"])
def fabric(request: pytest.FixtureRequest) -> Iterator[Fabric]:
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO() if request.param == "async" else None)
    yield fabric
    fabric.teardown()


def run_steps(
    manager: CheckpointManager,
    steps: range,
    losses: dict[int, float] | None = None,
    check_best: bool = False,
) -> None:
    for step in steps:
        state = filled_state(float(step), step)
        metrics = {"loss": losses[step]} if losses else None
        manager.maybe_save(state, step=step, metrics=metrics)
        if check_best and manager.best_path is not None:  # the best is never deleted
            assert os.path.exists(manager.best_path)


# -- filenames and arguments -----------------------------------------------------------------


def test_filename_templates_lightning_and_composer_styles(tmp_path: Path) -> None:
    fabric = Fabric()
    state = filled_state(1.0)
    with CheckpointManager(
        fabric, tmp_path / "l", filename="sample-{epoch:02d}-{val_loss:.2f}", monitor="val_loss"
    ) as manager:
        first = manager.save(state, epoch=2, metrics={"val_loss": torch.tensor(0.3241)})
        second = manager.save(state, epoch=2, metrics={"val_loss": 0.3241})
    assert first == f"{tmp_path}/l/sample-epoch=02-val_loss=0.32.ckpt"
    assert second == f"{tmp_path}/l/sample-epoch=02-val_loss=0.32-v1.ckpt"  # unique per save

    with CheckpointManager(
        fabric,
        tmp_path / "c",
        filename="ep{epoch}-ba{batch}-rank{rank}",
        auto_insert_metric_name=False,
    ) as manager:
        assert manager.save(state, step=120, epoch=3) == f"{tmp_path}/c/ep3-ba120-rank0.ckpt"

    with CheckpointManager(fabric, tmp_path / "d") as manager:
        assert manager.save(state, step=7) == f"{tmp_path}/d/step=7.ckpt"
        assert manager.save(state, step=8, epoch=1) == f"{tmp_path}/d/epoch=1-step=8.ckpt"
        with pytest.raises(ValueError, match=r"needs \['val_loss'\]"):
            CheckpointManager(fabric, tmp_path / "e", filename="{val_loss}").save(state, step=1)


def test_missing_template_field_is_an_error_before_any_write(tmp_path: Path) -> None:
    with (
        CheckpointManager(Fabric(), tmp_path, filename="ep{epoch}") as manager,
        pytest.raises(ValueError, match=r"needs \['epoch'\].*step="),
    ):
        manager.save(filled_state(1.0), step=7)
    assert names(tmp_path) == set()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"save_top_k": 2}, ValueError, "monitor"),
        ({"monitor": "loss", "mode": "avg"}, ValueError, "mode"),
        ({"monitor": "loss", "save_top_k": 0}, ValueError, "save_top_k"),
        ({"keep_last_k": -2}, ValueError, "keep_last_k"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_seconds": -1.0}, ValueError, "every_seconds"),
        ({"filename": "sub/{step}"}, ValueError, "dirpath"),
        ({"filename": "{a.b}"}, ValueError, "plain names"),
        ({"hparams": {"opt": ["adam", object()]}}, TypeError, r"hparams\['opt'\]\[1\]"),
        ({"hparams": {"act": nn.ReLU()}}, TypeError, r"hparams\['act'\] is a ReLU"),
        ({"hparams": {1: "x"}}, TypeError, "str keys"),
        ({"filter": {"model": 3}}, TypeError, "filter"),
    ],
)
def test_bad_arguments_are_named(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CheckpointManager(Fabric(), tmp_path, **kwargs)


def test_fabric_must_be_a_fabric(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Fabric"):
        CheckpointManager(object(), tmp_path)


# -- retention -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kept_steps"),
    [("min", {4, 5, 6}), ("max", {1, 6})],  # top 2 by loss, plus the newest (save_last)
)
def test_top_k_keeps_the_best_and_the_newest(
    fabric: Fabric, tmp_path: Path, mode: str, kept_steps: set[int]
) -> None:
    losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 2.0, 6: 6.0}
    manager = CheckpointManager(
        fabric,
        tmp_path,
        filename="{step}",
        every_n_steps=1,
        monitor="loss",
        mode=mode,
        save_top_k=2,
    )
    run_steps(manager, range(1, 7), losses, check_best=True)
    manager.close()
    expected = {f"step={s}.ckpt" for s in kept_steps}
    assert names(tmp_path) == expected | {MANIFEST_NAME, POINTER_NAME}
    assert sorted(manifest_steps(tmp_path)) == sorted(kept_steps)
    assert manifest(tmp_path)["deleting"] == []
    best = min(losses, key=lambda s: losses[s] * (1 if mode == "min" else -1))
    assert manager.best_path == f"{tmp_path}/step={best}.ckpt"
    assert manager.best_score == losses[best]
    assert manager.last_path == f"{tmp_path}/step=6.ckpt"
    assert pointer(tmp_path)["path"] == "step=6.ckpt"
    saved = torch.load(manager.best_path, weights_only=True)
    assert saved[METADATA_KEY]["metrics"] == {"loss": losses[best]}


def test_keep_last_k_with_every_n_steps_deletes_off_the_critical_path(
    fabric: Fabric, tmp_path: Path
) -> None:
    threads: list[str] = []

    class Recording(CheckpointManager):
        def on_checkpoint_event(self, event: str, path: str) -> None:
            if event == "deleted":
                threads.append(threading.current_thread().name)

    manager = Recording(fabric, tmp_path, filename="{step}", every_n_steps=3, keep_last_k=2)
    saved = [manager.maybe_save(filled_state(s), step=s) for s in range(1, 11)]
    manager.maybe_save(filled_state(9.0), step=9)  # the same step again: not due twice
    manager.close()
    assert [p for p in saved if p] == [f"{tmp_path}/step={s}.ckpt" for s in (3, 6, 9)]
    assert names(tmp_path) == {"step=6.ckpt", "step=9.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert manager.paths == [f"{tmp_path}/step=6.ckpt", f"{tmp_path}/step=9.ckpt"]
    assert threads
    assert all(name.startswith("lwckpt-prune") for name in threads)


def test_every_n_epochs_saves_at_epoch_ends(fabric: Fabric, tmp_path: Path) -> None:
    manager = CheckpointManager(fabric, tmp_path, every_n_epochs=2)
    step = 0
    for epoch in range(5):
        for batch in range(3):
            step += 1
            manager.maybe_save(filled_state(step), step=step, epoch=epoch, epoch_end=batch == 2)
    manager.close()
    assert names(tmp_path) == {
        "epoch=1-step=6.ckpt",
        "epoch=3-step=12.ckpt",
        MANIFEST_NAME,
        POINTER_NAME,
    }


def _epoch_loop(manager: CheckpointManager, steps: range) -> list[int]:
    """Three steps per epoch; return the steps whose call saved."""
    saved = []
    for step in steps:
        epoch, end = (step - 1) // 3, step % 3 == 0
        if manager.maybe_save(filled_state(step, step), step=step, epoch=epoch, epoch_end=end):
            saved.append(step)
    return saved


def test_a_step_save_does_not_hide_the_epoch_end_save(tmp_path: Path) -> None:
    config: dict[str, Any] = {"every_n_steps": 4, "every_n_epochs": 1}
    with CheckpointManager(Fabric(), tmp_path, **config) as manager:
        assert _epoch_loop(manager, range(1, 6)) == [3, 4]  # epoch 0's end, then step 4
    with CheckpointManager(Fabric(), tmp_path, **config) as manager:
        result = manager.resume(filled_state(0.0))
        assert result is not None
        assert (result.step, result.epoch) == (4, 1)  # mid-epoch 1
        assert _epoch_loop(manager, range(5, 7)) == [6]  # epoch 1's end is still saved


def test_every_seconds_uses_the_injected_clock(fabric: Fabric, tmp_path: Path) -> None:
    now = [100.0]
    manager = CheckpointManager(
        fabric, tmp_path, filename="{step}", every_seconds=10.0, clock=lambda: now[0]
    )
    saved = []
    for step in range(1, 9):
        now[0] += 5.0
        if manager.maybe_save(filled_state(step), step=step):
            saved.append(step)
    manager.close()
    assert saved == [2, 4, 6, 8]  # at 110, 120, 130, 140


def test_no_trigger_means_every_epoch(tmp_path: Path) -> None:
    with CheckpointManager(Fabric(), tmp_path, filename="{epoch}") as manager:
        assert manager.maybe_save(filled_state(1.0), step=1, epoch=0) is None
        assert manager.maybe_save(filled_state(1.0), step=2, epoch=0, epoch_end=True)


class _GatedIO(TorchCheckpointIO):
    """A user IO whose write of one path waits until the test opens the gate."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.started = threading.Event()
        self.gate = threading.Event()

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if str(path).endswith(self.gated):
            self.started.set()
            self.gate.wait(30)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_async_pruning_waits_for_the_new_checkpoint_to_commit(tmp_path: Path) -> None:
    io = _GatedIO("step=3.ckpt")
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO(io))
    manager = CheckpointManager(fabric, tmp_path, filename="{step}", every_n_steps=1, keep_last_k=1)
    run_steps(manager, range(1, 3))
    manager.maybe_save(filled_state(3.0), step=3)  # returns while step 3 is being written
    assert io.started.wait(30)
    manager.maybe_save(filled_state(3.5), step=3)  # a call that saves nothing records nothing
    assert names(tmp_path) == {"step=2.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert manifest_steps(tmp_path) == [2]
    assert pointer(tmp_path)["path"] == "step=2.ckpt"
    assert manager.last_path == f"{tmp_path}/step=2.ckpt"
    io.gate.set()
    manager.wait()
    assert names(tmp_path) == {"step=3.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert manifest_steps(tmp_path) == [3]
    assert pointer(tmp_path)["path"] == "step=3.ckpt"
    manager.close()
    fabric.teardown()


class _FailingIO(TorchCheckpointIO):
    """A user IO whose write of one path fails (a full disk, say)."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if str(path).endswith(self.failing):
            raise CheckpointWriteError(f"{path}: disk full (injected)")
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_failed_background_save_is_never_recorded_and_prunes_nothing(tmp_path: Path) -> None:
    io = AsyncCheckpointIO(_FailingIO("step=2.ckpt"))
    fabric = Fabric(checkpoint_io=io)
    manager = CheckpointManager(fabric, tmp_path, filename="{step}", every_n_steps=1, keep_last_k=1)
    manager.maybe_save(filled_state(1.0), step=1)
    manager.maybe_save(filled_state(2.0), step=2)  # returns; the write fails in the background
    deadline = time.monotonic() + 30
    while io.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        manager.maybe_save(filled_state(3.0), step=3)  # the failure surfaces here
    assert manifest_steps(tmp_path) == [1]  # step 2 was not recorded, step 1 not pruned for it
    assert names(tmp_path) == {"step=1.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert manager.maybe_save(filled_state(4.0), step=4)
    manager.close()
    fabric.teardown()
    assert names(tmp_path) == {"step=4.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert manifest_steps(tmp_path) == [4]


def test_save_last_false_skips_saves_outside_the_top_k(tmp_path: Path) -> None:
    manager = CheckpointManager(
        Fabric(), tmp_path, filename="{step}", monitor="loss", save_top_k=1, save_last=False
    )
    assert manager.save(filled_state(1.0), step=1, metrics={"loss": 2.0})
    assert manager.save(filled_state(2.0), step=2, metrics={"loss": 3.0}) is None
    assert manager.save(filled_state(3.0), step=3) is None  # no metric: cannot rank it
    assert manager.save(filled_state(4.0), step=4, metrics={"loss": 1.0})
    manager.close()
    assert names(tmp_path) == {"step=4.ckpt", MANIFEST_NAME, POINTER_NAME}


# -- resume ----------------------------------------------------------------------------------


def test_resume_on_a_fresh_run_does_nothing(tmp_path: Path) -> None:
    state = filled_state(7.0)
    with CheckpointManager(Fabric(), tmp_path / "new", every_n_steps=1) as manager:
        assert manager.resume(state) is None
        assert manager.resumed_from is None
    assert weight_value(state) == 7.0


def test_restart_keeps_top_k_and_never_deletes_the_resumed_checkpoint(
    fabric: Fabric, tmp_path: Path
) -> None:
    config: dict[str, Any] = {
        "filename": "{step}",
        "every_n_steps": 1,
        "monitor": "loss",
        "save_top_k": 2,
    }
    losses = {1: 1.0, 2: 2.0, 3: 3.0, 4: 9.0, 5: 8.0, 6: 7.0, 7: 10.0}
    with CheckpointManager(fabric, tmp_path, **config) as first:
        run_steps(first, range(1, 5), losses)
    assert set(manifest_steps(tmp_path)) == {1, 2, 4}  # top 2 + the newest

    state = filled_state(0.0)
    second = CheckpointManager(fabric, tmp_path, **config)
    result = second.resume(state)
    assert result is not None
    assert (result.step, state["step"], weight_value(state)) == (4, 4, 4.0)
    assert second.resumed_from == f"{tmp_path}/step=4.ckpt"
    run_steps(second, range(5, 7), losses, check_best=True)
    second.close()
    # step 4 is outside the top 2 and no longer the newest, but it is what this run resumed from
    assert set(manifest_steps(tmp_path)) == {1, 2, 4, 6}
    assert names(tmp_path) == {f"step={s}.ckpt" for s in (1, 2, 4, 6)} | {
        MANIFEST_NAME,
        POINTER_NAME,
    }

    with CheckpointManager(fabric, tmp_path, **config) as third:
        assert third.resume(filled_state(0.0)) is not None
        run_steps(third, range(7, 8), losses)
    assert set(manifest_steps(tmp_path)) == {1, 2, 6, 7}  # top 2 stayed 2; step 4 now goes
    assert third.best_path == f"{tmp_path}/step=1.ckpt"


def _three_checkpoints(fabric: Fabric, directory: Path) -> None:
    with CheckpointManager(fabric, directory, filename="{step}", every_n_steps=1) as manager:
        run_steps(manager, range(1, 4))


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(
    fabric: Fabric, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _three_checkpoints(fabric, tmp_path)
    flip_bytes(tmp_path / "step=3.ckpt", 3.0)
    caplog.set_level(logging.WARNING, logger="lightweight_ckpt")
    state = filled_state(0.0)
    manager = CheckpointManager(fabric, tmp_path, filename="{step}", every_n_steps=1)
    result = manager.resume(state)
    assert result is not None
    assert result.path == f"{tmp_path}/step=2.ckpt"
    assert result.skipped == (f"{tmp_path}/step=3.ckpt",)
    assert (state["step"], weight_value(state)) == (2, 2.0)
    warning = caplog.text
    assert f"{tmp_path}/step=3.ckpt" in warning
    assert "falling back to" in warning
    assert f"{tmp_path}/step=2.ckpt" in warning
    # kept for inspection, marked, and never tried again; its name is not reused
    damaged = [e for e in manifest(tmp_path)["checkpoints"] if e["damaged"]]
    assert [e["path"] for e in damaged] == ["step=3.ckpt"]
    assert "Corrupt" in damaged[0]["damaged"] or "Invalid" in damaged[0]["damaged"]
    assert manager.maybe_save(filled_state(3.0), step=3) == f"{tmp_path}/step=3-v1.ckpt"
    manager.close()
    assert (tmp_path / "step=3.ckpt").exists()
    caplog.clear()
    with CheckpointManager(fabric, tmp_path, filename="{step}", every_n_steps=1) as again:
        result = again.resume(filled_state(0.0))
    assert result is not None
    assert result.path == f"{tmp_path}/step=3-v1.ckpt"
    assert result.skipped == ()
    assert not caplog.records


def test_resume_falls_back_past_a_pointer_to_a_missing_file(
    fabric: Fabric, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _three_checkpoints(fabric, tmp_path)
    assert pointer(tmp_path)["path"] == "step=3.ckpt"
    (tmp_path / "step=3.ckpt").unlink()
    caplog.set_level(logging.WARNING, logger="lightweight_ckpt")
    state = filled_state(0.0)
    with CheckpointManager(fabric, tmp_path, every_n_steps=1) as manager:
        result = manager.resume(state)
    assert result is not None
    assert (result.step, weight_value(state)) == (2, 2.0)
    assert f"{tmp_path}/step=3.ckpt" in caplog.text
    assert CheckpointNotFoundError.__name__ in caplog.text


def test_resume_uses_the_pointer_when_the_manifest_is_lost_or_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fabric = Fabric()
    _three_checkpoints(fabric, tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    state = filled_state(0.0)
    with CheckpointManager(fabric, tmp_path, every_n_steps=1) as manager:
        result = manager.resume(state)
        assert result is not None
        assert result.step == 3
        assert manager.maybe_save(filled_state(4.0), step=4)
    assert set(manifest_steps(tmp_path)) == {3, 4}  # the pointer's checkpoint is recorded again

    (tmp_path / MANIFEST_NAME).write_text("{not json")
    caplog.set_level(logging.WARNING, logger="lightweight_ckpt")
    with CheckpointManager(fabric, tmp_path, every_n_steps=1) as manager:
        result = manager.resume(filled_state(0.0))
    assert result is not None
    assert result.step == 4
    assert f"{tmp_path}/{MANIFEST_NAME}: unreadable manifest" in caplog.text


def test_resume_raises_when_nothing_loads_and_never_falls_back_on_a_mismatch(
    tmp_path: Path,
) -> None:
    fabric = Fabric()
    _three_checkpoints(fabric, tmp_path)
    wider = {"model": nn.Linear(4, 5), "step": 0}
    with (
        CheckpointManager(fabric, tmp_path, every_n_steps=1) as manager,
        pytest.raises(StateMismatchError),
    ):
        manager.resume(wider)  # the user's state changed: every checkpoint would mismatch
    assert all(e["damaged"] is None for e in manifest(tmp_path)["checkpoints"])

    for step in (1, 2, 3):
        flip_bytes(tmp_path / f"step={step}.ckpt", float(step))
    state = filled_state(0.0)
    with (
        CheckpointManager(fabric, tmp_path, every_n_steps=1) as manager,
        pytest.raises(InvalidCheckpointError, match="none of the recorded checkpoints"),
    ):
        manager.resume(state)
    assert weight_value(state) == 0.0


def test_hparams_and_weights_only_read_back_with_plain_torch_load(tmp_path: Path) -> None:
    hparams = {"lr": 0.1, "layers": [4, 4], "name": "tiny", "betas": (0.9, 0.99), "x": None}
    state = filled_state(5.0, step=5)
    state["optimizer"] = torch.optim.SGD(state["model"].parameters(), lr=0.1, momentum=0.9)
    with CheckpointManager(
        Fabric(), tmp_path, every_n_steps=1, save_weights_only=True, hparams=hparams
    ) as manager:
        path = manager.maybe_save(state, step=5, metrics={"loss": 0.25})
    assert path is not None
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model", METADATA_KEY}
    assert saved[METADATA_KEY]["hparams"] == hparams
    assert (saved[METADATA_KEY]["step"], saved[METADATA_KEY]["metrics"]) == (5, {"loss": 0.25})

    target = filled_state(0.0)
    target["optimizer"] = torch.optim.SGD(target["model"].parameters(), lr=0.1)
    with CheckpointManager(Fabric(), tmp_path, save_weights_only=True) as manager:
        result = manager.resume(target)  # only the modules are restored
    assert result is not None
    assert result.hparams == hparams
    assert weight_value(target) == 5.0


def test_state_must_not_use_the_metadata_key(tmp_path: Path) -> None:
    with (
        CheckpointManager(Fabric(), tmp_path) as manager,
        pytest.raises(ValueError, match=METADATA_KEY),
    ):
        manager.save({METADATA_KEY: 1}, step=1)
    manager.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        manager.save(filled_state(1.0), step=1)


def test_memory_dirpath_saves_prunes_and_resumes() -> None:
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO())
    url = "memory://runs/exp1"
    with CheckpointManager(fabric, url, filename="{step}", every_n_steps=1, keep_last_k=2) as m:
        run_steps(m, range(1, 6))
    fs = fsspec.filesystem("memory")
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/runs/exp1", detail=False))
    assert listed == sorted(["step=4.ckpt", "step=5.ckpt", MANIFEST_NAME, POINTER_NAME])
    fs.rm("/runs/exp1/step=5.ckpt")
    state = filled_state(0.0)
    with CheckpointManager(fabric, url, filename="{step}", every_n_steps=1, keep_last_k=2) as m:
        result = m.resume(state)
        assert result is not None
        assert result.skipped == (f"{url}/step=5.ckpt",)
        assert (result.step, weight_value(state)) == (4, 4.0)
        assert m.maybe_save(filled_state(5.0), step=5) == f"{url}/step=5-v1.ckpt"
    fabric.teardown()


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """A directory in a fresh bucket on a local S3 server (moto), and its storage options."""
    with s3_folder(tmp_path_factory.mktemp("moto"), "run") as found:
        yield found


@pytest.mark.cloud
def test_s3_dirpath_uses_the_pointer_file_and_prunes(s3_run: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_run
    fabric = Fabric()
    config: dict[str, Any] = {
        "filename": "{step}",
        "every_n_steps": 1,
        "keep_last_k": 2,
        "storage_options": options,
    }
    with CheckpointManager(fabric, url, **config) as manager:
        run_steps(manager, range(1, 5))
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://")
    objects = sorted(p.rsplit("/", 1)[1] for p in fs.find(prefix))
    assert objects == sorted(["step=3.ckpt", "step=4.ckpt", MANIFEST_NAME, POINTER_NAME])
    assert json.loads(fs.cat_file(f"{prefix}/{POINTER_NAME}"))["path"] == "step=4.ckpt"
    fs.rm(f"{prefix}/step=4.ckpt")
    state = filled_state(0.0)
    with CheckpointManager(fabric, url, **config) as manager:
        result = manager.resume(state)
    assert result is not None
    assert result.skipped == (f"{url}/step=4.ckpt",)
    assert (result.step, weight_value(state)) == (3, 3.0)


# -- real kills --------------------------------------------------------------------------------

KILLER = f"""
import os, signal, sys, traceback
import torch
torch.set_num_threads(1)
from typing import Any
from torch import nn
from lightweight_ckpt import Fabric
from lightweight_ckpt.io import AsyncCheckpointIO
from lightweight_ckpt.manager import CheckpointManager

{inspect.getsource(filled_state)}

class DyingManager(CheckpointManager):
    # test-only: SIGKILL this process when the named checkpoint reaches the named stage
    die_event = ""
    die_name = ""

    def on_checkpoint_event(self, event, path):
        if event == self.die_event and path.endswith("/" + self.die_name):
            os.kill(os.getpid(), signal.SIGKILL)

def run(directory, io, event, name):
    fabric = Fabric(checkpoint_io=AsyncCheckpointIO() if io == "async" else None)
    manager = DyingManager(fabric, directory, filename="{{step}}", every_n_steps=1, keep_last_k=2)
    manager.die_event, manager.die_name = event, name
    for step in range(1, 7):
        manager.maybe_save(filled_state(float(step), step), step=step)
    manager.close()
    fabric.teardown()

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            run(*line.split())
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    print(f"{{pid}} {{status}}", flush=True)
"""


@pytest.fixture(scope="module")
def killer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IO[str], IO[str], Path]]:
    """One process imports torch once and forks a training loop per case (imports are slow)."""
    log = tmp_path_factory.mktemp("killer") / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        yield proc.stdin, proc.stdout, log
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


# (stage, the checkpoint whose stage kills, steps resume may find, files left after the kill).
# Deletions run on their own thread, so the loop may have saved more before that kill lands.
KILL_POINTS = {
    "after-commit-before-manifest": ("committed", "step=4.ckpt", {3}, {2, 3, 4}),
    "after-manifest-before-pointer": ("manifest_written", "step=4.ckpt", {4}, {2, 3, 4}),
    "after-pointer-before-pruning": ("recorded", "step=4.ckpt", {4}, {2, 3, 4}),
    "during-pruning": ("deleted", "step=2.ckpt", {4, 5, 6}, {3, 4}),
}


@pytest.mark.parametrize("io", ["sync", "async"])
@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_sigkill_at_each_stage_then_resume_picks_a_good_checkpoint(
    killer: tuple[IO[str], IO[str], Path], tmp_path: Path, kill_point: str, io: str
) -> None:
    stdin, stdout, log = killer
    event, name, resume_steps, left = KILL_POINTS[kill_point]
    directory = tmp_path / "run"
    stdin.write(f"{directory} {io} {event} {name}\n")
    stdin.flush()
    ready, _, _ = select.select([stdout], [], [], 120)
    assert ready, f"no answer from the killer process; stderr:\n{log.read_text()}"
    status = int(stdout.readline().split()[1])
    assert os.WIFSIGNALED(status), f"did not die at {kill_point}; stderr:\n{log.read_text()}"
    assert os.WTERMSIG(status) == signal.SIGKILL

    # right after the kill: the recorded checkpoints all load with plain torch.load
    assert {f"step={s}.ckpt" for s in left} <= names(directory)
    for entry in manifest(directory)["checkpoints"]:
        saved = torch.load(directory / entry["path"], weights_only=True)
        assert saved["step"] == entry["step"]

    fabric = Fabric(checkpoint_io=AsyncCheckpointIO() if io == "async" else None)
    config: dict[str, Any] = {"filename": "{step}", "every_n_steps": 1, "keep_last_k": 2}
    state = filled_state(0.0)
    with CheckpointManager(fabric, directory, **config) as manager:
        result = manager.resume(state)
        assert result is not None
        assert result.skipped == ()
        assert result.step in resume_steps
        assert (state["step"], weight_value(state)) == (result.step, result.step)
        run_steps(manager, range(result.step + 1, 7))
    fabric.teardown()
    # the run finished cleanly: the last two and the one it resumed from, no leftovers or strays
    kept = {f"step={s}.ckpt" for s in (5, 6, result.step)}
    assert names(directory) == kept | {MANIFEST_NAME, POINTER_NAME}
    assert manifest(directory)["deleting"] == []
    assert pointer(directory)["path"] == "step=6.ckpt"


# -- several ranks ---------------------------------------------------------------------------


def _ddp_body(rank: int, world_size: int, directory: str) -> None:
    now = [0.0]
    fabric = Fabric()
    config: dict[str, Any] = {
        "filename": "{step}",
        "every_n_steps": 2,
        "every_seconds": 1000.0,
        "monitor": "loss",
        "save_top_k": 1,
        "clock": lambda: now[0],
    }
    manager = CheckpointManager(fabric, directory, **config)
    for step in range(1, 7):
        now[0] += 1.0 if rank == 0 else 5000.0  # rank 1's clock says "due": rank 0's decides
        loss = float(10 - step) + rank  # metrics differ per rank: rank 0's are recorded
        manager.maybe_save(filled_state(float(step), step), step=step, metrics={"loss": loss})
    manager.close()
    assert manager.paths == [f"{directory}/step=6.ckpt"]
    assert manager.best_score == 4.0
    torch.distributed.barrier()
    if rank == 0:
        assert names(Path(directory)) == {"step=6.ckpt", MANIFEST_NAME, POINTER_NAME}
    state = filled_state(0.0)
    with CheckpointManager(fabric, directory, **config) as again:
        result = again.resume(state)
    assert result is not None
    assert (result.step, weight_value(state)) == (6, 6.0)


@pytest.mark.distributed
def test_ddp_ranks_agree_on_when_to_save_and_rank_0_keeps_the_books(tmp_path: Path) -> None:
    run_distributed(_ddp_body, 2, tmp_path, args=(str(tmp_path / "run"),))


# -- leftovers of killed saves ---------------------------------------------------------------


def _leftover(directory: Path, name: str, age_s: float) -> Path:
    """A staged temp file as a killed save leaves it, last touched ``age_s`` ago."""
    temp = directory / f".{name}.tmp-{os.urandom(6).hex()}"
    temp.write_bytes(b"half a checkpoint")
    then = time.time() - age_s
    os.utime(temp, (then, then))
    return temp


def test_remove_orphans_spares_young_leftovers_and_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with CheckpointManager(Fabric(), directory, filename="{step}", every_n_steps=1) as manager:
        manager.maybe_save(filled_state(1.0, 1), step=1)
        manager.wait()
        old = _leftover(directory, "step=2.ckpt", age_s=7200)
        young = _leftover(directory, "step=3.ckpt", age_s=10)  # a save may be writing it
        listed = manager.remove_orphans(dry_run=True)
        assert [(o.path, o.kind) for o in listed] == [(f"{directory}/{old.name}", "temp file")]
        assert old.exists()
        assert [o.path for o in manager.remove_orphans()] == [f"{directory}/{old.name}"]
        assert not old.exists()
        assert young.exists()
        assert [o.path for o in manager.remove_orphans(older_than_s=0)] == [
            f"{directory}/{young.name}"
        ]
        with pytest.raises(ValueError, match="older_than_s"):
            manager.remove_orphans(older_than_s=-1)
    assert names(directory) == {"step=1.ckpt", MANIFEST_NAME, POINTER_NAME}
    state = filled_state(0.0)
    with CheckpointManager(Fabric(), directory, filename="{step}", every_n_steps=1) as again:
        assert again.resume(state) is not None
    assert weight_value(state) == 1.0


def _orphans_body(rank: int, world_size: int, directory: str) -> None:
    fabric = Fabric()
    with CheckpointManager(fabric, directory, filename="{step}", every_n_steps=1) as manager:
        manager.maybe_save(filled_state(1.0, 1), step=1)
        if rank == 0:
            _leftover(Path(directory), "step=9.ckpt", age_s=7200)
        torch.distributed.barrier()
        removed = manager.remove_orphans()
        assert [Path(o.path).name.startswith(".step=9.ckpt.tmp-") for o in removed] == [True]
    torch.distributed.barrier()
    assert names(Path(directory)) == {"step=1.ckpt", MANIFEST_NAME, POINTER_NAME}
    assert not [n for n in os.listdir(directory) if n.startswith(".step=9")]


@pytest.mark.distributed
def test_remove_orphans_under_ddp_rank_0_removes_every_rank_learns(tmp_path: Path) -> None:
    run_distributed(_orphans_body, 2, tmp_path, args=(str(tmp_path / "run"),))
