"""Strategy selection from names and the environment; path resolution to filesystems."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lightweight_ckpt import uploads
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.storage import Location, resolve
from lightweight_ckpt.strategies import SingleDeviceStrategy, Strategy, select_strategy
from lightweight_ckpt.strategies.selection import STRATEGY_NAMES

# -- select_strategy ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "single_device"])
def test_names_pick_single_device_without_a_process_group(name):
    strategy = select_strategy(name, None)
    assert type(strategy) is SingleDeviceStrategy
    assert isinstance(strategy.checkpoint_io, TorchCheckpointIO)


def test_a_checkpoint_io_is_plugged_into_the_selected_strategy():
    io = TorchCheckpointIO()
    assert select_strategy("auto", io).checkpoint_io is io
    assert select_strategy("single_device", io).checkpoint_io is io


def test_a_strategy_instance_is_used_as_is():
    strategy = SingleDeviceStrategy()
    own_io = strategy.checkpoint_io
    assert select_strategy(strategy, None) is strategy
    assert strategy.checkpoint_io is own_io

    other_io = TorchCheckpointIO()
    assert select_strategy(strategy, other_io) is strategy
    assert strategy.checkpoint_io is other_io


def test_a_user_strategy_subclass_is_accepted():
    class MyStrategy(Strategy):
        pass

    strategy = MyStrategy()
    assert select_strategy(strategy, None) is strategy


def test_unknown_name_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match="'bogus'") as info:
        select_strategy("bogus", None)
    for name in STRATEGY_NAMES:
        assert repr(name) in str(info.value)


def test_names_are_case_sensitive():
    with pytest.raises(ValueError, match="'AUTO'"):
        select_strategy("AUTO", None)


@pytest.mark.parametrize("value", [None, 3, SingleDeviceStrategy, ["auto"]])
def test_a_non_string_is_a_type_error(value):
    with pytest.raises(TypeError, match="strategy must be"):
        select_strategy(value, None)


def test_auto_with_a_world_of_one_is_single_device(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        strategy = select_strategy("auto", None)
        assert type(strategy) is SingleDeviceStrategy
        assert strategy.world_size == 1
        assert strategy.global_rank == 0
        assert strategy.is_global_zero
        strategy.barrier()
    finally:
        dist.destroy_process_group()


# -- storage.resolve ------------------------------------------------------------------------


def test_resolve_a_local_path(tmp_path):
    path = tmp_path / "run" / "last.ckpt"
    for given in (str(path), path):
        location = resolve(given)
        assert isinstance(location, Location)
        assert location.is_local
        assert location.protocol == "file"
        assert location.path == str(path)
        assert location.url == str(path)
        assert isinstance(location.url, str)


def test_resolve_a_relative_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = resolve("sub/last.ckpt")
    assert location.is_local
    assert location.path == os.path.join(str(tmp_path), "sub", "last.ckpt")
    assert location.url == "sub/last.ckpt"


def test_resolve_a_file_url(tmp_path):
    url = f"file://{tmp_path}/last.ckpt"
    location = resolve(url)
    assert location.is_local
    assert location.protocol == "file"
    assert location.path == str(tmp_path / "last.ckpt")
    assert location.url == url


def test_resolve_a_memory_url():
    location = resolve("memory://bucket/run/last.ckpt")
    assert not location.is_local
    assert location.protocol == "memory"
    assert location.path == "/bucket/run/last.ckpt"
    assert location.url == "memory://bucket/run/last.ckpt"


def test_resolve_passes_storage_options_to_the_filesystem(tmp_path):
    location = resolve(str(tmp_path / "x.ckpt"), {"auto_mkdir": True})
    assert location.is_local
    assert location.fs.auto_mkdir is True


@pytest.mark.parametrize("url", ["s3://bucket/x", "s3a://bucket/run/x.ckpt"])
def test_resolve_s3_without_the_extra_names_it(url, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the extra were not installed
    for protocol in ("s3", "s3a"):  # and forget a class fsspec may have registered already
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, protocol, raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        resolve(url)
    message = str(info.value)
    assert url in message
    assert "lightweight-ckpt[s3]" in message


@pytest.mark.parametrize("url", ["gs://bucket/x", "gcs://bucket/x"])
def test_resolve_gcs_without_the_extra_names_it(url, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the extra were not installed
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, protocol, raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"lightweight-ckpt\[gcs\]") as info:
        resolve(url)
    assert url in str(info.value)


def test_path_objects_are_not_stringly_mangled(tmp_path):
    path = Path(tmp_path) / "with space" / "a.ckpt"
    location = resolve(path)
    assert location.path == str(path)


# -- S3 part sizes and the progress setting -----------------------------------------------------


def test_part_sizes_double_every_1000_parts_within_s3_limits():
    mib = 2**20
    assert [uploads.part_size(n, 8 * mib) for n in (1, 1000, 1001, 2000, 2001)] == [
        8 * mib, 8 * mib, 16 * mib, 16 * mib, 32 * mib
    ]  # fmt: skip
    sizes = [uploads.part_size(n, 8 * mib) for n in range(1, 10_001)]  # S3's most parts
    assert sum(sizes) >= 5 * 2**40  # S3's largest object
    assert max(uploads.part_size(10_000, p) for p in (5 * mib, 8 * mib, 64 * mib)) == 5 * 2**30


def test_an_unknown_progress_mode_is_refused_naming_the_variable():
    result = subprocess.run(
        [sys.executable, "-c", "import lightweight_ckpt"],
        env={"LWCKPT_PROGRESS": "sometimes", "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "LWCKPT_PROGRESS='sometimes'" in result.stderr
    assert "auto, on, off" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [("0", "False"), ("1", "True"), (None, "True")])
def test_reuse_pieces_follows_its_variable(value: str | None, expected: str) -> None:
    env = {"PATH": os.environ.get("PATH", "")}
    if value is not None:
        env["LWCKPT_REUSE_PIECES"] = value
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lightweight_ckpt import config; print(config.settings().reuse_pieces)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == expected
