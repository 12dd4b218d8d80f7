"""``Fabric`` end to end, single process, against real files.

Every point of the Lightning Fabric checkpoint guide (``seeds/002``) and of ``API.md``: each test
shows the target state differs before a load and equals the saved state (bitwise) after it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # see below
import torch.distributed as dist
from torch import nn

from lightweight_ckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    Fabric,
    InvalidCheckpointError,
    LoadReport,
    MissingKeysError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from lightweight_ckpt.io import CheckpointIO, TorchCheckpointIO
from lightweight_ckpt.strategies import SingleDeviceStrategy
from tests.helpers.asserts import (
    assert_states_differ,
    assert_states_equal,
    snapshot,
    states_equal,
)
from tests.helpers.models import Tiny, fresh_like, make_state, train_steps

# Importing torch._dynamo (AdamW's first step does) sets TORCHINDUCTOR_CACHE_DIR once per process;
# importing it at collection keeps the conftest's env-leak check from blaming the first test.

STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "hparams")

# ``torch.compile``'s default backend imports inductor, which trips a torch-internal deprecation.
COMPILE_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


# -- helpers ----------------------------------------------------------------------------------


def snapshot_state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: snapshot(value) for key, value in state.items()}


def differing_target(state: dict[str, Any]) -> dict[str, Any]:
    """A state of the same structure whose every entry differs from ``state``."""
    target = fresh_like(state)
    # fresh_like's scheduler and scaler happen to match make_state's; move them away.
    target["scheduler"].step_size = 5
    target["scheduler"].last_epoch = 9
    target["scaler"] = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=7)
    for key in STATE_KEYS:
        assert_states_differ(target[key], state[key])
    return target


def tensor_identity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (id, data_ptr)}`` of every parameter and buffer: what "in place" preserves."""
    return {
        name: (id(tensor), tensor.data_ptr())
        for name, tensor in model.state_dict(keep_vars=True).items()
    }


def linear_pair(saved_out: int = 2, loaded_out: int = 2) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(1)
    saved = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, saved_out))
    torch.manual_seed(2)
    loaded = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, loaded_out))
    return saved, loaded


