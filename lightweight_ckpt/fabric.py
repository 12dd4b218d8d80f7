"""``Fabric``: the user-facing facade. Validates arguments, picks the strategy, delegates.

It knows no files and no ranks: the ``Strategy`` decides who writes and reads, the
``CheckpointIO`` how, ``storage`` where. Argument errors are raised here, before any collective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightweight_ckpt.io import CheckpointIO
from lightweight_ckpt.state import LoadReport, is_stateful
from lightweight_ckpt.strategies import Strategy, select_strategy
from lightweight_ckpt.strategies.selection import auto_strategy_name

if TYPE_CHECKING:
    from lightweight_ckpt.io.base import SaveHandle
    from lightweight_ckpt.types import FilterMap, State, StorageOptions, StrPath


def _check_path(path: object) -> None:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")


def _check_state(state: object, argument: str = "state") -> None:
    if not isinstance(state, dict):
        raise TypeError(f"{argument} must be a dict of objects, got {type(state).__name__}")


def check_filter(state: State, filter: object) -> None:  # noqa: A002 - Lightning's name
    """Validate a save ``filter`` against ``state``.

    Raises:
        TypeError: ``filter`` is not a dict, a value is not callable, or it targets a value that
            is not a module, optimizer, stateful object or dict.
        ValueError: ``filter`` names keys that are not in ``state`` (all of them are listed).
    """
    if not isinstance(filter, Mapping):
        raise TypeError(
            f"filter must be a dict of {{state key: callable(name, value) -> bool}}, "
            f"got {type(filter).__name__}"
        )
    unknown = sorted(str(key) for key in filter if key not in state)
    if unknown:
        raise ValueError(f"filter names keys {unknown} that are not in state {sorted(state)}")
    for key, keep in filter.items():
        if not callable(keep):
            raise TypeError(f"filter[{key!r}] must be callable(name, value) -> bool, got {keep!r}")
        if not (is_stateful(state[key]) or isinstance(state[key], Mapping)):
            raise TypeError(
                f"filter[{key!r}] applies to state dicts, but state[{key!r}] is a "
                f"{type(state[key]).__name__}"
            )


class Fabric:
    """Save and load training state with the Lightning Fabric checkpoint API.

    Args:
        strategy: ``"auto"``, ``"single_device"`` or a ``Strategy`` instance.
        checkpoint_io: the IO plugin for every read and write (default ``TorchCheckpointIO``).

    Example:
        >>> fabric = Fabric()
        >>> fabric.save("run/last.ckpt", {"model": model, "optimizer": optimizer, "step": 7})
        >>> remainder = fabric.load("run/last.ckpt", {"model": model, "optimizer": optimizer})
    """

    def __init__(
        self, strategy: str | Strategy = "auto", checkpoint_io: CheckpointIO | None = None
    ) -> None:
        if checkpoint_io is not None and not isinstance(checkpoint_io, CheckpointIO):
            raise TypeError(
                f"checkpoint_io must be a CheckpointIO, got {type(checkpoint_io).__name__}"
            )
        self._auto = strategy == "auto"
        self._strategy = select_strategy(strategy, checkpoint_io)
        self.last_load_report: LoadReport | None = None
        """What the last ``load``/``load_raw`` restored and skipped, per state entry."""

    def _strategy_for(self, state: State | None) -> Strategy:
        """With ``"auto"``, switch to the strategy ``state`` needs (FSDP for sharded modules)."""
        if self._auto and state:
            wanted = auto_strategy_name(state)
            if type(self._strategy) is not type(select_strategy(wanted, None)):
                self._strategy = select_strategy(wanted, self._strategy.checkpoint_io)
        return self._strategy

    @property
    def strategy(self) -> Strategy:
        """The strategy that writes and reads checkpoints."""
        return self._strategy

    @property
    def global_rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return self._strategy.global_rank

    @property
    def world_size(self) -> int:
        """The number of processes (1 without a process group)."""
        return self._strategy.world_size

    @property
    def is_global_zero(self) -> bool:
        """True on rank 0."""
        return self._strategy.is_global_zero

    def barrier(self) -> None:
        """Wait until every process reaches this call."""
        self._strategy.barrier()

    def wait(self) -> None:
        """Block until every checkpoint saved so far is durable (with ``AsyncCheckpointIO``).

        Raises:
            CheckpointError: a background save failed.
        """
        self._strategy.wait()

    def teardown(self) -> None:
        """Wait for pending saves and release the IO plugin (threads); raise their failure."""
        self._strategy.teardown()

    def save(
        self,
        path: StrPath,
        state: State,
        filter: FilterMap | None = None,  # noqa: A002 - Lightning's name
        *,
        storage_options: StorageOptions | None = None,
    ) -> SaveHandle:
        """Save ``state`` to ``path`` atomically. Call it on every rank.

        Modules (wrapped or not), optimizers and objects with ``state_dict()`` are saved as their
        state dicts; other values as they are.

        Args:
            path: a local path or fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).
            state: ``{"model": model, "optimizer": optimizer, "step": 7, ...}``.
            filter: ``{state key: callable(name, value) -> bool}`` keeping items of that key's
                state dict.
            storage_options: fsspec options for this path (endpoint, credentials, ...).

        Returns:
            A ``SaveHandle`` for this save: ``wait(timeout=None)``, ``done()``,
            ``is_durable``, ``exception()``, ``path``. Complete at once for a synchronous IO;
            with ``AsyncCheckpointIO`` it tracks this save's background write on this process.

        Raises:
            TypeError: bad ``path``, ``state`` or ``filter`` types.
            ValueError: ``filter`` names keys not in ``state``.
            CheckpointWriteError: the write failed; the previous checkpoint is intact (with
                ``AsyncCheckpointIO``: an earlier background save failed).
        """
        _check_path(path)
        _check_state(state)
        if filter is not None:
            check_filter(state, filter)
        strategy = self._strategy_for(state)
        with strategy.checkpoint_io.track_save(os.fspath(path)) as handle:
            strategy.save(path, state, filter, storage_options)
        return handle

    def load(
        self,
        path: StrPath,
        state: State | None = None,
        strict: bool = True,
        *,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from ``path`` and return what it did not ask for.

        Without ``state``, return the whole checkpoint dict. Nothing in ``state`` changes unless
        every entry can be restored. ``last_load_report`` tells what was skipped.

        Args:
            path: a local path or fsspec URL.
            state: objects to restore in place; plain values in it are replaced.
            strict: require every key of ``state`` (and of each module) to match.
            weights_only: refuse arbitrary pickled objects (default True).
            storage_options: fsspec options for this path.

        Raises:
            CheckpointNotFoundError: nothing at ``path``.
            InvalidCheckpointError: not a checkpoint (``CorruptCheckpointError`` if damaged,
                ``UnsafeCheckpointError`` if it needs ``weights_only=False``).
            MissingKeysError: ``strict`` and keys of ``state`` are missing (all listed).
            StateMismatchError: an entry does not fit its object (keys, shapes, structure).
        """
        _check_path(path)
        if state is not None:
            _check_state(state)
        result, self.last_load_report = self._strategy_for(state).load(
            path, state, strict, weights_only, storage_options
        )
        return result  # type: ignore[no-any-return]

    def load_raw(
        self,
        path: StrPath,
        obj: nn.Module | torch.optim.Optimizer,
        strict: bool = True,
        *,
        weights_only: bool | None = None,
        storage_options: StorageOptions | None = None,
    ) -> LoadReport:
        """Load a plain state-dict file (``torch.save(model.state_dict(), path)``) into ``obj``.

        Returns:
            The load report (also kept in ``last_load_report``).
        """
        _check_path(path)
        if not isinstance(obj, nn.Module | torch.optim.Optimizer):
            raise TypeError(f"obj must be a Module or an Optimizer, got {type(obj).__name__}")
        report = self._strategy_for({"obj": obj}).load_raw(
            path, obj, strict, weights_only, storage_options
        )
        self.last_load_report = report
        return report
