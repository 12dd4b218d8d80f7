"""Sharded checkpoints under faults: overwrites, a rank SIGKILLed mid-save, damaged directories.

A sharded checkpoint is committed by publishing ``<path>/.metadata`` last; until then the previous
one is intact, and old version folders go only after the commit. A directory with version folders
but no ``.metadata`` is "no checkpoint", an empty one is "not a checkpoint", and damaged metadata
or pieces raise ``CorruptCheckpointError`` naming the path, with nothing loaded.
Real processes, gloo on CPU, real SIGKILL, nothing mocked.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from lightweight_ckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    Fabric,
    InvalidCheckpointError,
)
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.helpers.asserts import (
    assert_states_differ,
    assert_states_equal,
    snapshot,
    states_equal,
)
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build, mlp, perturb, reference

HANG_GUARD_S = 100.0  # a survivor stuck in a collective fails after the 60 s collective timeout


def versions(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.startswith("v-"))


def committed_metadata(path: Path) -> Metadata:
    with open(path / ".metadata", "rb") as file:
        metadata = pickle.load(file)
    assert isinstance(metadata, Metadata)
    return metadata


def assert_commit_complete(path: Path) -> str:
    """``.metadata`` names pieces of one version folder that all exist in full; return it.

    No staged ``.metadata`` is left inside a version folder.
    """
    metadata = committed_metadata(path)
    assert metadata.storage_data
    folders = {info.relative_path.split("/")[0] for info in metadata.storage_data.values()}
    assert len(folders) == 1, folders
    (folder,) = folders
    assert folder in versions(path)
    for info in metadata.storage_data.values():
        piece = path / info.relative_path
        assert piece.is_file(), piece
        assert info.offset + info.length <= piece.stat().st_size, piece
    for version in versions(path):
        assert not (path / version / ".metadata").exists()
    return str(folder)


def plain_copy(expected: dict[str, torch.Tensor], seed: int = 9) -> torch.nn.Module:
    """A plain ``mlp`` whose weights differ from ``expected``."""
    model = mlp(seed)
    assert_states_differ(model, expected)
    return model


# -- overwrite ------------------------------------------------------------------------------------


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.glob("*.distcp")}


def _overwrite(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = build("fsdp2")
    fabric = Fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    fabric.barrier()
    (first,) = versions(Path(path))
    first_pieces = _inodes(Path(path) / first)
    fabric.barrier()

    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    fabric.wait()
    fabric.barrier()
    second = versions(Path(path))  # the replaced first version is kept as the spare
    assert len(second) == 2
    assert first in second
    assert assert_commit_complete(Path(path)) != first
    fabric.barrier()

    perturb(model, optimizer)
    expected = reference("fsdp2", model, optimizer)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    fabric.wait()
    fabric.barrier()
    third = assert_commit_complete(Path(path))
    assert first not in versions(Path(path))  # its pieces now belong to the third version
    assert _inodes(Path(path) / third) == first_pieces  # overwritten in place, not allocated
    assert len(versions(Path(path))) == 2  # the second version is the next spare
    if rank == 0:
        torch.save(expected["model"], os.path.join(directory, "expected.pt"))
    model, optimizer = build("fsdp2", seed=5, steps=1)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)
    assert state["step"] == 3
    assert_states_equal(reference("fsdp2", model, optimizer), expected)
    fabric.barrier()


@pytest.mark.distributed
def test_overwrite_keeps_one_version(tmp_path: Path) -> None:
    run_distributed(_overwrite, 2, tmp_path, args=(str(tmp_path),))
    path = tmp_path / "sharded"
    folder = assert_commit_complete(path)
    assert versions(path) == [folder]
    assert sorted(os.listdir(path / folder)) == [
        "__0_0.distcp",
        "__0_0.distcp.crc32",
        "__1_0.distcp",
        "__1_0.distcp.crc32",
    ]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    model = plain_copy(expected)
    Fabric().load(path, {"model": model})
    assert_states_equal(model, expected)


def test_overwrite_in_one_process_warns_nothing(tmp_path: Path) -> None:
    # versioned folders make overwriting safe; DCP's "Detected an existing checkpoint ...
    # overwriting" warning is wrong here, and under -W error it fails the save
    path = tmp_path / "sharded"
    _save_sharded(path)
    expected = _save_sharded(path, seed=3)  # filterwarnings=error: any warning fails this
    Fabric().teardown()  # the replaced version, kept as a spare until now, is removed
    folder = assert_commit_complete(path)
    assert versions(path) == [folder]
    model = plain_copy(expected)
    Fabric().load(path, {"model": model})
    assert_states_equal(model, expected)


# -- a rank SIGKILLed during a sharded save ------------------------------------------------------


class _DieOnSecondSave(TorchCheckpointIO):
    """SIGKILLs rank ``victim`` in ``hook`` of the second sharded save (no cleanup can run)."""

    def __init__(self, hook: str, victim: int) -> None:
        super().__init__()
        self.hook = hook
        self.victim = victim
        self.saves = 0

    def _maybe_die(self, hook: str) -> None:
        if hook == self.hook and self.saves == 2 and dist.get_rank() == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)

    def prepare_sharded(self, path: Any, version: str, storage_options: Any = None) -> None:
        self.saves += 1
        super().prepare_sharded(path, version, storage_options)

    def save_sharded(
        self, checkpoint: Any, path: Any, version: str, storage_options: Any = None
    ) -> None:
        self._maybe_die("save_sharded")  # before any piece of this rank is written
        super().save_sharded(checkpoint, path, version, storage_options)

    def finish_sharded(self, path: Any, version: str, storage_options: Any = None) -> None:
        self._maybe_die("finish_sharded")  # after the commit, before old versions are removed
        super().finish_sharded(path, version, storage_options)


def _killed_during_save(rank: int, world_size: int, directory: str, hook: str, victim: int) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = build("fsdp2")
    fabric = Fabric(strategy=FSDPStrategy(checkpoint_io=_DieOnSecondSave(hook, victim)))
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    first = reference("fsdp2", model, optimizer)["model"]
    perturb(model, optimizer)
    second = reference("fsdp2", model, optimizer)["model"]
    if rank == 0:
        states = {"first": first, "second": second}
        torch.save(states, os.path.join(directory, "expected.pt"))
    fabric.barrier()
    # the victim dies in here; a survivor raises, times out, or (after the commit) returns
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("hook", "victim", "survivor"),
    [
        ("save_sharded", 1, "first"),  # a writer dies before its piece: previous checkpoint
        ("save_sharded", 0, "first"),  # the committer dies before its piece: previous checkpoint
        ("finish_sharded", 0, "second"),  # the committer dies after the commit: the new one
    ],
)
def test_rank_killed_during_sharded_save(
    tmp_path: Path, hook: str, victim: int, survivor: str
) -> None:
    with pytest.raises(AssertionError, match=r"rank|exited|hung"):
        run_distributed(
            _killed_during_save,
            2,
            tmp_path,
            args=(str(tmp_path), hook, victim),
            timeout_s=HANG_GUARD_S,
        )
    path = tmp_path / "sharded"
    assert_commit_complete(path)
    states = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert_states_differ(states["first"], states["second"])
    model = plain_copy(states[survivor])
    state: dict[str, Any] = {"model": model, "step": 0}
    Fabric().load(path, state)
    assert_states_equal(model, states[survivor])
    assert state["step"] == (1 if survivor == "first" else 2)

    # the next save commits and removes every other version folder, the abandoned one included
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(path, {"model": model, "step": 3})
    fabric.wait()  # the replaced versions are removed in the background
    folder = assert_commit_complete(path)
    assert versions(path) == [folder]
    assert Fabric().load(path)["step"] == 3


class _DieWhileWritingPiece(TorchCheckpointIO):
    """SIGKILLs rank 1 during the second sharded save, once its piece file holds bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def save_sharded(
        self, checkpoint: Any, path: Any, version: str, storage_options: Any = None
    ) -> None:
        self.saves += 1
        if self.saves == 2 and dist.get_rank() == 1:
            piece = Path(path) / version / "__1_0.distcp"
            threading.Thread(target=_kill_once_written, args=(piece,), daemon=True).start()
        super().save_sharded(checkpoint, path, version, storage_options)