class Counter:
    """A user object that is neither a module nor an optimizer, but has a state dict."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.history = torch.arange(count, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = state_dict["count"]
        self.history = state_dict["history"].clone()


class Opaque:
    """A plain value ``weights_only=True`` must refuse to unpickle."""

    def __init__(self, value: int) -> None:
        self.value = value


class CountingIO(CheckpointIO):
    """A user ``CheckpointIO`` that delegates to the default one and counts its calls."""

    def __init__(self) -> None:
        self.inner = TorchCheckpointIO()
        self.saves: list[str] = []
        self.loads: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saves.append(os.fspath(path))
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        self.loads.append(os.fspath(path))
        return self.inner.load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path):
        self.inner.remove_checkpoint(path)


@pytest.fixture
def fabric() -> Fabric:
    return Fabric()


# -- save and load the whole state --------------------------------------------------------------


def test_round_trip_restores_every_entry_exactly(fabric, tmp_path, caplog):
    state = make_state()
    expected = snapshot_state(state)
    target = differing_target(state)
    path = tmp_path / "state.ckpt"

    fabric.save(path, state)
    caplog.set_level(logging.WARNING, logger="lightweight_ckpt")
    remainder = fabric.load(path, target)

    assert not caplog.records, "a clean load must not warn"

    assert remainder == {}
    for key in STATE_KEYS:
        assert_states_equal(target[key], expected[key])
    assert target["step"] == 2
    assert target["hparams"] == {"lr": 1e-2, "name": "tiny", "layers": [8, 2]}
    assert isinstance(fabric.last_load_report, LoadReport)
    assert fabric.last_load_report.clean


def test_restored_training_continues_identically(fabric, tmp_path):
    """Model, optimizer moments, step counts and LR schedule all came back: same next step."""
    state = make_state()
    target = differing_target(state)
    fabric.save(tmp_path / "state.ckpt", state)
    fabric.load(tmp_path / "state.ckpt", target)

    for run in (state, target):
        torch.manual_seed(7)
        train_steps(run["model"], run["optimizer"], steps=2)
        run["scheduler"].step()
    assert_states_equal(target["model"], state["model"])
    assert_states_equal(target["optimizer"], state["optimizer"])
    assert_states_equal(target["scheduler"], state["scheduler"])


def test_saved_file_is_a_plain_torch_checkpoint(fabric, tmp_path):
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)

    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(STATE_KEYS)
    for key in STATE_KEYS:
        assert_states_equal(loaded[key], state[key])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_load_restores_objects_in_place_and_replaces_plain_values(fabric, tmp_path, where):
    state = make_state()
    path = str(tmp_path / "state.ckpt") if where == "local" else "memory://run/state.ckpt"
    fabric.save(path, state)

    target = differing_target(state)
    objects = {key: target[key] for key in ("model", "optimizer", "scheduler", "scaler")}
    params = list(target["model"].parameters())
    identity = tensor_identity(target["model"])
    hparams_before = target["hparams"]

    fabric.load(path, target)

    for key, obj in objects.items():
        assert target[key] is obj, f"state[{key!r}] was replaced, not restored in place"
    assert list(target["model"].parameters()) == params
    assert tensor_identity(target["model"]) == identity
    assert target["optimizer"].param_groups[0]["params"] == params
    # plain values are replaced in the dict the user passed
    assert target["step"] == 2
    assert target["hparams"] is not hparams_before
    assert target["hparams"] == state["hparams"]
    assert_states_equal(target["model"], state["model"])


def test_load_returns_the_remainder_it_did_not_restore(fabric, tmp_path):
    state = make_state()
    expected = snapshot_state(state)
    fabric.save(tmp_path / "state.ckpt", state)
    model = fresh_like(state)["model"]
    assert_states_differ(model, state["model"])

    remainder = fabric.load(tmp_path / "state.ckpt", {"model": model})

    assert_states_equal(model, expected["model"])
    assert sorted(remainder) == sorted(set(STATE_KEYS) - {"model"})
    assert remainder["step"] == 2
    assert remainder["hparams"] == state["hparams"]
    for key in ("optimizer", "scheduler", "scaler"):
        assert_states_equal(remainder[key], expected[key])
    assert fabric.last_load_report.remainder_keys == (
        "optimizer",
        "scheduler",
        "scaler",
        "step",
        "hparams",
    )


def test_load_without_state_returns_the_raw_checkpoint(fabric, tmp_path):
    state = make_state()
    expected = snapshot_state(state)
    fabric.save(tmp_path / "state.ckpt", state)

    full_checkpoint = fabric.load(tmp_path / "state.ckpt")

    assert isinstance(full_checkpoint, dict)
    assert list(full_checkpoint) == list(STATE_KEYS)
    assert full_checkpoint["step"] == 2
    # the guide's manual restore
    target = differing_target(state)
    target["model"].load_state_dict(full_checkpoint["model"])
    target["optimizer"].load_state_dict(full_checkpoint["optimizer"])
    target["scheduler"].load_state_dict(full_checkpoint["scheduler"])
    assert_states_equal(target["model"], expected["model"])
    assert_states_equal(target["optimizer"], expected["optimizer"])
    assert_states_equal(target["scheduler"], expected["scheduler"])


def test_any_object_with_a_state_dict_is_saved_and_restored(fabric, tmp_path):
    counter = Counter(5)
    fabric.save(tmp_path / "c.ckpt", {"counter": counter})
    assert fabric.load(tmp_path / "c.ckpt")["counter"]["count"] == 5

    target = Counter(1)
    assert_states_differ(target, counter)
    fabric.load(tmp_path / "c.ckpt", {"counter": target})
    assert target.count == 5
    assert_states_equal(target.history, torch.arange(5, dtype=torch.float64))


# -- unwrapping -----------------------------------------------------------------------------


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_compiled_module_saves_unwrapped_keys_and_loads_back(fabric, tmp_path):
    model = Tiny()
    compiled = torch.compile(model)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    fabric.save(tmp_path / "m.ckpt", {"model": compiled})

    saved = fabric.load(tmp_path / "m.ckpt")["model"]
    assert list(saved) == list(model.state_dict())
    assert not any("_orig_mod" in key for key in saved)

    torch.manual_seed(3)
    plain, wrapped_inner = Tiny(), Tiny()
    wrapped = torch.compile(wrapped_inner)
    for target in (plain, wrapped_inner):
        assert_states_differ(target, model)
    fabric.load(tmp_path / "m.ckpt", {"model": plain})
    fabric.load(tmp_path / "m.ckpt", {"model": wrapped})
    assert_states_equal(plain, model)
    assert_states_equal(wrapped_inner, model)


def test_data_parallel_saves_unwrapped_keys_and_loads_back(fabric, tmp_path):
    model = Tiny()
    fabric.save(tmp_path / "m.ckpt", {"model": nn.DataParallel(model)})

    saved = fabric.load(tmp_path / "m.ckpt")["model"]
    assert list(saved) == list(model.state_dict())

    torch.manual_seed(3)
    plain, wrapped_inner = Tiny(), Tiny()
    for target in (plain, wrapped_inner):
        assert_states_differ(target, model)
    fabric.load(tmp_path / "m.ckpt", {"model": plain})
    fabric.load(tmp_path / "m.ckpt", {"model": nn.DataParallel(wrapped_inner)})
    assert_states_equal(plain, model)
    assert_states_equal(wrapped_inner, model)


def test_ddp_saves_unwrapped_keys_and_loads_into_wrapped_and_plain(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        fabric = Fabric()
        assert isinstance(fabric.strategy, SingleDeviceStrategy)
        model = Tiny()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert next(iter(ddp.state_dict())).startswith("module.")
        fabric.save(tmp_path / "m.ckpt", {"model": ddp})

        saved = fabric.load(tmp_path / "m.ckpt")["model"]
        assert list(saved) == list(model.state_dict())
        assert not any(key.startswith("module.") for key in saved)

        torch.manual_seed(3)
        plain, wrapped_inner = Tiny(), Tiny()
        wrapped = nn.parallel.DistributedDataParallel(wrapped_inner)
        for target in (plain, wrapped_inner):
            assert_states_differ(target, model)
        fabric.load(tmp_path / "m.ckpt", {"model": wrapped})
        fabric.load(tmp_path / "m.ckpt", {"model": plain})
        assert_states_equal(wrapped_inner, model)
        assert_states_equal(plain, model)
    finally:
        dist.destroy_process_group()


# -- save filters ---------------------------------------------------------------------------


def test_filter_saves_only_matching_items_and_leaves_the_optimizer_alone(fabric, tmp_path):
    state = make_state()
    model, optimizer = state["model"], state["optimizer"]
    seen: list[tuple[str, type]] = []

    def keep(name: str, value: Any) -> bool:
        seen.append((name, type(value)))
        return "weight" in name

    fabric.save(
        tmp_path / "f.ckpt",
        {"model": model, "optimizer": optimizer, "foo": 123},
        filter={"model": keep},
    )

    full = fabric.load(tmp_path / "f.ckpt")
    weights = [name for name in model.state_dict() if "weight" in name]
    assert weights == ["fc1.weight", "norm.weight", "fc2.weight"]
    assert list(full["model"]) == weights
    for name in weights:
        assert_states_equal(full["model"][name], model.state_dict()[name])
    # "the optimizer params corresponding to the excluded model params are not filtered"
    assert_states_equal(full["optimizer"], optimizer)
    assert len(full["optimizer"]["state"]) == len(list(model.parameters()))
    assert full["foo"] == 123
    assert [name for name, _ in seen] == list(model.state_dict())
    assert all(kind is torch.Tensor for _, kind in seen)


def test_filter_applies_to_stateful_objects_and_plain_dicts(fabric, tmp_path):
    state = make_state()
    fabric.save(
        tmp_path / "f.ckpt",
        state,
        filter={
            "hparams": lambda k, v: k != "name",
            "scheduler": lambda k, v: k in ("last_epoch", "_last_lr"),
        },
    )
    full = fabric.load(tmp_path / "f.ckpt")
    assert full["hparams"] == {"lr": 1e-2, "layers": [8, 2]}
    assert sorted(full["scheduler"]) == ["_last_lr", "last_epoch"]
    assert_states_equal(full["model"], state["model"])


@pytest.mark.parametrize("bad", [lambda k, v: True, ["model"], "model"])
def test_filter_that_is_not_a_dict_is_a_type_error(fabric, tmp_path, bad):
    with pytest.raises(TypeError, match="filter must be a dict"):
        fabric.save(tmp_path / "f.ckpt", {"model": Tiny()}, filter=bad)
    assert not (tmp_path / "f.ckpt").exists()


def test_filter_key_not_in_state_is_a_value_error_listing_them(fabric, tmp_path):
    with pytest.raises(ValueError, match=r"\['modle', 'zzz'\]") as info:
        fabric.save(
            tmp_path / "f.ckpt",
            {"model": Tiny(), "step": 1},
            filter={"zzz": lambda k, v: True, "model": lambda k, v: True, "modle": len},
        )
    assert "model" in str(info.value)
    assert not (tmp_path / "f.ckpt").exists()


def test_filter_value_that_is_not_callable_is_a_type_error(fabric, tmp_path):
    with pytest.raises(TypeError, match="'model'"):
        fabric.save(tmp_path / "f.ckpt", {"model": Tiny()}, filter={"model": "weight"})
    assert not (tmp_path / "f.ckpt").exists()


def test_filter_on_a_plain_value_is_a_type_error(fabric, tmp_path):
    with pytest.raises(TypeError, match="'step'"):
        fabric.save(tmp_path / "f.ckpt", {"step": 3}, filter={"step": lambda k, v: True})
    assert not (tmp_path / "f.ckpt").exists()


# -- strict and partial loads ---------------------------------------------------------------


def test_strict_load_of_missing_keys_lists_them_all_and_changes_nothing(fabric, tmp_path):
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"model": state["model"]})
    model = fresh_like(state)["model"]
    before = snapshot(model)
    assert_states_differ(model, state["model"])

    with pytest.raises(MissingKeysError) as info:
        fabric.load(path, {"model": model, "missing2": 2, "missing1": 1})

    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, CheckpointError)
    message = str(info.value)
    assert "['missing1', 'missing2']" in message
    assert str(path) in message
    assert_states_equal(model, before)


def test_non_strict_load_skips_missing_keys(fabric, tmp_path):
    state = make_state()
    fabric.save(tmp_path / "state.ckpt", {"model": state["model"]})
    model = fresh_like(state)["model"]
    target = {"model": model, "missing2": 2, "missing1": 1}

    remainder = fabric.load(tmp_path / "state.ckpt", target, strict=False)

    assert remainder == {}
    assert_states_equal(model, state["model"])
    assert target["missing1"] == 1
    assert target["missing2"] == 2
    assert fabric.last_load_report.missing_entries == ("missing1", "missing2")
    assert not fabric.last_load_report.clean


def test_guide_example_bias_missing_in_the_new_model(fabric, tmp_path, caplog):
    torch.manual_seed(1)
    model1 = nn.Linear(2, 2, bias=True)
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"model": model1})

    torch.manual_seed(2)
    model2 = nn.Linear(2, 2, bias=False)
    before = snapshot(model2)
    assert_states_differ(model2.weight, model1.weight)

    with pytest.raises(StateMismatchError) as info:
        fabric.load(path, {"model": model2}, strict=True)
    assert isinstance(info.value, ValueError)
    assert "bias" in str(info.value)
    assert str(path) in str(info.value)
    assert_states_equal(model2, before)

    caplog.set_level(logging.WARNING, logger="lightweight_ckpt")
    fabric.load(path, {"model": model2}, strict=False)

    assert_states_equal(model2.weight, model1.weight)
    report = fabric.last_load_report
    assert report.entries["model"].unexpected_keys == ("bias",)
    assert report.entries["model"].missing_keys == ()
    assert not report.clean
    warnings = [
        r for r in caplog.records if r.name == "lightweight_ckpt" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "bias" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


def test_non_strict_load_into_a_model_with_an_extra_parameter(fabric, tmp_path):
    torch.manual_seed(1)
    saved = nn.Linear(2, 2, bias=False)
    fabric.save(tmp_path / "state.ckpt", {"model": saved})
    torch.manual_seed(2)
    model = nn.Linear(2, 2, bias=True)
    bias = model.bias.detach().clone()
    assert_states_differ(model.weight, saved.weight)

    with pytest.raises(StateMismatchError, match="bias"):
        fabric.load(tmp_path / "state.ckpt", {"model": model})
    fabric.load(tmp_path / "state.ckpt", {"model": model}, strict=False)

    assert_states_equal(model.weight, saved.weight)
    assert_states_equal(model.bias, bias)
    assert fabric.last_load_report.entries["model"].missing_keys == ("bias",)


def test_non_strict_load_skips_mismatched_shapes_and_loads_the_rest(fabric, tmp_path):
    saved, model = linear_pair(saved_out=2, loaded_out=3)
    fabric.save(tmp_path / "state.ckpt", {"model": saved})
    kept = snapshot(model[1])
    assert_states_differ(model[0], saved[0])

    fabric.load(tmp_path / "state.ckpt", {"model": model}, strict=False)

    assert_states_equal(model[0], saved[0])
    assert_states_equal(model[1], kept)
    entry = fabric.last_load_report.entries["model"]
    assert entry.mismatched_shapes == (("1.bias", (2,), (3,)), ("1.weight", (2, 4), (3, 4)))
    assert entry.missing_keys == ()
    assert entry.unexpected_keys == ()


def test_strict_shape_mismatch_raises_and_changes_nothing_at_all(fabric, tmp_path):
    saved, model = linear_pair(saved_out=2, loaded_out=3)
    saved_opt = torch.optim.AdamW(saved.parameters(), lr=1e-2)
    train_steps(saved, saved_opt)
    saved_sched = torch.optim.lr_scheduler.StepLR(saved_opt, step_size=1)
    path = tmp_path / "state.ckpt"
    fabric.save(
        path,
        {
            "optimizer": saved_opt,
            "scheduler": saved_sched,
            "counter": Counter(4),
            "model": saved,
            "step": 10,
            "hparams": {"lr": 0.5},
        },
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    target = {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "counter": Counter(1),
        "model": model,
        "step": 0,
        "hparams": {"lr": 0.1},
    }
    before = snapshot_state(target)

    with pytest.raises(StateMismatchError) as info:
        fabric.load(path, target)

    message = str(info.value)
    assert "1.weight" in message
    assert "1.bias" in message
    assert str(path) in message
    assert_states_equal(snapshot_state(target), before)
    assert target["step"] == 0


def test_strict_error_lists_every_bad_entry_and_missing_key(fabric, tmp_path):
    """Two modules that do not fit and a key the file lacks: one error names all of them."""
    saved, model = linear_pair(saved_out=2, loaded_out=3)
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"ema": nn.Linear(2, 2, bias=False), "model": saved, "step": 4})
    target = {"model": model, "ema": nn.Linear(2, 2, bias=True), "step": 0, "epoch": 1}
    before = snapshot_state(target)

    with pytest.raises(MissingKeysError) as info:
        fabric.load(path, target)

    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert message.startswith(f"{path}: the checkpoint lacks the requested keys ['epoch']")
    assert message.index("['epoch']") < message.index("state['ema']")
    assert message.index("state['ema']") < message.index("state['model']")
    assert "missing ['bias']" in message
    assert "1.weight: [2, 4] in checkpoint vs [3, 4]" in message
    assert_states_equal(snapshot_state(target), before)

    del target["epoch"]
    with pytest.raises(StateMismatchError) as info:
        fabric.load(path, target)
    assert not isinstance(info.value, KeyError)
    assert "state['ema']" in str(info.value)
    assert "state['model']" in str(info.value)
    assert_states_equal(snapshot_state(target), {k: v for k, v in before.items() if k != "epoch"})


def test_optimizer_with_other_parameters_is_a_mismatch_and_changes_nothing(fabric, tmp_path):
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)

    other = differing_target(state)
    model = other["model"]
    fewer_params = torch.optim.AdamW(model.fc1.parameters(), lr=1e-3)
    two_groups = torch.optim.AdamW(
        [{"params": model.fc1.parameters()}, {"params": model.fc2.parameters()}], lr=1e-3
    )
    for optimizer in (fewer_params, two_groups):
        target = {"model": model, "optimizer": optimizer, "step": 0}
        before = snapshot_state(target)
        with pytest.raises(StateMismatchError, match="'optimizer'") as info:
            fabric.load(path, target)
        assert str(path) in str(info.value)
        assert_states_equal(snapshot_state(target), before)


def test_a_stateful_entry_that_refuses_its_state_changes_nothing(fabric, tmp_path):
    """All-or-nothing: a GradScaler saved disabled refuses to load into an enabled one."""
    state = make_state()
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)

    target = differing_target(make_state())
    before = snapshot_state(target)
    assert_states_differ(target["model"], state["model"])

    with pytest.raises(RuntimeError, match="GradScaler"):
        fabric.load(path, target)

    for key in STATE_KEYS:
        assert states_equal(target[key], before[key]), f"state[{key!r}] changed"


def test_module_entry_that_is_not_a_state_dict_is_a_mismatch(fabric, tmp_path):
    fabric.save(tmp_path / "state.ckpt", {"model": 3})
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(StateMismatchError, match="'model'"):
        fabric.load(tmp_path / "state.ckpt", {"model": model}, strict=False)
    assert_states_equal(model, before)


# -- load_raw -------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_load_raw_model_file_saved_with_plain_torch(fabric, tmp_path, legacy):
    torch.manual_seed(1)
    friend = Tiny()
    path = tmp_path / "model.pt"
    torch.save(friend.state_dict(), path, _use_new_zipfile_serialization=not legacy)

    torch.manual_seed(2)
    model = Tiny()
    identity = tensor_identity(model)
    assert_states_differ(model, friend)

    report = fabric.load_raw(path, model)

    assert_states_equal(model, friend)
    assert tensor_identity(model) == identity
    assert isinstance(report, LoadReport)
    assert report.clean
    assert fabric.last_load_report is report


def test_load_raw_optimizer_file_saved_with_plain_torch(fabric, tmp_path):
    state = make_state()
    path = tmp_path / "optimizer.pt"
    torch.save(state["optimizer"].state_dict(), path)
    other = differing_target(state)
    assert_states_differ(other["optimizer"], state["optimizer"])

    fabric.load_raw(path, other["optimizer"])

    assert_states_equal(other["optimizer"], state["optimizer"])


def test_load_raw_strict_and_non_strict(fabric, tmp_path):
    torch.manual_seed(1)
    friend = nn.Linear(3, 3, bias=False)
    path = tmp_path / "model.pt"
    torch.save(friend.state_dict(), path)
    torch.manual_seed(2)
    model = nn.Linear(3, 3, bias=True)
    before = snapshot(model)

    with pytest.raises(StateMismatchError, match="bias") as info:
        fabric.load_raw(path, model)
    assert str(path) in str(info.value)
    assert_states_equal(model, before)

    report = fabric.load_raw(path, model, strict=False)

    assert isinstance(report, LoadReport)
    assert not report.clean
    (entry,) = report.entries.values()
    assert entry.missing_keys == ("bias",)
    assert_states_equal(model.weight, friend.weight)
    assert_states_equal(model.bias, before["bias"])


@pytest.mark.filterwarnings(COMPILE_WARNING)
@pytest.mark.parametrize("wrap", ["compile", "data-parallel"])
def test_load_raw_into_a_wrapped_model(fabric, tmp_path, wrap):
    torch.manual_seed(1)
    friend = Tiny()
    path = tmp_path / "model.pt"
    torch.save(friend.state_dict(), path)
    torch.manual_seed(2)
    model = Tiny()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    assert_states_differ(model, friend)

    assert fabric.load_raw(path, wrapped).clean

    assert_states_equal(model, friend)


@pytest.mark.parametrize("obj", [{"weight": 1}, Counter(), 3], ids=["dict", "stateful", "int"])
def test_load_raw_into_something_else_is_a_type_error(fabric, tmp_path, obj):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(TypeError, match="Module or an Optimizer"):
        fabric.load_raw(path, obj)


# -- bad input ------------------------------------------------------------------------------


def test_missing_file_is_a_file_not_found_error_naming_the_path(fabric, tmp_path):
    path = tmp_path / "nothing.ckpt"
    model = Tiny()
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(path))) as info:
        fabric.load(path, {"model": model})
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        fabric.load_raw(path, model)


def test_a_file_that_is_not_a_checkpoint_is_rejected(fabric, tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not the tensors you are looking for\n")
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(InvalidCheckpointError, match=re.escape(str(path))):
        fabric.load(path, {"model": model})
    assert_states_equal(model, before)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_rejected_and_changes_nothing(fabric, tmp_path, damage):
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        # a byte inside fc1.weight's data: find its bytes in the file and flip one
        raw = state["model"].fc1.weight.detach().numpy().tobytes()
        at = data.find(raw)
        assert at > 0
        data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))

    target = differing_target(state)
    before = snapshot_state(target)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(path))):
        fabric.load(path, target)
    assert_states_equal(snapshot_state(target), before)


def test_pickled_objects_need_weights_only_false(fabric, tmp_path):
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"extra": Opaque(4), "step": 1})
    target = {"extra": None, "step": 0}
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(path))):
        fabric.load(path, target)
    assert target == {"extra": None, "step": 0}

    fabric.load(path, target, weights_only=False)
    assert isinstance(target["extra"], Opaque)
    assert target["extra"].value == 4
    assert target["step"] == 1


def test_a_failed_save_leaves_the_previous_checkpoint_intact(fabric, tmp_path):
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)
    good = path.read_bytes()

    with pytest.raises(CheckpointWriteError, match=re.escape(str(path))):
        fabric.save(path, {"model": Tiny(), "unpicklable": lambda: None})

    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["state.ckpt"]
    assert_states_equal(fabric.load(path)["model"], state["model"])

    fresh = tmp_path / "fresh.ckpt"
    with pytest.raises(CheckpointWriteError, match=re.escape(str(fresh))):
        fabric.save(fresh, {"unpicklable": lambda: None})
    assert sorted(os.listdir(tmp_path)) == ["state.ckpt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((123, {}), "path must be"),
        (("x.ckpt", [1, 2]), "state must be a dict"),
    ],
)
def test_bad_argument_types_are_type_errors(fabric, args, message):
    with pytest.raises(TypeError, match=message):
        fabric.save(*args)


# -- properties, plugins and logs -----------------------------------------------------------


def test_single_process_properties(fabric):
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert fabric.global_rank == 0
    assert fabric.world_size == 1
    assert fabric.is_global_zero is True
    assert fabric.barrier() is None
    assert isinstance(Fabric(strategy="single_device").strategy, SingleDeviceStrategy)


def test_a_strategy_instance_is_used_as_given():
    strategy = SingleDeviceStrategy()
    assert Fabric(strategy=strategy).strategy is strategy


def test_unknown_strategy_is_a_value_error():
    with pytest.raises(ValueError, match="bogus"):
        Fabric(strategy="bogus")


def test_checkpoint_io_that_is_not_a_checkpoint_io_is_a_type_error():
    with pytest.raises(TypeError, match="checkpoint_io"):
        Fabric(checkpoint_io=object())


def test_a_user_checkpoint_io_is_used_for_every_write_and_read(tmp_path):
    io = CountingIO()
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    path = tmp_path / "state.ckpt"
    fabric.save(path, state)
    target = differing_target(state)

    fabric.load(path, target)
    full = fabric.load(path)

    assert io.saves == [str(path)]
    assert io.loads == [str(path), str(path)]
    for key in STATE_KEYS:
        assert_states_equal(target[key], state[key])
        assert_states_equal(full[key], state[key])


def test_save_and_load_log_size_time_and_throughput(fabric, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightweight_ckpt")
    path = tmp_path / "state.ckpt"
    state = make_state()
    fabric.save(path, state)
    fabric.load(path, differing_target(state))

    pattern = re.compile(r"[\d.]+ MiB in [\d.]+ s \([\d.]+ MiB/s\)")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    saved = [m for m in messages if m.startswith("saved") and str(path) in m]
    loaded = [m for m in messages if m.startswith("loaded") and str(path) in m]
    assert len(saved) == 1
    assert len(loaded) == 1
    assert pattern.search(saved[0]), saved[0]
    assert pattern.search(loaded[0]), loaded[0]


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["str", "pathlib", "file-url", "memory-url"])
def test_every_kind_of_path_round_trips(fabric, tmp_path, kind):
    path: str | Path = {
        "str": str(tmp_path / "state.ckpt"),
        "pathlib": tmp_path / "state.ckpt",
        "file-url": f"file://{tmp_path}/state.ckpt",
        "memory-url": "memory://bucket/run/state.ckpt",
    }[kind]
    state = make_state()
    expected = snapshot_state(state)
    target = differing_target(state)

    fabric.save(path, state)
    remainder = fabric.load(path, target)

    assert remainder == {}
    for key in STATE_KEYS:
        assert_states_equal(target[key], expected[key])
    assert_states_equal(fabric.load(path)["model"], expected["model"])
    if kind != "memory-url":
        assert (tmp_path / "state.ckpt").is_file()


@pytest.mark.parametrize("kind", ["local", "file-url", "memory-url"])
def test_save_creates_missing_parent_directories(fabric, tmp_path, kind):
    nested = tmp_path / "a" / "b" / "c"
    path = {
        "local": str(nested / "state.ckpt"),
        "file-url": f"file://{nested}/state.ckpt",
        "memory-url": "memory://new/a/b/c/state.ckpt",
    }[kind]
    model = Tiny()
    fabric.save(path, {"model": model})
    if kind != "memory-url":
        assert (nested / "state.ckpt").is_file()
    torch.manual_seed(5)
    target = Tiny()
    assert_states_differ(target, model)
    fabric.load(path, {"model": target})
    assert_states_equal(target, model)


@pytest.mark.parametrize("io", ["default", "user"])
def test_save_returns_a_handle_that_is_durable_at_once_for_a_sync_io(tmp_path, io):
    fabric = Fabric(checkpoint_io=CountingIO() if io == "user" else None)
    state = make_state()
    path = tmp_path / "state.ckpt"
    handle = fabric.save(path, state, storage_options=None)
    assert path.exists()  # committed before save returned
    assert handle.path == str(path)
    assert handle.done()
    assert handle.is_durable
    assert handle.exception(timeout=0) is None
    handle.wait(timeout=0)
    target = differing_target(state)
    fabric.load(handle.path, target)
    assert_states_equal(target["model"], state["model"])
