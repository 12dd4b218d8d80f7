"""Pick a ``Strategy`` from a name (or ``"auto"``) and the environment: a pure decision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightweight_ckpt import collectives
from lightweight_ckpt.state import find_sharded
from lightweight_ckpt.strategies.base import Strategy
from lightweight_ckpt.strategies.ddp import DDPStrategy
from lightweight_ckpt.strategies.fsdp import FSDPStrategy
from lightweight_ckpt.strategies.single_device import SingleDeviceStrategy
from lightweight_ckpt.strategies.xla import XLAStrategy, is_xla_runtime
from lightweight_ckpt.strategies.xla_fsdp import XLAFSDPStrategy, find_xla_fsdp

if TYPE_CHECKING:
    from lightweight_ckpt.io import CheckpointIO
    from lightweight_ckpt.types import State

STRATEGY_NAMES = ("auto", "single_device", "ddp", "fsdp", "xla", "xla_fsdp")


def auto_strategy_name(state: State | None) -> str:
    """The strategy ``"auto"`` means for this environment and ``state``."""
    if state and find_xla_fsdp(state):
        return "xla_fsdp"
    if state and find_sharded(state):
        return "fsdp"
    if is_xla_runtime():
        return "xla"
    return "ddp" if collectives.world_size() > 1 else "single_device"


def select_strategy(
    strategy: str | Strategy, checkpoint_io: CheckpointIO | None, state: State | None = None
) -> Strategy:
    """Return the strategy for ``strategy`` with ``checkpoint_io`` plugged in.

    A ``Strategy`` instance is used as is; a ``checkpoint_io`` given beside it replaces its IO.
    ``"auto"``: XLA FSDP if a module in ``state`` is an ``XlaFullyShardedDataParallel``, FSDP
    if one is sharded (FSDP1 or FSDP2), XLA once torch_xla is imported, else DDP in a process
    group of more than one rank, else single device.

    Raises:
        TypeError: ``strategy`` is neither a name nor a ``Strategy``.
        ValueError: an unknown name.
        ModuleNotFoundError: ``"xla"`` / ``"xla_fsdp"`` without torch_xla (names the extra).
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
    if strategy == "xla":
        return XLAStrategy(checkpoint_io)
    if strategy == "xla_fsdp":
        return XLAFSDPStrategy(checkpoint_io)
    if strategy == "ddp":
        return DDPStrategy(checkpoint_io)
    if strategy == "fsdp":
        return FSDPStrategy(checkpoint_io)
    return SingleDeviceStrategy(checkpoint_io)