def _kill_once_written(piece: Path) -> None:
    while True:
        with contextlib.suppress(FileNotFoundError):
            if piece.stat().st_size > 0:
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)


def _wide_fsdp2() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One FSDP2 ``Linear(2048, 2048)`` + AdamW after a step: a piece of ~24 MB per rank."""
    from lightweight_ckpt.compat import fully_shard

    torch.manual_seed(0)
    model = fully_shard(torch.nn.Linear(2048, 2048))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()
    return model, optimizer


def _killed_mid_piece(rank: int, world_size: int, directory: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from tests.strategies.test_matrix import FULL

    path = os.path.join(directory, "sharded")
    model, optimizer = _wide_fsdp2()
    fabric = Fabric(strategy=FSDPStrategy(checkpoint_io=_DieWhileWritingPiece()))
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    first = get_model_state_dict(model, options=FULL)
    if rank == 0:
        torch.save(first, os.path.join(directory, "first.pt"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    fabric.barrier()
    try:  # rank 1 dies writing its piece; rank 0 must raise (never return, never hang)
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    except Exception as err:  # noqa: BLE001 - whatever it is, it is recorded for the test
        Path(directory, f"raised-{rank}").write_text(f"{type(err).__name__}: {err}")
        os._exit(0)  # the group has lost a rank: leave without tearing it down
    Path(directory, f"returned-{rank}").write_text("")


@pytest.mark.distributed
def test_rank_killed_while_writing_its_piece(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"exited with codes \[0, -9\]"):
        run_distributed(
            _killed_mid_piece, 2, tmp_path, args=(str(tmp_path),), timeout_s=HANG_GUARD_S
        )
    assert (tmp_path / "raised-0").exists()  # the survivor raised
    assert not list(tmp_path.glob("returned-*"))
    path = tmp_path / "sharded"
    committed = assert_commit_complete(path)
    abandoned = [v for v in versions(path) if v != committed]
    assert len(abandoned) == 1
    assert (path / abandoned[0] / "__1_0.distcp").stat().st_size > 0  # killed mid-piece
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    model = torch.nn.Linear(2048, 2048)
    assert_states_differ(model, first)
    state: dict[str, Any] = {"model": model, "step": 0}
    Fabric().load(path, state)  # the previous checkpoint, whole
    assert state["step"] == 1
    assert_states_equal(model, first)


# -- damaged directories (one process, no process group) -----------------------------------------


def _save_sharded(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A sharded checkpoint of a plain model written in this process; return its weights."""
    model, optimizer = build("plain", seed=seed, arch="mlp")
    Fabric(strategy=FSDPStrategy()).save(path, {"model": model, "optimizer": optimizer, "step": 1})
    return snapshot(model)


