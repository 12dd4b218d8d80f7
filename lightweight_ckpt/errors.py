"""Every exception lightweight_ckpt raises on purpose.

```
CheckpointError                         base of everything we raise on purpose
├── CheckpointNotFoundError             also FileNotFoundError
├── InvalidCheckpointError              also ValueError: not a checkpoint / unknown layout
│   ├── CorruptCheckpointError          truncated, checksum mismatch, unreadable metadata
│   └── UnsafeCheckpointError           needs weights_only=False (a pickle of arbitrary objects)
├── StateMismatchError                  also ValueError: shapes/dtypes/keys do not fit the target
├── MissingKeysError                    also KeyError: strict load, requested keys absent
├── CheckpointWriteError                also OSError: write/commit failed; previous one intact
└── CheckpointReadError                 the store could not be read (unreachable after retries,
                                        timed out, credentials refused, access denied)
```

Each error also subclasses the builtin it means, so ``except KeyError`` and friends keep working.
Messages read ``"<path>: <problem>. <remedy>"`` and list every offending key, sorted.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error lightweight_ckpt raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing (committed) exists at the path."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """The path holds something that is not a checkpoint this library can read."""


class CorruptCheckpointError(InvalidCheckpointError):
    """The checkpoint is damaged: truncated, a checksum mismatch, or unreadable metadata."""


class UnsafeCheckpointError(InvalidCheckpointError):
    """The checkpoint holds pickled objects that ``weights_only=True`` refuses to load."""


class StateMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the objects it is loaded into (keys, shapes, structure)."""


class MissingKeysError(CheckpointError, KeyError):
    """A strict load asked for keys that the checkpoint does not hold."""

    def __str__(self) -> str:
        # KeyError.__str__ quotes its argument; we want the message as written.
        return str(self.args[0]) if self.args else ""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing or committing a checkpoint failed; the previous checkpoint at the path is intact."""

    def __str__(self) -> str:
        # OSError.__str__ formats (errno, strerror) pairs; we want the message as written.
        return str(self.args[0]) if self.args else ""


class CheckpointReadError(CheckpointError):
    """Reading from storage failed (after retries, or refused for good).

    Nothing the caller owns was changed, unless the message says the failure came after
    verification, while reading into the targets (then load again). Not an ``OSError``: the
    readers translate ``OSError`` from damaged bytes into ``CorruptCheckpointError``, and a
    network failure must not read as a damaged file.
    """


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "InvalidCheckpointError",
    "MissingKeysError",
    "StateMismatchError",
    "UnsafeCheckpointError",
]
