"""``SingleDeviceStrategy``: one process writes and reads one file."""

from __future__ import annotations

from lightweight_ckpt.strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    """One process, one file, in the ``torch.load``-compatible single-file format.

    Everything is the base pipeline; this class names the layout for ``"single_device"``.
    """
