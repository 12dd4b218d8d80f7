"""A load that a module or optimizer refuses halfway changes nothing, bitwise.

Checkpoint tensors are read straight into the caller's parameters and optimizer moments (no
second copy), so everything that may refuse (``set_extra_state``, load hooks, custom loaders)
has to run before those bytes land. Each test saves a state, builds a differing target whose one
entry refuses its state, and checks every tensor and value of every entry afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR on import: do it at collection
from torch import nn

from lightweight_ckpt import Fabric
from tests.helpers.asserts import (
    assert_states_differ,
    assert_states_equal,
    snapshot,
    states_equal,
)
from tests.helpers.models import Tiny, add_load_pre_hook, train_steps


class WithExtraState(nn.Module):
    """A model with extra state (a version tag); ``refuse`` makes ``set_extra_state`` raise."""

    def __init__(self, tag: int, refuse: bool = False) -> None:
        super().__init__()
        self.body = Tiny()
        self.tag = tag
        self.refuse = refuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def get_extra_state(self) -> Any:
        return {"tag": self.tag}

    def set_extra_state(self, state: Any) -> None:
        if self.refuse:
            raise RuntimeError(f"refusing extra state {state}")
        self.tag = state["tag"]


class Counter:
    def __init__(self, count: int) -> None:
        self.count = count

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.count = state_dict["count"]


def build(seed: int, refuse: bool = False) -> dict[str, Any]:
    """Two models (the second with extra state), one AdamW over both, a scheduler, values."""
    torch.manual_seed(seed)
    first, second = Tiny(), WithExtraState(tag=seed, refuse=refuse)
    optimizer = torch.optim.AdamW([*first.parameters(), *second.parameters()], lr=1e-2)
    for _ in range(seed % 3 + 1):
        train_steps(first, optimizer, steps=1)
        train_steps(second, optimizer, steps=1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=seed + 1)
    return {
        "counter": Counter(seed),
        "first": first,
        "optimizer": optimizer,
        "second": second,
        "scheduler": scheduler,
        "step": seed,
        "hparams": {"seed": seed},
    }


def saved_state(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path / "state.ckpt")
    source = build(seed=1)
    Fabric().save(path, source)
    return path, source


def everything(state: dict[str, Any]) -> dict[str, Any]:
    """Every tensor and value a load may touch (extra state included), cloned."""
    plain = {key: snapshot(value) for key, value in state.items()}
    plain["second.tag"] = state["second"].tag
    plain["param.ids"] = [id(p) for p in state["optimizer"].param_groups[0]["params"]]
    return plain


def assert_unchanged(state: dict[str, Any], before: dict[str, Any]) -> None:
    after = everything(state)
    assert list(after) == list(before)
    for key, value in before.items():
        assert states_equal(after[key], value), f"{key} changed"


def test_a_refused_extra_state_changes_no_parameter_moment_or_entry(tmp_path: Path):
    path, source = saved_state(tmp_path)
    target = build(seed=5, refuse=True)
    before = everything(target)
    for key in ("first", "optimizer", "counter", "scheduler", "step"):
        assert_states_differ(target[key], source[key])
    assert_states_differ(target["second"].body, source["second"].body)

    with pytest.raises(RuntimeError, match="refusing extra state"):
        Fabric().load(path, target)

    assert_unchanged(target, before)

    # the same file loads bitwise once the module accepts it (the test can see a load)
    target["second"].refuse = False
    Fabric().load(path, target)
    for key in ("first", "optimizer", "counter", "scheduler"):
        assert_states_equal(target[key], source[key])
    assert_states_equal(target["second"].body, source["second"].body)
    assert target["second"].tag == 1
    assert target["step"] == 1


def test_a_refusing_load_hook_changes_nothing(tmp_path: Path):
    path, _ = saved_state(tmp_path)
    target = build(seed=5)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("hook refused")

    add_load_pre_hook(target["second"].body.fc2, refuse)
    before = everything(target)

    with pytest.raises(RuntimeError, match="hook refused"):
        Fabric().load(path, target)

    assert_unchanged(target, before)


def test_a_refusing_optimizer_changes_no_module_and_puts_extra_state_back(tmp_path: Path):
    path, _ = saved_state(tmp_path)
    target = build(seed=5)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("optimizer refused")

    target["optimizer"].register_load_state_dict_pre_hook(refuse)
    before = everything(target)
    assert before["second.tag"] == 5

    with pytest.raises(RuntimeError, match="optimizer refused"):
        Fabric().load(path, target)

    assert_unchanged(target, before)
    assert target["second"].tag == 5  # the rehearsal set it to 1; it was put back


def test_an_optimizer_keeping_state_in_another_dtype_gets_the_filled_bytes(tmp_path: Path):
    """Moments bound to the optimizer's tensors, cast by ``load_state_dict``: cast after fill."""
    path = str(tmp_path / "state.ckpt")
    torch.manual_seed(1)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, steps=2)
    for entries in optimizer.state.values():  # kept in float64 while the parameters are float32
        entries["exp_avg"] = entries["exp_avg"].double()
    Fabric().save(path, {"optimizer": optimizer})

    torch.manual_seed(2)
    other = Tiny()
    target = torch.optim.AdamW(other.parameters(), lr=1e-2)
    train_steps(other, target, steps=1)
    for entries in target.state.values():
        entries["exp_avg"] = entries["exp_avg"].double()
    expected = [entries["exp_avg"].float() for entries in optimizer.state.values()]
    assert not all(
        torch.equal(e["exp_avg"].float(), x)
        for e, x in zip(target.state.values(), expected, strict=True)
    )

    Fabric().load(path, {"optimizer": target})

    got = [entries["exp_avg"] for entries in target.state.values()]
    assert all(g.dtype == torch.float32 for g in got)
    assert all(torch.equal(g, x) for g, x in zip(got, expected, strict=True))
