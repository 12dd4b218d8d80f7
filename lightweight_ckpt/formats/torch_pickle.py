"""Unpickling a torch checkpoint's object tree: ``weights_only`` at C speed, or any global.

``FastUnpickler`` resolves only the part of torch's own ``weights_only`` allowlist that dense
checkpoints name (``fast_globals``), with the C unpickler: torch's is pure Python and took a
quarter of a warm 1.5 GB load. Any other global raises ``OffFastPathError`` and the reader hands
the whole file to ``torch.load(weights_only=True)``, whose rules and messages then apply.
``FullUnpickler`` is ``weights_only=False``. ``unpickling_error`` turns a failure into our error.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import torch
from torch import _weights_only_unpickler

from lightweight_ckpt.errors import (
    CorruptCheckpointError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)

_REFUSAL_MARKERS = ("global", "class", "Trying to", "weights_only", "allowlist")


def unpickling_error(url: str, err: Exception, weights_only: bool) -> InvalidCheckpointError:
    """A refused type under ``weights_only`` is unsafe; anything else is damaged data."""
    message = str(err)
    if weights_only and any(marker in message for marker in _REFUSAL_MARKERS):
        return weights_only_error(url, err)
    return CorruptCheckpointError(f"{url}: the checkpoint's pickle is damaged: {message}")


def weights_only_error(url: str, err: Exception) -> UnsafeCheckpointError:
    """The error for a global that ``weights_only=True`` refuses, with how to opt in."""
    return UnsafeCheckpointError(
        f"{url}: weights_only=True refuses an object in this checkpoint ({err}). If you trust "
        "the file, pass weights_only=False (a pickle can run arbitrary code), or allow the "
        "type with torch.serialization.add_safe_globals([...])."
    )


class OffFastPathError(Exception):
    """The pickle names a global outside ``fast_globals()``: torch.load must read it."""


_FAST_NAMES = frozenset(
    {
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "torch.storage.UntypedStorage",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
    }
)


@functools.cache
def fast_globals() -> dict[str, Any]:
    """The part of torch's ``weights_only`` allowlist that plain dense checkpoints use.

    Dense tensors, parameters, storage types, dtypes and plain containers. Everything else that
    torch allows (sparse, quantized, nested and wrapper-subclass tensors, tensor subclasses,
    ``add_safe_globals`` types) is left to ``torch.load`` itself, which validates those after
    unpickling.
    """
    allowed = _weights_only_unpickler._get_allowed_globals()
    return {
        name: value
        for name, value in allowed.items()
        if name in _FAST_NAMES
        or isinstance(value, torch.dtype)
        or (name.startswith("torch.") and name.endswith("Storage") and "Q" not in name)
    }


class FastUnpickler(pickle.Unpickler):
    """``weights_only=True`` for dense checkpoints, at C speed (torch's is pure Python).

    Only globals of ``fast_globals()`` resolve, so every callable the pickle can reach is a
    tensor or storage rebuild function or a plain type, none of which return callables: the
    same power torch's own ``weights_only`` unpickler grants for these checkpoints. Any other
    global raises ``OffFastPathError`` and the whole file goes to
    ``torch.load(weights_only=True)``, which accepts or refuses it with its own rules and messages.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` from ``fast_globals()`` or leave the fast path."""
        module = "builtins" if module == "__builtin__" else module  # protocol 2 names
        found = fast_globals().get(f"{module}.{name}")
        if found is None:
            raise OffFastPathError(f"{module}.{name}")
        return found


class FullUnpickler(pickle.Unpickler):
    """``weights_only=False``: any global, with torch.load's renames for old storage classes."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve any global, renaming old storage classes and ``torch.tensor`` as torch does."""
        if "Storage" in name:
            try:
                return torch.serialization.StorageType(name)  # type: ignore[no-untyped-call]
            except KeyError:
                pass
        module = "torch._tensor" if module == "torch.tensor" else module
        return super().find_class(module, name)
