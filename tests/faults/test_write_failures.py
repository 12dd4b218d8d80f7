"""Saves that fail: the previous checkpoint stays intact, no temp file is left, the error is clear.

Failures are real: objects that cannot be pickled, a parent path that is a regular file, a
directory in the way, and a file-size limit (``RLIMIT_FSIZE``) that makes the kernel refuse a
write part-way through the tensor data, the way a full disk does.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR at import: do it at collection, not in a test

from lightweight_ckpt import CheckpointWriteError, Fabric
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.models import Tiny, fresh_like, make_state

UNPICKLABLE: dict[str, Callable[[], object]] = {
    "lock": threading.Lock,
    "lambda": lambda: lambda x: x,
    "generator": lambda: (i for i in range(3)),
}


def big_then_bad(bad: object, mib: int = 16) -> dict[str, Any]:
    """Large tensors first, then a module, then the object that cannot be pickled."""
    numel = mib * 2**20 // 4 // 4
    return {
        "big": {f"t{i}": torch.full((numel,), float(i)) for i in range(4)},
        "model": Tiny(),
        "bad": bad,
    }


def leftovers(directory: Path, *keep: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name not in keep)


def assert_holds(path: str | Path, state: dict[str, Any]) -> None:
    """The checkpoint at ``path`` restores ``state`` into a fresh target, bitwise."""
    target = fresh_like(state)
    assert_states_differ(target, state)
    Fabric().load(path, target)
    assert_states_equal(target, state)


# -- local disk -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", list(UNPICKLABLE))
def test_unpicklable_object_keeps_previous_checkpoint(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "last.ckpt"
    old = make_state()
    fabric = Fabric()
    fabric.save(path, old)
    old_bytes = path.read_bytes()

    with pytest.raises(CheckpointWriteError) as excinfo:
        fabric.save(path, big_then_bad(UNPICKLABLE[bad]()))
    assert isinstance(excinfo.value, OSError)
    assert str(path) in str(excinfo.value)

    assert path.read_bytes() == old_bytes
    assert_holds(path, old)
    assert leftovers(tmp_path) == ["last.ckpt"]

    # the path is still usable: a good save replaces the old checkpoint
    new = make_state(steps=3)
    fabric.save(path, new)
    assert_holds(path, new)
    assert leftovers(tmp_path) == ["last.ckpt"]


def test_failed_first_save_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run" / "first.ckpt"
    with pytest.raises(CheckpointWriteError) as excinfo:
        Fabric().save(path, big_then_bad(threading.Lock()))
    assert str(path) in str(excinfo.value)
    assert not path.exists()
    assert leftovers(path.parent) == []


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make the kernel refuse writes past ``limit`` bytes (EFBIG), as a full disk would."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("hard RLIMIT_FSIZE too low")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _save_past_the_limit(tmp_path: Path) -> tuple[Path, dict[str, Any], CheckpointWriteError]:
    path = tmp_path / "last.ckpt"
    old = make_state()
    fabric = Fabric()
    fabric.save(path, old)
    assert path.stat().st_size < 1 << 20
    new = {"big": {f"t{i}": torch.full((4 << 20,), float(i)) for i in range(5)}}  # 80 MiB
    with file_size_limit(8 << 20), pytest.raises(CheckpointWriteError) as excinfo:
        fabric.save(path, new)
    return path, old, excinfo.value


def test_write_refused_part_way_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path, old, err = _save_past_the_limit(tmp_path)
    assert str(path) in str(err)
    # the kernel did refuse a write, i.e. more than 8 MiB had been written when it failed
    assert any(isinstance(link, OSError) and link.errno == errno.EFBIG for link in _chain(err)), [
        repr(link) for link in _chain(err)
    ]
    assert_holds(path, old)
    assert leftovers(tmp_path) == ["last.ckpt"]


def test_write_refused_part_way_names_the_os_error(tmp_path: Path) -> None:
    """A full disk should read as one: the message carries the OS error, not torch internals."""
    _, _, err = _save_past_the_limit(tmp_path)
    assert os.strerror(errno.EFBIG) in str(err), str(err)


def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    path = blocker / "last.ckpt"
    with pytest.raises(CheckpointWriteError) as excinfo:
        Fabric().save(path, make_state())
    assert isinstance(excinfo.value, OSError)
    assert str(path) in str(excinfo.value)
    assert blocker.read_text() == "I am a file"
    assert leftovers(tmp_path) == ["blocker"]


def test_saving_onto_an_existing_directory(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointWriteError) as excinfo:
        Fabric().save(path, make_state())
    assert str(path) in str(excinfo.value)
    assert path.is_dir()
    assert os.listdir(path) == ["keep.txt"]
    assert (path / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == ["last.ckpt"]


# -- memory:// (staged as a temp key, then moved) ---------------------------------------------


def memory_files() -> list[str]:
    return sorted(fsspec.filesystem("memory").find("/"))


@pytest.mark.parametrize("bad", list(UNPICKLABLE))
def test_memory_failed_save_keeps_previous_object(bad: str) -> None:
    url = "memory://runs/a/last.ckpt"
    fs = fsspec.filesystem("memory")
    old = make_state()
    fabric = Fabric()
    fabric.save(url, old)
    assert memory_files() == ["/runs/a/last.ckpt"]
    old_bytes = fs.cat_file("/runs/a/last.ckpt")

    with pytest.raises(CheckpointWriteError) as excinfo:
        fabric.save(url, big_then_bad(UNPICKLABLE[bad]()))
    assert url in str(excinfo.value)
    assert memory_files() == ["/runs/a/last.ckpt"]  # no temp keys
    assert fs.cat_file("/runs/a/last.ckpt") == old_bytes
    assert_holds(url, old)


def test_memory_failed_first_save_leaves_nothing() -> None:
    url = "memory://runs/b/first.ckpt"
    with pytest.raises(CheckpointWriteError) as excinfo:
        Fabric().save(url, big_then_bad(threading.Lock()))
    assert url in str(excinfo.value)
    assert memory_files() == []


def test_memory_overwrite_leaves_only_the_target() -> None:
    url = "memory://runs/c/last.ckpt"
    fabric = Fabric()
    old, new = make_state(), make_state(steps=3)
    fabric.save(url, old)
    assert_holds(url, old)
    fabric.save(url, new)
    assert_holds(url, new)
    assert memory_files() == ["/runs/c/last.ckpt"]


def test_memory_saving_onto_a_directory() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/runs/d/last.ckpt/keep.txt", b"mine")
    url = "memory://runs/d/last.ckpt"
    with pytest.raises(CheckpointWriteError) as excinfo:
        Fabric().save(url, make_state())
    assert url in str(excinfo.value)
    assert memory_files() == ["/runs/d/last.ckpt/keep.txt"]
    assert fs.cat_file("/runs/d/last.ckpt/keep.txt") == b"mine"