def _refusal_problems(error: BaseException | None, error_type: type, path: Path) -> list[str]:
    if not isinstance(error, error_type):
        return [f"raised {error!r:.300}, not {error_type.__name__}"]
    if str(path) not in str(error):
        return [f"the message does not name {path}: {error}"]
    return []


def _assert_load_refused(path: Path, error_type: type[CheckpointError], expected: Any) -> None:
    """Both load forms raise ``error_type`` naming ``path``; the model is left untouched."""
    model = plain_copy(expected) if expected is not None else mlp(9)
    before = snapshot(model)
    problems = []
    for state in ({"model": model}, None):
        error: BaseException | None = None
        try:
            Fabric().load(path, state)
        except BaseException as err:  # noqa: BLE001 - DCP raises BaseException subclasses
            error = err
        form = "load(path, state)" if state else "load(path)"
        problems += [f"{form}: {problem}" for problem in _refusal_problems(error, error_type, path)]
    if not states_equal(model, before):
        changed = [k for k, v in model.state_dict().items() if not states_equal(v, before[k])]
        problems.append(f"load(path, state) changed the model although it failed: {changed}")
    assert not problems, "\n".join(problems)


def test_version_folders_without_metadata_are_not_found(tmp_path: Path) -> None:
    # a checkpoint whose commit never happened: pieces in a version folder, no .metadata
    path = tmp_path / "uncommitted"
    expected = _save_sharded(path)
    (path / ".metadata").unlink()
    assert versions(path)
    _assert_load_refused(path, CheckpointNotFoundError, expected)
    with pytest.raises(FileNotFoundError):
        Fabric().load(path)
    # a save that died before writing anything: an empty version folder
    bare = tmp_path / "bare"
    (bare / "v-0123456789ab").mkdir(parents=True)
    _assert_load_refused(bare, CheckpointNotFoundError, None)


