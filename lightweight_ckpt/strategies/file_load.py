"""Loading one checkpoint file into a state, in two steps every rank agrees on.

(1) ``open_file``, on every rank: open a staged reader (or take the copy ``read_shared`` handed
to this rank) → ``plan_restore`` (checks everything, changes nothing) → ``verify`` (CRC32, fill
the reader's own tensors). (2) Only when every rank passed (1): ``restore_file`` runs
``steps.restore`` (user objects and values; then the fill into the targets; then the module and
optimizer setters, each an agreed step). A damaged file or a mismatched state on one rank
therefore changes no rank's state. ``Strategy._load_file`` runs the two steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.errors import InvalidCheckpointError
from lightweight_ckpt.state import RAW_KEY, LoadReport, RestorePlan, plan_restore
from lightweight_ckpt.strategies import steps

if TYPE_CHECKING:
    from lightweight_ckpt.io import CheckpointReader
    from lightweight_ckpt.strategies.base import Strategy
    from lightweight_ckpt.types import State, StorageOptions, StrPath


@dataclass
class OpenFile:
    """A checkpoint file that is checked and verified on this rank; nothing restored yet."""

    reader: CheckpointReader
    checkpoint: Any
    plan: RestorePlan | None
    accepted: set[int]

    def close(self) -> None:
        """Release the reader (another rank failed: nothing is restored)."""
        self.reader.close()


def open_file(
    strategy: Strategy,
    path: StrPath,
    state: State | None,
    *,
    strict: bool,
    weights_only: bool | None,
    storage_options: StorageOptions | None,
    raw: bool,
    shared: CheckpointReader | None = None,
    views: steps.StateViews | None = None,
) -> OpenFile:
    """Open, plan and verify one file on this rank; change nothing the caller owns.

    ``shared``: the file as ``read_shared`` handed it to this rank (then nothing is read).
    With ``raw``, the file is one state dict for ``state[RAW_KEY]``.
    """
    reader = (
        shared
        if shared is not None
        else strategy.checkpoint_io.open_checkpoint(
            path,
            map_location=strategy.map_location,
            weights_only=weights_only,
            storage_options=storage_options,
        )
    )
    try:
        return _check_file(strategy, reader, path, state, strict, raw=raw, views=views)
    except BaseException:
        reader.close()
        raise


def _check_file(
    strategy: Strategy,
    reader: CheckpointReader,
    path: StrPath,
    state: State | None,
    strict: bool,
    *,
    raw: bool,
    views: steps.StateViews | None = None,
) -> OpenFile:
    checkpoint = reader.skeleton()
    if not state:
        return OpenFile(reader, checkpoint, None, reader.verify({}))
    if not isinstance(checkpoint, dict):
        hint = "" if raw else " Use load_raw() for a file of one state dict."
        raise InvalidCheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, not a dict.{hint}"
        )
    views = views or steps.StateViews(strategy, state)
    plan = plan_restore(
        str(path),
        state,
        {RAW_KEY: checkpoint} if raw else checkpoint,
        strict,
        target_of=views.target,
        group_sizes=views.group_sizes,
    )
    accepted = reader.verify({id(b.source): b.target for b in plan.bindings})
    return OpenFile(reader, checkpoint, plan, accepted)


def restore_file(strategy: Strategy, opened: OpenFile) -> tuple[Any, LoadReport | None]:
    """Restore what ``open_file`` checked (every rank passed it) and close the reader.

    With a plan, runs on every rank (``steps.restore``: agreed steps).
    """
    with opened.reader as reader:
        if opened.plan is None:
            reader.fill()
            return opened.checkpoint, None
        remainder = steps.restore(strategy, opened.plan, accepted=opened.accepted, fill=reader.fill)
    return remainder, opened.plan.report
