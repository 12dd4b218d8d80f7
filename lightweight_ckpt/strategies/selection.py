"""Pick a ``Strategy`` from a name (or ``"auto"``) and the environment: a pure decision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightweight_ckpt import collectives
from lightweight_ckpt.state import find_sharded
from lightweight_ckpt.strategies.base import Strategy
from lightweight_ckpt.strategies.ddp import DDPStrategy
from lightweight_ckpt.strategies.fsdp import FSDPStrategy
from lightweight_ckpt.strategies.single_device import SingleDeviceStrategy

if TYPE_CHECKING:
    from lightweight_ckpt.io import CheckpointIO
    from lightweight_ckpt.types import State

STRATEGY_NAMES = ("auto", "single_device", "ddp", "fsdp", "xla", "xla_fsdp")
_NOT_YET = ("xla", "xla_fsdp")


def auto_strategy_name(state: State | None) -> str:
    """The strategy ``"auto"`` means for this environment and ``state``."""
    if state and find_sharded(state):
        return "fsdp"
    return "ddp" if collectives.world_size() > 1 else "single_device"


def select_strategy(
    strategy: str | Strategy, checkpoint_io: CheckpointIO | None, state: State | None = None
) -> Strategy:
    """Return the strategy for ``strategy`` with ``checkpoint_io`` plugged in.

    A ``Strategy`` instance is used as is; a ``checkpoint_io`` given beside it replaces its IO.
    ``"auto"``: FSDP if a module in ``state`` is sharded (FSDP1 or FSDP2), else DDP in a process
    group of more than one rank, else single device.

    Raises:
        TypeError: ``strategy`` is neither a name nor a ``Strategy``.
        ValueError: an unknown name, or one this version does not provide yet.
    """
    if isinstance(strategy, Strategy):
        if checkpoint_io is not None:
            strategy.checkpoint_io = checkpoint_io
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a name or a Strategy, got {type(strategy).__name__}")
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGY_NAMES)}")
    if strategy == "auto":
        strategy = auto_strategy_name(state)
    if strategy in _NOT_YET:
        raise ValueError(
            f"strategy {strategy!r} is not available in this version of lightweight_ckpt; "
            "'single_device', 'ddp' and 'fsdp' are."
        )
    if strategy == "ddp":
        return DDPStrategy(checkpoint_io)
    if strategy == "fsdp":
        return FSDPStrategy(checkpoint_io)
    return SingleDeviceStrategy(checkpoint_io)
