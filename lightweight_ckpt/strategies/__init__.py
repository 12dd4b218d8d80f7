"""Strategies: who writes and reads a checkpoint, and in which layout.

``Strategy`` holds the one save/load pipeline; subclasses override hooks only.
"""

from lightweight_ckpt.strategies.base import Strategy
from lightweight_ckpt.strategies.ddp import DDPStrategy
from lightweight_ckpt.strategies.fsdp import FSDPStrategy
from lightweight_ckpt.strategies.selection import select_strategy
from lightweight_ckpt.strategies.single_device import SingleDeviceStrategy
from lightweight_ckpt.strategies.xla import XLAStrategy
from lightweight_ckpt.strategies.xla_fsdp import XLAFSDPStrategy

__all__ = [
    "DDPStrategy",
    "FSDPStrategy",
    "SingleDeviceStrategy",
    "Strategy",
    "XLAFSDPStrategy",
    "XLAStrategy",
    "select_strategy",
]
