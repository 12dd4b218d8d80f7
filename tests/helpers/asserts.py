"""Exact comparisons of state: tensors bitwise, containers recursively."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def as_plain(obj: Any) -> Any:
    """Turn modules/optimizers/stateful objects into state dicts for comparison."""
    if isinstance(obj, nn.Module | torch.optim.Optimizer):
        return obj.state_dict()
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return obj.state_dict()
    return obj


def states_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state (tensors compared exactly, dtype and shape included)."""
    a, b = as_plain(a), as_plain(b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.detach().cpu(), b.detach().cpu())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_states_equal(a: Any, b: Any) -> None:
    assert states_equal(a, b), "states differ"


def assert_states_differ(a: Any, b: Any) -> None:
    assert not states_equal(a, b), "states are equal but should differ"


def snapshot(obj: Any) -> Any:
    """A deep copy of an object's state (tensors cloned) to compare against later."""
    plain = as_plain(obj)
    if isinstance(plain, torch.Tensor):
        return plain.detach().clone()
    if isinstance(plain, dict):
        return {k: snapshot(v) for k, v in plain.items()}
    if isinstance(plain, list | tuple):
        return type(plain)(snapshot(v) for v in plain)
    return plain
