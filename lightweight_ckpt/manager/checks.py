"""Checks of what the user passes to ``CheckpointManager``, raised at the door.

Pure (no I/O, no collectives), so that every rank raises the same ``TypeError`` /
``ValueError`` before the first collective: the constructor's arguments (``check_arguments``,
``checked_schedule``, ``check_policy``), ``hparams`` (``check_plain``: what
``torch.load(weights_only=True)`` can read), ``metrics`` (``plain_metrics``) and the state to
save (``select_entries``, ``module_entries``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightweight_ckpt.fabric import Fabric
from lightweight_ckpt.manager.policy import (
    METADATA_KEY,
    RetentionPolicy,
    SaveSchedule,
    template_fields,
)

if TYPE_CHECKING:
    from lightweight_ckpt.types import State

_PLAIN_LEAVES = (str, int, float, bool, type(None))


def check_plain(value: object, where: str = "hparams") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)`` cannot hold.

    Plain means ``str``, ``int``, ``float``, ``bool``, ``None`` and lists, tuples and
    ``str``-keyed dicts of those.
    """
    if isinstance(value, _PLAIN_LEAVES):
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str keys")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r}); hparams hold plain types only "
        "(str, int, float, bool, None, lists, tuples, dicts) so that "
        "torch.load(weights_only=True) reads them. Convert it (e.g. str(value))."
    )


def plain_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """Return ``metrics`` as floats (numbers and one-element tensors); raise ``TypeError``."""
    result: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            result[str(name)] = float(value.detach().cpu().item())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result[str(name)] = float(value)
        else:
            raise TypeError(
                f"metrics[{name!r}] must be a number or a one-element tensor, "
                f"got {type(value).__name__}"
            )
    return result


def check_arguments(
    *,
    fabric: object,
    dirpath: object,
    filename: object,
    filter: object,  # noqa: A002 - Lightning's name
    hparams: object,
    clock: object,
) -> None:
    """Raise ``TypeError``/``ValueError`` for a bad ``CheckpointManager`` argument."""
    if not isinstance(fabric, Fabric):
        raise TypeError(f"fabric must be a lightweight_ckpt.Fabric, got {type(fabric).__name__}")
    if not isinstance(dirpath, str) and not hasattr(dirpath, "__fspath__"):
        raise TypeError(f"dirpath must be a str or os.PathLike, got {type(dirpath).__name__}")
    if filename is not None:
        if not isinstance(filename, str):
            raise TypeError(f"filename must be a str, got {type(filename).__name__}")
        template_fields(filename)
    if filter is not None and (
        not isinstance(filter, Mapping) or not all(callable(f) for f in filter.values())
    ):
        raise TypeError("filter must be a dict of {state key: callable(name, value) -> bool}")
    if hparams is not None:
        if not isinstance(hparams, Mapping):
            raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
        check_plain(dict(hparams))
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")


def checked_schedule(schedule: SaveSchedule) -> SaveSchedule:
    """Validate ``schedule``; with no trigger at all, save every epoch (Lightning's default)."""
    for name, kinds in (
        ("every_n_steps", int),
        ("every_n_epochs", int),
        ("every_seconds", int | float),
    ):
        value = getattr(schedule, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, kinds) or not value > 0
        ):
            kind = "int" if kinds is int else "number"
            raise ValueError(f"{name} must be a positive {kind} or None, got {value!r}")
    if schedule == SaveSchedule():
        return SaveSchedule(every_n_epochs=1)
    return schedule


def _check_k(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
        raise ValueError(f"{name} must be -1 (keep all), a positive int or None, got {value!r}")


def check_policy(policy: RetentionPolicy) -> None:
    """Raise ``ValueError`` for an invalid ``mode``, ``k``, or ``save_top_k`` with no monitor."""
    if policy.mode not in {"min", "max"}:
        raise ValueError(f"mode must be 'min' or 'max', got {policy.mode!r}")
    _check_k("save_top_k", policy.save_top_k)
    _check_k("keep_last_k", policy.keep_last_k)
    if policy.save_top_k is not None and policy.monitor is None:
        raise ValueError(
            "save_top_k ranks checkpoints by a metric: pass monitor='<metric name>', "
            "or use keep_last_k to keep the newest ones"
        )


def select_entries(state: State, weights_only: bool) -> State:
    """Return the state entries to save (only the modules with ``weights_only``)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of objects, got {type(state).__name__}")
    if METADATA_KEY in state:
        raise ValueError(f"state must not use the key {METADATA_KEY!r}: the manager writes it")
    return module_entries(state) if weights_only else dict(state)


def module_entries(state: State) -> State:
    """Return the ``nn.Module`` entries of ``state``; raise ``ValueError`` if there are none."""
    modules = {k: v for k, v in state.items() if isinstance(v, nn.Module)}
    if not modules:
        raise ValueError(f"save_weights_only=True, but state {sorted(state)} holds no nn.Module")
    return modules
