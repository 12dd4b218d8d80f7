"""The pure state plumbing of ``lightweight_ckpt.state``: no files, no processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR on import: do it at collection
from torch import nn

from lightweight_ckpt import CheckpointError, EntryReport, LoadReport, MissingKeysError
from lightweight_ckpt.errors import StateMismatchError
from lightweight_ckpt.state import (
    apply_filter,
    apply_restore,
    check_requested_keys,
    collect,
    is_stateful,
    iter_tensors,
    plan_restore,
    rehearse_restore,
    to_state_dict,
    unwrap_module,
)
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.models import Tiny, fresh_like, make_state

COMPILE_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


class Box:
    """A user stateful object."""

    def __init__(self, value: int, log: list[str] | None = None) -> None:
        self.value = value
        self.log = log

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append("box")
        self.value = state_dict["value"]


class Refuses(Box):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("refused")


# -- unwrap_module / to_state_dict ----------------------------------------------------------


def test_unwrap_plain_module_is_itself():
    model = Tiny()
    assert unwrap_module(model) is model


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_unwrap_compiled_module():
    model = Tiny()
    assert unwrap_module(torch.compile(model)) is model


def test_unwrap_data_parallel():
    model = Tiny()
    assert unwrap_module(nn.DataParallel(model)) is model


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_unwrap_nested_wrappers():
    model = Tiny()
    assert unwrap_module(torch.compile(nn.DataParallel(model))) is model
    assert unwrap_module(nn.DataParallel(torch.compile(model))) is model
    assert unwrap_module(nn.DataParallel(nn.DataParallel(model))) is model


def test_unwrap_keeps_user_containers():
    inner = Tiny()
    outer = nn.Sequential(inner)
    assert unwrap_module(outer) is outer


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_to_state_dict_of_modules_has_unwrapped_keys():
    model = Tiny()
    expected = list(model.state_dict())
    for wrapped in (model, nn.DataParallel(model), torch.compile(model)):
        state_dict = to_state_dict(wrapped)
        assert list(state_dict) == expected
        assert_states_equal(state_dict, model.state_dict())


def test_to_state_dict_of_optimizer_and_stateful_objects():
    state = make_state()
    assert_states_equal(to_state_dict(state["optimizer"]), state["optimizer"].state_dict())
    assert_states_equal(to_state_dict(state["scheduler"]), state["scheduler"].state_dict())
    assert to_state_dict(state["scaler"]) == state["scaler"].state_dict()
    assert to_state_dict(Box(3)) == {"value": 3}


@pytest.mark.parametrize("value", [3, 2.5, "text", None, [1, 2], {"a": 1}, torch.ones(2)])
def test_to_state_dict_leaves_plain_values_alone(value):
    assert to_state_dict(value) is value


def test_is_stateful():
    state = make_state()
    for key in ("model", "optimizer", "scheduler", "scaler"):
        assert is_stateful(state[key])
    assert is_stateful(Box(1))
    for value in (1, "x", {"state_dict": 1}, torch.ones(1), [Box(1)]):
        assert not is_stateful(value)


# -- collect / apply_filter -----------------------------------------------------------------


def test_collect_converts_and_filters_per_key():
    state = make_state()
    state["box"] = Box(7)
    keep = {
        "model": lambda name, value: "weight" in name,
        "hparams": lambda name, value: name != "name",
    }

    checkpoint = collect(state, keep)

    assert list(checkpoint) == list(state)
    assert list(checkpoint["model"]) == ["fc1.weight", "norm.weight", "fc2.weight"]
    for name in checkpoint["model"]:
        assert_states_equal(checkpoint["model"][name], state["model"].state_dict()[name])
    assert_states_equal(checkpoint["optimizer"], state["optimizer"].state_dict())
    assert checkpoint["hparams"] == {"lr": 1e-2, "layers": [8, 2]}
    assert checkpoint["box"] == {"value": 7}
    assert checkpoint["step"] == 2
    assert state["hparams"] == {"lr": 1e-2, "name": "tiny", "layers": [8, 2]}


def test_collect_uses_the_given_converter():
    seen = []

    def convert(obj: object) -> Any:
        seen.append(obj)
        return {"a": 1, "b": 2} if obj == "x" else obj

    checkpoint = collect({"k": "x", "n": 5}, {"k": lambda name, value: name == "b"}, convert)
    assert checkpoint == {"k": {"b": 2}, "n": 5}
    assert seen == ["x", 5]


def test_apply_filter_keeps_order_and_passes_name_and_value():
    state_dict = {"z": 1, "a": 2, "m": 3, "b": 4}
    calls = []

    def keep(name: str, value: int) -> bool:
        calls.append((name, value))
        return name != "a"

    kept = apply_filter(state_dict, keep)

    assert list(kept.items()) == [("z", 1), ("m", 3), ("b", 4)]
    assert calls == list(state_dict.items())
    assert state_dict == {"z": 1, "a": 2, "m": 3, "b": 4}


# -- check_requested_keys -------------------------------------------------------------------


def test_check_requested_keys_lists_every_missing_key_sorted():
    with pytest.raises(MissingKeysError) as info:
        check_requested_keys("ckpt/x.ckpt", ["zeta", "model", "alpha"], {"model": 1, "step": 2})
    err = info.value
    assert isinstance(err, KeyError)
    assert isinstance(err, CheckpointError)
    message = str(err)
    assert message.startswith("ckpt/x.ckpt: ")
    assert "['alpha', 'zeta']" in message
    assert "['model', 'step']" in message


def test_check_requested_keys_passes_when_all_present():
    check_requested_keys("p", ["a", "b"], {"b": 1, "a": 2, "c": 3})
    check_requested_keys("p", [], {})


# -- plan_restore / apply_restore -----------------------------------------------------------


def checkpoint_of(state: dict[str, Any]) -> dict[str, Any]:
    return {key: snapshot(value) for key, value in state.items()}


def test_plan_changes_nothing_and_apply_restores_in_place():
    source = make_state()
    checkpoint = checkpoint_of(source)
    checkpoint["extra"] = "left over"
    target = fresh_like(source)
    target["scheduler"].last_epoch = 9
    before = {key: snapshot(value) for key, value in target.items()}
    params = list(target["model"].parameters())
    assert_states_differ(target["model"], source["model"])

    plan = plan_restore("p.ckpt", target, checkpoint, strict=True)
    for key, value in before.items():
        assert_states_equal(target[key], value)

    remainder = apply_restore(plan)

    assert remainder == {"extra": "left over"}
    assert list(target["model"].parameters()) == params
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "hparams"):
        assert_states_equal(target[key], source[key])
    assert plan.report.remainder_keys == ("extra",)
    assert plan.report.clean


def test_plan_raises_before_anything_changes_on_missing_keys():
    source = make_state()
    checkpoint = checkpoint_of(source)
    del checkpoint["step"], checkpoint["hparams"]
    target = fresh_like(source)
    before = {key: snapshot(value) for key, value in target.items()}

    with pytest.raises(MissingKeysError, match=r"\['hparams', 'step'\]"):
        plan_restore("p.ckpt", target, checkpoint, strict=True)

    for key, value in before.items():
        assert_states_equal(target[key], value)


def test_plan_raises_before_anything_changes_on_a_shape_mismatch():
    source = make_state()
    checkpoint = checkpoint_of(source)
    checkpoint["model"]["fc2.weight"] = torch.zeros(3, 8)
    target = fresh_like(source)
    before = {key: snapshot(value) for key, value in target.items()}

    with pytest.raises(StateMismatchError, match=r"p\.ckpt: .*'model'.*fc2\.weight") as info:
        plan_restore("p.ckpt", target, checkpoint, strict=True)

    assert isinstance(info.value, ValueError)
    for key, value in before.items():
        assert_states_equal(target[key], value)


def test_strict_plan_lists_every_entry_problem_in_one_error_sorted():
    """A missing key, two bad modules and a bad optimizer: one MissingKeysError names them all."""
    source = {"ema": Tiny(), "model": Tiny(), "optimizer": None}
    source["optimizer"] = torch.optim.SGD(source["model"].parameters(), lr=0.1)
    checkpoint = checkpoint_of(source)
    del checkpoint["model"]["fc1.bias"]
    checkpoint["ema"]["fc2.weight"] = torch.zeros(3, 8)
    del checkpoint["optimizer"]["param_groups"][0]["params"][-1]
    target = {"optimizer": None, "model": Tiny(), "ema": Tiny(), "step": 0, "epoch": 1}
    target["optimizer"] = torch.optim.SGD(target["model"].parameters(), lr=0.1)
    before = {key: snapshot(value) for key, value in target.items()}

    with pytest.raises(MissingKeysError) as info:
        plan_restore("p.ckpt", target, checkpoint, strict=True)

    err = info.value
    assert isinstance(err, KeyError)
    message = str(err)
    assert message.startswith("p.ckpt: the checkpoint lacks the requested keys ['epoch', 'step']")
    positions = [
        message.index("['epoch', 'step']"),
        message.index("state['ema']"),
        message.index("state['model']"),
        message.index("state['optimizer']"),
    ]
    assert positions == sorted(positions)
    assert "fc2.weight: [3, 8] in checkpoint vs [2, 8]" in message
    assert "missing ['fc1.bias']" in message
    assert "sizes [6] but the checkpoint's have sizes [5]" in message
    for key, value in before.items():
        assert_states_equal(target[key], value)

    # without the missing keys: a StateMismatchError naming every remaining problem
    target = {key: target[key] for key in ("optimizer", "model", "ema")}
    with pytest.raises(StateMismatchError) as info:
        plan_restore("p.ckpt", target, checkpoint, strict=True)
    assert not isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("p.ckpt: state['ema'] does not match the checkpoint")
    assert message.index("state['ema']") < message.index("state['model']")
    assert message.index("state['model']") < message.index("state['optimizer']")


def test_plan_names_every_available_key_when_given_a_partial_checkpoint():
    """A sharded template carries only the requested entries; the message names all of them."""
    target = {"model": Tiny(), "ema": Tiny()}
    partial = {"model": checkpoint_of({"model": Tiny()})["model"]}

    with pytest.raises(MissingKeysError) as info:
        plan_restore("dir", target, partial, strict=True, available=["model", "step", "zz"])

    assert "lacks the requested keys ['ema'] (it holds ['model', 'step', 'zz'])" in str(info.value)


def test_non_strict_plan_raises_only_for_what_strict_false_cannot_skip():
    source = {"model": Tiny(), "other": Tiny()}
    checkpoint = checkpoint_of(source)
    del checkpoint["model"]["fc1.bias"]
    checkpoint["other"] = [1, 2]
    target = {"model": Tiny(), "other": Tiny(), "step": 0}

    with pytest.raises(StateMismatchError) as info:
        plan_restore("p.ckpt", target, checkpoint, strict=False)

    message = str(info.value)
    assert message == (
        "p.ckpt: state['other'] is a module but the checkpoint holds a list there, "
        "not a state dict."
    )


def test_plan_rejects_an_optimizer_over_other_parameters():
    source = make_state()
    checkpoint = checkpoint_of(source)
    model = Tiny()
    optimizer = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    with pytest.raises(StateMismatchError, match="'optimizer'"):
        plan_restore("p", {"optimizer": optimizer}, checkpoint, strict=True)
    with pytest.raises(StateMismatchError, match="not an optimizer state dict"):
        plan_restore("p", {"optimizer": optimizer}, {"optimizer": {"x": 1}}, strict=False)


def test_plan_rejects_a_module_entry_that_is_not_a_state_dict():
    with pytest.raises(StateMismatchError, match=r"'model'.*list"):
        plan_restore("p", {"model": Tiny()}, {"model": [1, 2]}, strict=False)


def test_non_strict_plan_reports_missing_unexpected_and_mismatched_sorted():
    model = Tiny()
    checkpoint_dict = dict(snapshot(model))
    del checkpoint_dict["fc1.bias"], checkpoint_dict["norm.weight"]
    checkpoint_dict["zz.extra"] = torch.ones(1)
    checkpoint_dict["aa.extra"] = torch.ones(1)
    checkpoint_dict["fc2.weight"] = torch.ones(5, 8)
    checkpoint_dict["fc1.weight"] = torch.ones(8, 3)

    plan = plan_restore("p", {"model": model, "gone": 1}, {"model": checkpoint_dict}, False)

    entry = plan.report.entries["model"]
    assert entry.missing_keys == ("fc1.bias", "norm.weight")
    assert entry.unexpected_keys == ("aa.extra", "zz.extra")
    assert entry.mismatched_shapes == (
        ("fc1.weight", (8, 3), (8, 8)),
        ("fc2.weight", (5, 8), (2, 8)),
    )
    assert plan.report.missing_entries == ("gone",)
    assert not plan.report.clean
    assert "fc1.weight" not in plan.module_dicts["model"]


def test_apply_restore_loads_stateful_objects_before_modules():
    """A user object that refuses its state must fail before any module is overwritten."""
    source = {"model": Tiny(), "box": Box(3)}
    checkpoint = checkpoint_of(source)
    torch.manual_seed(9)
    target = {"model": Tiny(), "box": Refuses(1)}
    before = snapshot(target["model"])
    assert_states_differ(target["model"], source["model"])

    plan = plan_restore("p", target, checkpoint, strict=True)
    with pytest.raises(RuntimeError, match="refused"):
        apply_restore(plan)

    assert_states_equal(target["model"], before)


class Tagged(Tiny):
    """A model with extra state; ``refuse`` makes ``set_extra_state`` raise."""

    def __init__(self, tag: int, refuse: bool = False) -> None:
        super().__init__()
        self.tag, self.refuse = tag, refuse

    def get_extra_state(self) -> Any:
        return {"tag": self.tag}

    def set_extra_state(self, state: Any) -> None:
        if self.refuse:
            raise RuntimeError("extra state refused")
        self.tag = state["tag"]


def test_rehearse_restore_runs_the_refusals_and_changes_nothing():
    torch.manual_seed(1)
    checkpoint = checkpoint_of({"model": Tagged(tag=1)})
    torch.manual_seed(2)
    accepting, refusing = Tagged(tag=2), Tagged(tag=2, refuse=True)
    for model in (accepting, refusing):
        before = snapshot(model)
        assert_states_differ(model, checkpoint["model"])
        plan = plan_restore("p", {"model": model}, checkpoint, strict=True)
        if model.refuse:
            with pytest.raises(RuntimeError, match="extra state refused"):
                rehearse_restore(plan)
        else:
            rehearse_restore(plan)
        assert_states_equal(model, before)
        assert model.tag == 2

    apply_restore(plan_restore("p", {"model": accepting}, checkpoint, strict=True))
    assert_states_equal(accepting, checkpoint["model"])
    assert accepting.tag == 1


def test_apply_restore_puts_accepted_bindings_in_place_of_checkpoint_tensors():
    source = Tiny()
    checkpoint = {"model": dict(snapshot(source))}
    torch.manual_seed(9)
    target = Tiny()
    plan = plan_restore("p", {"model": target}, checkpoint, strict=True)
    by_name = {b.key: b for b in plan.bindings}
    assert set(by_name) == set(target.state_dict())
    # a reader that honoured fc1.weight would have filled the target itself
    binding = by_name["fc1.weight"]
    binding.target.copy_(binding.source)

    apply_restore(plan, {id(binding.source)})

    assert plan.module_dicts["model"]["fc1.weight"] is binding.target
    assert_states_equal(target, source)


# -- reports --------------------------------------------------------------------------------


def test_entry_report_truthiness_and_description():
    assert not EntryReport()
    assert EntryReport().describe() == "ok"
    report = EntryReport(
        missing_keys=("a", "b"),
        unexpected_keys=("c",),
        mismatched_shapes=(("w", (2, 3), (3, 3)),),
    )
    assert report
    assert report.describe() == (
        "missing ['a', 'b']; unexpected ['c']; shape mismatch [w: [2, 3] in checkpoint vs [3, 3]]"
    )
    assert EntryReport(unexpected_keys=("bias",)).describe() == "unexpected ['bias']"


def test_load_report_str_names_everything():
    report = LoadReport(
        path="runs/last.ckpt",
        strict=False,
        entries={"model": EntryReport(unexpected_keys=("bias",)), "ema": EntryReport()},
        missing_entries=("step",),
        remainder_keys=("optimizer", "hparams"),
    )
    assert not report.clean
    assert str(report).splitlines() == [
        "load report for runs/last.ckpt (strict=False):",
        "  model: unexpected ['bias']",
        "  ema: ok",
        "  not in checkpoint: ['step']",
        "  not requested (returned as remainder): ['optimizer', 'hparams']",
    ]
    assert LoadReport("p", True, {"m": EntryReport()}, (), ("x",)).clean
    assert not LoadReport("p", True, {}, ("x",)).clean


# -- iter_tensors ---------------------------------------------------------------------------


def test_iter_tensors_names_nested_containers():
    t = [torch.full((1,), float(i)) for i in range(5)]
    tree = {"a": {"b": t[0], "c": [t[1], (t[2], 5, "s")]}, "d": 1, "e": (t[3],), 7: t[4]}

    found = list(iter_tensors(tree))

    assert [name for name, _ in found] == ["a.b", "a.c.0", "a.c.1.0", "e.0", "7"]
    assert all(a is b for (_, a), b in zip(found, [t[0], t[1], t[2], t[3], t[4]], strict=True))


def test_iter_tensors_top_level_shapes():
    t = torch.ones(1)
    assert list(iter_tensors(t)) == [("", t)]
    assert [name for name, _ in iter_tensors([t, [t]])] == ["0", "1.0"]
    assert [name for name, _ in iter_tensors({"x": t}, prefix="root")] == ["root.x"]
    assert list(iter_tensors({"a": 1, "b": "s", "c": None})) == []
