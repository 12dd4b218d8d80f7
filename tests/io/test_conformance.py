"""One behaviour for every ``CheckpointIO``: the built-in one and the ones users write.

Each test runs for three implementations (``TorchCheckpointIO``; a user's own ``CheckpointIO``
doing plain ``torch.save``/``torch.load`` through fsspec; a user's ``TorchCheckpointIO`` subclass
that overrides ``save_checkpoint`` and ``load_checkpoint`` and calls ``super()``) on three
filesystems (a local path, a ``file://`` URL, a ``memory://`` URL). The user implementations
count their calls, so the tests also check that Fabric goes through them for every save and load.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import fsspec
import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR at import: do it at collection, not in a test

from lightweight_ckpt import Fabric, UnsafeCheckpointError
from lightweight_ckpt.io import CheckpointIO, TorchCheckpointIO
from tests.helpers.asserts import (
    as_plain,
    assert_states_differ,
    assert_states_equal,
    snapshot,
    states_equal,
)
from tests.helpers.models import Tiny, fresh_like, make_state


class PlainFsspecIO(CheckpointIO):
    """A user's own IO: plain ``torch.save``/``torch.load`` on an fsspec file; counts calls."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.load_kwargs: list[dict[str, Any]] = []

    def save_checkpoint(
        self, checkpoint: Any, path: Any, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.calls["save"] += 1
        with fsspec.open(os.fspath(path), "wb", **(storage_options or {})) as file:
            torch.save(checkpoint, file)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> Any:
        self.calls["load"] += 1
        self.load_kwargs.append({"map_location": map_location, "weights_only": weights_only})
        with fsspec.open(os.fspath(path), "rb") as file:
            return torch.load(
                file, map_location=map_location, weights_only=weights_only is not False
            )

    def remove_checkpoint(self, path: Any) -> None:
        self.calls["remove"] += 1
        fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
        if fs.exists(fs_path):
            fs.rm(fs_path, recursive=True)


class CountingTorchIO(TorchCheckpointIO):
    """A user's ``TorchCheckpointIO`` subclass that wraps save and load (e.g. to log them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.load_kwargs: list[dict[str, Any]] = []

    def save_checkpoint(
        self, checkpoint: Any, path: Any, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.calls["save"] += 1
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> Any:
        self.calls["load"] += 1
        self.load_kwargs.append({"map_location": map_location, "weights_only": weights_only})
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.calls["remove"] += 1
        super().remove_checkpoint(path)


IMPLEMENTATIONS: dict[str, Callable[[], CheckpointIO]] = {
    "torch": TorchCheckpointIO,
    "user-checkpointio": PlainFsspecIO,
    "user-torch-subclass": CountingTorchIO,
}
FILESYSTEMS = ["local", "file-url", "memory"]


@pytest.fixture(params=list(IMPLEMENTATIONS))
def io(request: pytest.FixtureRequest) -> CheckpointIO:
    return IMPLEMENTATIONS[request.param]()


@pytest.fixture(params=FILESYSTEMS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where to put a checkpoint, as a user would spell it on that filesystem."""
    if request.param == "local":
        return str(tmp_path / "last.ckpt")
    if request.param == "file-url":
        return f"file://{tmp_path}/last.ckpt"
    return f"memory://conformance/{tmp_path.name}/last.ckpt"


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def check_calls(io: CheckpointIO, **expected: int) -> None:
    """For the user implementations: every save/load/remove went through them, and only those."""
    calls = getattr(io, "calls", None)
    if calls is None:
        return
    assert {k: v for k, v in calls.items() if v} == {k: v for k, v in expected.items() if v}


# -- the suite --------------------------------------------------------------------------------


def test_round_trip_in_place(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    fabric.save(url, state)
    assert exists(url)

    target = fresh_like(state)
    assert_states_differ(target, state)
    remainder = fabric.load(url, target)
    assert remainder == {}
    assert_states_equal(target, state)
    assert target["step"] == 2
    check_calls(io, save=1, load=1)


def test_load_without_state_returns_the_raw_dict(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    fabric.save(url, state)
    raw = fabric.load(url)
    assert isinstance(raw, dict)
    assert set(raw) == set(state)
    assert isinstance(raw["model"], dict)
    assert "fc1.weight" in raw["model"]
    assert_states_equal(raw, {key: as_plain(value) for key, value in state.items()})
    check_calls(io, save=1, load=1)


def test_partial_request_returns_the_remainder(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    fabric.save(url, state)
    model = Tiny()
    assert_states_differ(model, state["model"])
    remainder = fabric.load(url, {"model": model})
    assert_states_equal(model, state["model"])
    assert set(remainder) == set(state) - {"model"}
    assert remainder["hparams"] == state["hparams"]
    check_calls(io, save=1, load=1)


def test_overwrite_an_existing_checkpoint(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    first, second = make_state(steps=1), make_state(steps=3)
    assert_states_differ(first, second)
    fabric.save(url, first)
    fabric.save(url, second)

    target = fresh_like(second)
    fabric.load(url, target)
    assert_states_equal(target, second)
    assert not states_equal(target, first)
    check_calls(io, save=2, load=1)


def test_remove_checkpoint(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    fabric.save(url, make_state())
    assert exists(url)
    io.remove_checkpoint(url)
    assert not exists(url)
    io.remove_checkpoint(url)  # a missing path is not an error
    with pytest.raises(FileNotFoundError):
        fabric.load(url)
    check_calls(io, save=1, load=1, remove=2)


def test_load_raw_of_a_plain_state_dict(io: CheckpointIO, url: str) -> None:
    source = Tiny()
    io.save_checkpoint(source.state_dict(), url)
    model = Tiny()
    before = snapshot(model)
    assert_states_differ(before, source)
    Fabric(checkpoint_io=io).load_raw(url, model)
    assert_states_equal(model, source)
    check_calls(io, save=1, load=1)


def test_weights_only_reaches_the_plugin(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    fabric.save(url, {"model": Tiny(), "ratio": Fraction(1, 3)})  # a Fraction is not "weights"
    # ours explain themselves; a user's plain torch.load raises what torch raises
    expected = UnsafeCheckpointError if isinstance(io, TorchCheckpointIO) else UnpicklingError
    with pytest.raises(expected, match="weights_only"):
        fabric.load(url)
    loaded = fabric.load(url, weights_only=False)
    assert loaded["ratio"] == Fraction(1, 3)
    load_kwargs = getattr(io, "load_kwargs", None)
    if load_kwargs is not None:
        assert [kwargs["weights_only"] for kwargs in load_kwargs] == [None, False]
    check_calls(io, save=1, load=2)


def test_every_save_and_load_goes_through_the_plugin(io: CheckpointIO, url: str) -> None:
    fabric = Fabric(checkpoint_io=io)
    state = make_state()
    for _ in range(3):
        fabric.save(url, state)
    fabric.load(url)
    fabric.load(url, fresh_like(state))
    fabric.load(url, {"model": Tiny()}, strict=False)
    check_calls(io, save=3, load=3)
    io.teardown()


# -- TorchCheckpointIO files are plain torch files --------------------------------------------


@pytest.mark.parametrize("spelling", ["path", "file-url"])
def test_torch_io_files_open_with_plain_torch_load(tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "last.ckpt"
    url = str(path) if spelling == "path" else f"file://{path}"
    state = make_state()
    Fabric(checkpoint_io=TorchCheckpointIO()).save(url, state)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert states_equal(loaded[key], as_plain(value)), key


def test_plain_torch_save_files_load_with_torch_io(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    state = make_state()
    torch.save({key: as_plain(value) for key, value in state.items()}, path)
    target = fresh_like(state)
    assert_states_differ(target, state)
    Fabric(checkpoint_io=TorchCheckpointIO()).load(path, target)
    assert_states_equal(target, state)
