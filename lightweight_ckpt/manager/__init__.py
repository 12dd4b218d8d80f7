"""``CheckpointManager``: when to save, what to keep, and where to resume, on top of ``Fabric``.

One manager owns one directory (a local path or any fsspec URL). In it:

- checkpoints ``<filename>.ckpt``, written by ``fabric.save`` (atomic, sync or async);
- ``checkpoints.json``, the manifest: every *committed* checkpoint (``path`` relative to the
  directory, ``seq``, ``step``, ``epoch``, ``metrics``, ``time``, ``damaged``) and the names
  whose deletion is under way (``deleting``);
- ``latest``, a pointer file naming the newest committed checkpoint: the symlink of Lightning
  and Composer, for filesystems that have none (object stores).

Both small files are written with ``storage.staged_write`` (whole or not at all) and only after
the checkpoint they name is durable. The life of one checkpoint, in order:

1. *saved*: ``fabric.save`` returned (with ``AsyncCheckpointIO`` the write may still run);
2. *committed*: durable. Async saves are checked without blocking at every ``maybe_save`` /
   ``save`` call (the IO's ``pending`` count: one writer, first in first out; then the file
   must exist, as a failed write is not pending either) and made sure of at ``wait()`` /
   ``close()``, so the training loop never waits for the manifest;
3. *recorded*: the manifest, then the pointer, name it;
4. older checkpoints that no rule keeps move to ``deleting`` in that same manifest write and are
   removed by a background thread; the next manifest write forgets them. A run killed anywhere
   in between leaves every recorded checkpoint loadable; leftovers of ``deleting`` are removed by
   the next run.

Retention is computed from the manifest, so it survives restarts: ``save_top_k`` best by
``monitor``, ``keep_last_k`` newest, the newest one (``save_last``), and, for the whole run, the
checkpoint ``resume`` restored. The best is never deleted; neither is a checkpoint that is not
yet committed, nor one found damaged (it stays for inspection, marked in the manifest).

``resume(state)`` tries the newest recorded checkpoint through ``fabric.load``; one that is
missing or damaged is logged (WARNING, naming it), marked, and the next newest is tried.

Every rank calls every method (``fabric.save``/``load`` are collectives). Rank 0 decides when to
save (its clock and metrics win), writes the manifest and the pointer, and deletes.
Subclasses may override ``on_checkpoint_event`` to observe each stage (logging, tests).

Where each part lives:

- ``core``: ``CheckpointManager``, the public class; it wires the parts below together.
- ``policy`` (pure): ``CheckpointRecord``, ``SaveSchedule``, ``RetentionPolicy`` and the
  retention and file-name rules.
- ``checks`` (pure): the checks of what the user passes (arguments, hparams, metrics, state).
- ``manifest``: ``Manifest``, the records in memory and the manifest and pointer files.
- ``recorder``: ``Recorder``, a save's life from ``fabric.save`` to recorded, and the deletion
  thread.
- ``resume``: trying the recorded checkpoints newest first; ``ResumeResult``.
- ``orphans``: leftovers of killed saves (temp files, unreferenced sharded versions), found by
  age; ``CheckpointManager.remove_orphans`` and the ``gc`` command use it.
"""

from lightweight_ckpt.manager.checks import check_plain, plain_metrics
from lightweight_ckpt.manager.core import CheckpointManager
from lightweight_ckpt.manager.manifest import MANIFEST_NAME, POINTER_NAME
from lightweight_ckpt.manager.orphans import Orphan, find_orphans, remove_orphans
from lightweight_ckpt.manager.policy import (
    METADATA_KEY,
    SUFFIX,
    CheckpointRecord,
    RetentionPolicy,
    SaveSchedule,
    default_template,
    expand_template,
    format_name,
    rank_by_score,
    select_kept,
    template_fields,
)
from lightweight_ckpt.manager.recorder import CheckpointEvent
from lightweight_ckpt.manager.resume import ResumeResult

__all__ = [
    "MANIFEST_NAME",
    "METADATA_KEY",
    "POINTER_NAME",
    "SUFFIX",
    "CheckpointEvent",
    "CheckpointManager",
    "CheckpointRecord",
    "Orphan",
    "ResumeResult",
    "RetentionPolicy",
    "SaveSchedule",
    "check_plain",
    "default_template",
    "expand_template",
    "find_orphans",
    "format_name",
    "plain_metrics",
    "rank_by_score",
    "remove_orphans",
    "select_kept",
    "template_fields",
]