def test_empty_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    _assert_load_refused(path, InvalidCheckpointError, None)
    with pytest.raises(InvalidCheckpointError) as info:
        Fabric().load(path)
    assert not isinstance(info.value, CheckpointNotFoundError | CorruptCheckpointError)


def _damage_metadata(data: bytes, how: str) -> bytes:
    if how == "garbage":
        return bytes(range(256)) * 4
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "last-byte-cut":
        return data[:-1]
    if how == "empty":
        return b""
    assert how == "other-pickle"
    return pickle.dumps({"not": "metadata"})


@pytest.mark.parametrize("how", ["garbage", "truncated", "last-byte-cut", "empty", "other-pickle"])
def test_corrupted_metadata(tmp_path: Path, how: str) -> None:
    path = tmp_path / "sharded"
    expected = _save_sharded(path)
    metadata = path / ".metadata"
    metadata.write_bytes(_damage_metadata(metadata.read_bytes(), how))
    _assert_load_refused(path, CorruptCheckpointError, expected)


class _MakesDirectoryWhenUnpickled:
    """A pickle payload: unpickling it calls ``os.makedirs(marker)``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (self.marker,))


def test_metadata_cannot_run_code_on_load(tmp_path: Path) -> None:
    # weights_only is on by default: a .metadata holding a pickled call must not run it
    path = tmp_path / "sharded"
    expected = _save_sharded(path)
    marker = tmp_path / "code-ran"
    (path / ".metadata").write_bytes(pickle.dumps(_MakesDirectoryWhenUnpickled(str(marker))))
    model = plain_copy(expected)
    before = snapshot(model)
    with pytest.raises(InvalidCheckpointError):
        Fabric().load(path, {"model": model})
    assert not marker.exists(), "loading the checkpoint ran code from its .metadata"
    assert_states_equal(model, before)


def _damage_piece(path: Path, how: str) -> None:
    """Damage the last model tensor's bytes (or its whole piece) in a committed checkpoint.

    The last one, so that a loader which fills tensors in place as it reads has already
    filled the others when it meets the damage: the load must still change nothing.
    """
    metadata = committed_metadata(path)
    model_items = [i for k, i in metadata.storage_data.items() if k.fqn.startswith("model.")]
    info = max(model_items, key=lambda item: item.offset)
    piece = path / info.relative_path
    data = bytearray(piece.read_bytes())
    if how == "missing":
        piece.unlink()
    elif how == "truncated":
        piece.write_bytes(bytes(data[: info.offset + info.length // 2]))
    else:
        assert how == "bit-flip"
        data[info.offset + info.length // 2] ^= 0x10
        piece.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "truncated", "bit-flip"])
def test_damaged_piece(tmp_path: Path, how: str) -> None:
    path = tmp_path / "sharded"
    expected = _save_sharded(path)
    shutil.copytree(path, tmp_path / "pristine")
    _damage_piece(path, how)
    error_type = CheckpointError if how == "missing" else CorruptCheckpointError
    _assert_load_refused(path, error_type, expected)
    # the undamaged copy still loads: the failure was the damage, not the checkpoint
    model = plain_copy(expected)
    Fabric().load(tmp_path / "pristine", {"model": model})
    assert_states_equal(model, expected)
