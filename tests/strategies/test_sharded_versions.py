"""Replaced version folders are removed off the save's critical path, or reused, safely.

After a sharded save commits, rank 0 removes the version folders it replaced on a background
thread (local disk). The save returns without waiting; the next operation on the same path
waits for the removal; a process killed mid-removal leaves only orphans that ``gc`` finds.
The removal is held by a gate on its unlink step (the one seam used here); files, saves, loads
and the SIGKILL are real.

Spares: the version a commit replaced is kept, and the save after next overwrites its pieces in
place; never while a reader holds one, never a committed version, one version at rest after
teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lightweight_ckpt import CheckpointError, CheckpointReadError, Fabric
from lightweight_ckpt.formats import dcp_checksums, dcp_versions
from lightweight_ckpt.manager.orphans import find_orphans, remove_orphans
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import assert_states_equal
from tests.strategies.test_sharded_faults import (
    _save_sharded,
    assert_commit_complete,
    plain_copy,
    versions,
)

REPO = Path(__file__).resolve().parents[2]


class _Gate:
    """Holds every unlink of the background removal until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.real = dcp_versions._unlink

    def __call__(self, path: str) -> None:
        self.entered.set()
        self.opened.wait(120)
        self.real(path)


def _held_overwrite(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[_Gate, str, Any]:
    """Save twice; the second save's removal of the first version is held at the gate.

    Spares are off: the first version is removed instead of kept for the next save to reuse.
    """
    monkeypatch.setattr(dcp_versions, "REUSE_SPARES", False)
    _save_sharded(path)
    (first,) = versions(path)
    gate = _Gate()
    monkeypatch.setattr(dcp_versions, "_unlink", gate)
    expected = _save_sharded(path, seed=3)  # returns although the removal is held
    assert gate.entered.wait(60), "the replaced version was not being removed"
    assert first in versions(path)  # still there: its removal waits at the gate
    folder = assert_commit_complete(path)  # ...but the new version is committed
    assert folder != first
    return gate, folder, expected


def _blocked(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn`` in a thread; return it once it has had a second to finish."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(1.0)
    return thread, outcome


def test_save_returns_before_the_replaced_version_is_removed_and_a_load_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sharded"
    gate, folder, expected = _held_overwrite(path, monkeypatch)
    model = plain_copy(expected)

    loader, outcome = _blocked(lambda: Fabric().load(path, {"model": model}))
    assert loader.is_alive(), f"the load did not wait for the removal: {outcome}"
    gate.opened.set()
    loader.join(60)
    assert not loader.is_alive()
    assert "error" not in outcome, outcome
    assert versions(path) == [folder]  # the load ran after the removal had finished
    assert_states_equal(model, expected)


def test_the_next_save_on_the_path_waits_for_the_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sharded"
    gate, folder, expected = _held_overwrite(path, monkeypatch)
    model = plain_copy(expected)
    fabric = Fabric(strategy=FSDPStrategy())

    saver, outcome = _blocked(lambda: fabric.save(path, {"model": model, "step": 3}))
    assert saver.is_alive(), f"the next save did not wait for the removal: {outcome}"
    assert len(versions(path)) == 2  # no third version folder before the removal finished
    gate.opened.set()
    saver.join(60)
    assert "error" not in outcome, outcome
    fabric.wait()  # this save's own removal (of ``folder``)
    third = assert_commit_complete(path)
    assert versions(path) == [third]
    assert third != folder
    assert Fabric().load(path)["step"] == 3


def test_wait_returns_after_the_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sharded"
    gate, folder, _ = _held_overwrite(path, monkeypatch)
    waiter, _ = _blocked(Fabric().wait)
    assert waiter.is_alive()
    gate.opened.set()
    waiter.join(60)
    assert versions(path) == [folder]


_KILLED_MID_REMOVAL = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from lightweight_ckpt import CheckpointError, CheckpointReadError, Fabric
    from lightweight_ckpt.formats import dcp_checksums, dcp_versions
    from lightweight_ckpt.strategies import FSDPStrategy

    path = sys.argv[1]
    dcp_versions.REUSE_SPARES = False  # the replaced version is removed, not kept as a spare
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(path, {"model": model, "step": 1})
    unlinked = []
    real = dcp_versions._unlink

    def unlink_then_die(file):
        if unlinked:  # one file of the replaced version is gone: die mid-removal
            os.kill(os.getpid(), signal.SIGKILL)
        real(file)
        unlinked.append(file)

    dcp_versions._unlink = unlink_then_die
    dcp_versions.settings = lambda: type("S", (), {"io_threads": 1})()  # one file at a time
    with torch.no_grad():
        model.weight.add_(1.0)
    fabric.save(path, {"model": model, "step": 2})
    torch.save(model.state_dict(), os.path.join(os.path.dirname(path), "expected.pt"))
    print("saved", flush=True)
    # leaving the interpreter finishes the queued removal, which dies half-way
    """
)


def test_a_process_killed_mid_removal_leaves_only_orphans_gc_finds(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_REMOVAL, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "saved" in proc.stdout
    folder = assert_commit_complete(path)
    (stale,) = [name for name in versions(path) if name != folder]
    assert os.listdir(path / stale)  # half removed: some of its files are left

    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    model = torch.nn.Linear(8, 8)
    state: dict[str, Any] = {"model": model, "step": 0}
    Fabric().load(path, state)
    assert_states_equal(model, expected)
    assert state["step"] == 2

    orphans = find_orphans(str(path), older_than_s=0)
    assert [(o.kind, os.path.basename(o.path)) for o in orphans] == [("stale version", stale)]
    remove_orphans(orphans)
    assert versions(path) == [folder]


# -- spares: the version two saves back is overwritten in place ------------------------------------


def _pieces(folder: Path) -> dict[str, int]:
    return {piece.name: piece.stat().st_ino for piece in folder.glob("*.distcp")}


def _save_linear(fabric: Fabric, path: Path, seed: int, features: int = 8) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(features, features)
    fabric.save(path, {"model": model, "step": seed})
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _load_linear(path: Path, features: int = 8) -> tuple[dict[str, Any], int]:
    torch.manual_seed(1234)
    model = torch.nn.Linear(features, features)
    state: dict[str, Any] = {"model": model, "step": -1}
    Fabric().load(path, state)
    return model.state_dict(), state["step"]


def test_the_third_save_overwrites_the_first_versions_pieces_in_place(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    fabric = Fabric(strategy=FSDPStrategy())
    _save_linear(fabric, path, seed=1, features=64)
    (first,) = versions(path)
    first_pieces = _pieces(path / first)
    _save_linear(fabric, path, seed=2, features=64)
    second = assert_commit_complete(path)
    assert versions(path) == sorted([first, second])  # the replaced first version is the spare

    expected = _save_linear(fabric, path, seed=3, features=8)  # a much smaller piece
    third = assert_commit_complete(path)
    assert _pieces(path / third) == first_pieces  # the same files, written over
    fabric.wait()  # the first version's leftovers (its records) go in the background
    assert versions(path) == sorted([second, third])  # the first's leftovers are gone
    loaded, step = _load_linear(path)  # the piece was cut to its new size: checksums pass
    assert_states_equal(loaded, expected)
    assert step == 3

    fabric.teardown()  # the spare goes: one version at rest
    assert versions(path) == [third]
    assert_states_equal(_load_linear(path)[0], expected)


def test_a_piece_being_read_is_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    fabric = Fabric(strategy=FSDPStrategy())
    first_state = _save_linear(fabric, path, seed=1)
    (first,) = versions(path)
    (piece,) = (path / first).glob("*.distcp")
    # a reader of the first version (another process, say) still holds its piece
    reader = dcp_versions.pin_piece(str(piece), str(path))
    try:
        content = piece.read_bytes()
        _save_linear(fabric, path, seed=2)
        expected = _save_linear(fabric, path, seed=3)
        third = assert_commit_complete(path)
        # not taken: the save wrote a fresh file (the old one is unlinked with its folder)
        assert (path / third / piece.name).stat().st_ino != os.fstat(reader).st_ino
        assert os.pread(reader, len(content) + 1, 0) == content  # the reader's bytes unchanged
    finally:
        os.close(reader)
    assert_states_equal(_load_linear(path)[0], expected)
    assert not states_equal_dicts(expected, first_state)
    fabric.teardown()


def states_equal_dicts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_a_reader_whose_piece_was_reused_raises_instead_of_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    fabric = Fabric(strategy=FSDPStrategy())
    _save_linear(fabric, path, seed=1)
    (first,) = versions(path)
    (piece,) = (path / first).glob("*.distcp")
    descriptor = os.open(piece, os.O_RDONLY)  # opened before the reuse, pinned after it
    try:
        _save_linear(fabric, path, seed=2)
        _save_linear(fabric, path, seed=3)  # reuses (moves) the first version's piece
        with pytest.raises(CheckpointReadError, match="reused by a newer save"):
            dcp_versions.pin_piece(str(piece), str(path))
        assert os.fstat(descriptor).st_nlink == 1  # the file lives on, as the third's piece
    finally:
        os.close(descriptor)
    fabric.teardown()


def test_a_failed_save_leaves_the_spare_usable_and_the_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sharded"
    fabric = Fabric(strategy=FSDPStrategy())
    _save_linear(fabric, path, seed=1)
    expected = _save_linear(fabric, path, seed=2)
    committed = assert_commit_complete(path)

    def refuse(*_: Any, **__: Any) -> None:
        raise OSError("disk full (injected)")

    # the pieces are written (the spare's moved into the new folder), then the records fail
    monkeypatch.setattr(dcp_checksums, "write_records", refuse)
    with pytest.raises(CheckpointError):
        _save_linear(fabric, path, seed=3)
    monkeypatch.undo()
    assert assert_commit_complete(path) == committed
    assert_states_equal(_load_linear(path)[0], expected)

    expected = _save_linear(fabric, path, seed=4)  # the spare's piece is gone: a fresh file
    assert_states_equal(_load_linear(path)[0], expected)
    fabric.teardown()
    assert versions(path) == [assert_commit_complete(path)]
