"""Optimizer state whose tensors do not fit the parameters is refused before anything changes.

Every ``torch.optim`` optimizer round-trips (so the rule never refuses a fitting state: Adafactor's
row/column factors and LBFGS's flat history included) and refuses the state of other parameters,
strict or not, listing every misfit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR on import: do it at collection
from torch import nn

from lightweight_ckpt import Fabric, StateMismatchError
from lightweight_ckpt.state import plan_restore
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot


def two_layers(out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, out), nn.Linear(out, 2))


def trained(model: nn.Module, make: Any, steps: int = 2) -> torch.optim.Optimizer:
    optimizer = make(model.parameters())
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(torch.randn(3, 4)).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return optimizer


OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "Adadelta": torch.optim.Adadelta,
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3, history_size=2),
}
if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
    OPTIMIZERS["Adafactor"] = lambda p: torch.optim.Adafactor(p, lr=1e-2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_torch_optimizer_round_trips_and_refuses_other_shapes(tmp_path: Path, name: str):
    make = OPTIMIZERS[name]
    path = tmp_path / "state.ckpt"
    source = trained(two_layers(3, seed=1), make)
    Fabric().save(path, {"optimizer": source})

    # same parameter shapes: loads bitwise (the rule does not refuse a fitting state)
    target = trained(two_layers(3, seed=2), make, steps=1)
    assert_states_differ(target, source)
    Fabric().load(path, {"optimizer": target})
    assert_states_equal(target, source)

    # other shapes: refused, strict or not, and nothing changes
    other = trained(two_layers(5, seed=3), make, steps=1)
    before = snapshot(other)
    for strict in (True, False):
        with pytest.raises(StateMismatchError, match=r"state\['optimizer'\]") as info:
            Fabric().load(path, {"optimizer": other}, strict=strict)
        assert str(path) in str(info.value)
        assert "other shapes than its parameters" in str(info.value)
        assert_states_equal(other, before)


def test_the_probe_adamw_over_a_wider_layer_lists_every_misfit_sorted(tmp_path: Path):
    """The audit's probe: AdamW saved over Linear(4, 2), loaded over Linear(4, 3)."""
    path = tmp_path / "state.ckpt"
    saved_model = nn.Linear(4, 2)
    saved = trained(saved_model, lambda p: torch.optim.AdamW(p, lr=1e-2))
    Fabric().save(path, {"model": saved_model, "optimizer": saved})
    model = nn.Linear(4, 3)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = snapshot(fresh)

    with pytest.raises(StateMismatchError) as info:
        Fabric().load(path, {"optimizer": fresh})

    listed = re.findall(
        r"param (\d) (\w+): (\[[\d, ]*\]) in checkpoint vs (\[[\d, ]*\])", str(info.value)
    )
    assert listed == [
        ("0", "exp_avg", "[2, 4]", "[3, 4]"),
        ("0", "exp_avg_sq", "[2, 4]", "[3, 4]"),
        ("1", "exp_avg", "[2]", "[3]"),
        ("1", "exp_avg_sq", "[2]", "[3]"),
    ]
    assert_states_equal(fresh, before)
    assert not fresh.state  # a fresh optimizer stays fresh: no first step() crash later


def test_non_strict_load_refuses_the_optimizer_and_changes_no_entry(tmp_path: Path):
    path = tmp_path / "state.ckpt"
    saved_model = two_layers(2, seed=1)
    saved = trained(saved_model, lambda p: torch.optim.AdamW(p, lr=1e-2))
    Fabric().save(path, {"model": saved_model, "optimizer": saved, "step": 7})
    model = two_layers(3, seed=2)
    optimizer = trained(model, lambda p: torch.optim.AdamW(p, lr=1e-2), steps=1)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    before = {key: snapshot(value) for key, value in state.items()}
    assert_states_differ(model[1].bias, saved_model[1].bias)

    with pytest.raises(StateMismatchError, match="leave the optimizer out of the state"):
        Fabric().load(path, state, strict=False)

    for key, value in before.items():
        assert_states_equal(state[key], value)
    # without the optimizer the same non-strict load goes through and reports the model
    fabric = Fabric()
    fabric.load(path, {"model": model, "step": 0}, strict=False)
    assert_states_equal(model[1].bias, saved_model[1].bias)
    assert fabric.last_load_report is not None
    assert fabric.last_load_report.entries["model"].mismatched_shapes


def test_parameters_are_paired_group_by_group():
    """Saved ids pair with the optimizer's parameters in group order, as load_state_dict does."""
    model = two_layers(3, seed=1)
    source = torch.optim.SGD(
        [{"params": [model[1].weight]}, {"params": [model[0].weight]}], lr=0.1, momentum=0.9
    )
    model(torch.randn(2, 4)).sum().backward()
    source.step()
    checkpoint = {"optimizer": snapshot(source)}
    same = torch.optim.SGD(
        [{"params": [model[1].weight]}, {"params": [model[0].weight]}], lr=0.1, momentum=0.9
    )
    plan_restore("p", {"optimizer": same}, checkpoint, strict=True)

    swapped = torch.optim.SGD(
        [{"params": [model[0].weight]}, {"params": [model[1].weight]}], lr=0.1, momentum=0.9
    )
    with pytest.raises(StateMismatchError) as info:
        plan_restore("p", {"optimizer": swapped}, checkpoint, strict=True)
    message = str(info.value)
    assert "param 0 momentum_buffer: [2, 3] in checkpoint vs [3, 4]" in message
    assert "param 1 momentum_buffer: [3, 4] in checkpoint vs [2, 3]" in message
    assert message.index("param 0") < message.index("param 1")


class ScaledSGD(torch.optim.SGD):
    """A user optimizer that also keeps a per-row scale (not the parameter's shape)."""

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["row_scale"] = torch.ones(param.shape[0])
        return super().step(closure)


def test_a_user_optimizer_is_compared_with_its_own_state_only():
    make = lambda p: ScaledSGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    source = trained(two_layers(3, seed=1), make)
    checkpoint = {"optimizer": snapshot(source)}

    # its own kind of state (row_scale is not parameter-shaped) is not refused
    target = trained(two_layers(3, seed=2), make, steps=1)
    plan_restore("p", {"optimizer": target}, checkpoint, strict=True)
    fresh = make(two_layers(3, seed=2).parameters())
    plan_restore("p", {"optimizer": fresh}, checkpoint, strict=True)

    # against state it already holds, other shapes are refused
    other = trained(two_layers(5, seed=3), make, steps=1)
    with pytest.raises(
        StateMismatchError, match=r"param 0 row_scale: \[3\] in checkpoint vs \[5\]"
    ):
        plan_restore("p", {"optimizer": other}, checkpoint, strict=True)
