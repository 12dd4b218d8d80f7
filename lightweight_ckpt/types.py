"""Type aliases and protocols shared by every layer.

Nothing here imports from the rest of the package; every other module may import from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

import torch

if TYPE_CHECKING:
    import os

StrPath: TypeAlias = "str | os.PathLike[str]"
"""A local path or any fsspec URL (``s3://bucket/last.ckpt``). Kept as ``str``, never ``Path``."""

StateDict: TypeAlias = dict[str, Any]
"""A plain mapping of names to tensors and values, as ``Module.state_dict()`` returns."""

State: TypeAlias = dict[str, Any]
"""The user's dict of objects: modules, optimizers, stateful objects and plain values."""

Checkpoint: TypeAlias = dict[str, Any]
"""The dict that is written or read: ``State`` with stateful objects turned into state dicts."""

KeepFn: TypeAlias = Callable[[str, Any], bool]
"""A save filter: ``keep(name, value)`` returns True to keep an item of a state dict."""

FilterMap: TypeAlias = Mapping[str, KeepFn]
"""``{state_key: keep}``, applied to that key's state dict items on save."""

MapLocation: TypeAlias = "str | torch.device | Mapping[str, str] | Callable[[Any, str], Any] | None"
"""Where loaded tensors go, with ``torch.load``'s meaning. ``None`` means the CPU."""

StorageOptions: TypeAlias = Mapping[str, Any]
"""Keyword arguments for the fsspec filesystem (endpoint, credentials, ...)."""


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: schedulers, scalers, samplers."""

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Restore the object's state in place."""


__all__ = [
    "Checkpoint",
    "FilterMap",
    "KeepFn",
    "MapLocation",
    "State",
    "StateDict",
    "Stateful",
    "StorageOptions",
    "StrPath",
    "torch",
]
