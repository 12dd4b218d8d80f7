"""What local saves spend their time on: write-behind, and no second CRC32 of sharded items.

Saves hand their bytes to the disk as they write them (``storage.WriteBehind``). The libc call
is watched, not replaced: the spy records each ``sync_file_range`` request with the file's size
at that moment and passes it on, so the saves below really run write-behind.

A sharded save's items skip torch's own zip CRC32s (``dcp_calls.without_torch_crc32``): the
pieces' records hold ours, and the setting is the user's again afterwards.
"""

from __future__ import annotations

import io
import mmap
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.serialization import config as torch_serialization

from lightweight_ckpt import Fabric, config, storage
from lightweight_ckpt.errors import CheckpointWriteError, CorruptCheckpointError
from lightweight_ckpt.formats.dcp_calls import without_torch_crc32
from lightweight_ckpt.io import TorchCheckpointIO

linux_only = pytest.mark.skipif(
    storage._SYNC_FILE_RANGE is None, reason="sync_file_range is Linux-only"
)

STEP = 4 << 20


class Requests:
    """What was asked of ``sync_file_range``: ``(path, offset, nbytes, flags, size_then)``."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.seen: list[tuple[str, int, int, int, int]] = []

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        self.seen.append((path, offset, nbytes, flags, os.fstat(fd).st_size))
        return int(self._real(fd, offset, nbytes, flags))

    def for_name(self, predicate: Any) -> list[tuple[int, int, int, int]]:
        return [(o, n, f, s) for p, o, n, f, s in self.seen if predicate(os.path.basename(p))]


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Requests:
    spy = Requests(storage._SYNC_FILE_RANGE)
    monkeypatch.setattr(storage, "_SYNC_FILE_RANGE", spy)
    return spy


def big_state(megabytes: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    numel = (megabytes << 20) // 4 // 4
    return {f"t{i}": torch.randn(numel, generator=generator) for i in range(4)}


def assert_written_behind(ranges: list[tuple[int, int, int, int]], file_size: int) -> None:
    assert ranges, "no writeback was started while the file was written"
    position = 0
    for offset, nbytes, flags, size_then in ranges:
        assert flags == storage._SYNC_FILE_RANGE_WRITE  # start writing; never wait
        assert offset == position  # consecutive ranges, none asked twice
        assert nbytes >= STEP
        assert (offset + nbytes) % mmap.PAGESIZE == 0
        assert offset + nbytes <= size_then  # only bytes already written
        position = offset + nbytes
    # what the fsync is left with: less than one step, plus the partly written last page
    assert file_size - position < STEP + mmap.PAGESIZE


@linux_only
def test_a_single_file_save_starts_writeback_step_by_step(
    tmp_path: Path, requests: Requests
) -> None:
    path = tmp_path / "big.ckpt"
    state = big_state(24)
    with config.override(write_behind_bytes=STEP):
        Fabric().save(path, state)
    # the requests went to the hidden temp file, before it replaced the target
    assert {os.path.dirname(p) for p, *_ in requests.seen} == {str(tmp_path)}
    ranges = requests.for_name(lambda name: name.startswith(".big.ckpt.tmp-"))
    assert len(ranges) == len(requests.seen)
    assert_written_behind(ranges, path.stat().st_size)
    assert len(ranges) >= 3  # 24 MiB, written a 6 MiB tensor at a time, in >= 4 MiB steps
    loaded = Fabric().load(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@linux_only
def test_a_sharded_piece_starts_writeback_step_by_step(tmp_path: Path, requests: Requests) -> None:
    io = TorchCheckpointIO()
    path = tmp_path / "sharded"
    state = big_state(24)
    with config.override(write_behind_bytes=STEP):
        io.prepare_sharded(str(path), "v-test")
        io.save_sharded(dict(state), str(path), "v-test")
    piece = path / "v-test" / "__0_0.distcp"
    ranges = requests.for_name(lambda name: name == piece.name)
    assert_written_behind(ranges, piece.stat().st_size)
    loaded = Fabric().load(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@linux_only
def test_write_behind_set_to_zero_leaves_everything_to_the_fsync(
    tmp_path: Path, requests: Requests
) -> None:
    with config.override(write_behind_bytes=0):
        Fabric().save(tmp_path / "big.ckpt", big_state(24))
    assert requests.seen == []


@linux_only
def test_a_refused_request_stops_the_asking_and_the_save_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refuse(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append(offset)
        return -1  # e.g. ESPIPE, or a filesystem that does not support it

    monkeypatch.setattr(storage, "_SYNC_FILE_RANGE", refuse)
    state = big_state(24)
    with config.override(write_behind_bytes=STEP):
        Fabric().save(tmp_path / "big.ckpt", state)
    assert calls == [0]  # asked once, then never again for this file
    loaded = Fabric().load(tmp_path / "big.ckpt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LWCKPT_WRITE_BEHIND_BYTES", raising=False)
    assert config._from_env().write_behind_bytes == 16 << 20
    monkeypatch.setenv("LWCKPT_WRITE_BEHIND_BYTES", "0")
    assert config._from_env().write_behind_bytes == 0
    monkeypatch.setenv("LWCKPT_WRITE_BEHIND_BYTES", "-5")
    assert config._from_env().write_behind_bytes == 0


def save_sharded(path: Path, state: dict[str, Any]) -> None:
    checkpoint_io = TorchCheckpointIO()
    checkpoint_io.prepare_sharded(str(path), "v-test")
    checkpoint_io.save_sharded(dict(state), str(path), "v-test")


def item_zip_crcs(path: Path) -> list[int]:
    """The CRC32 fields of every record of every item (a small torch.save zip) in the pieces."""
    crcs = []
    for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
        with open(path / info.relative_path, "rb") as piece:
            piece.seek(info.offset)
            item = piece.read(info.length)
        crcs += [record.CRC for record in zipfile.ZipFile(io.BytesIO(item)).infolist()]
    return crcs


@pytest.mark.parametrize("users_setting", [True, False])
def test_sharded_items_skip_torchs_own_crc32_and_the_setting_comes_back(
    tmp_path: Path, users_setting: bool
) -> None:
    torch_serialization.save.compute_crc32 = users_setting
    try:
        check_items_skip_torchs_crc32(tmp_path, users_setting)
    finally:
        torch_serialization.save.compute_crc32 = True


def check_items_skip_torchs_crc32(tmp_path: Path, users_setting: bool) -> None:
    state = {"a": torch.randn(1000), "b": torch.arange(10)}
    save_sharded(tmp_path / "s", state)
    assert torch_serialization.save.compute_crc32 is users_setting
    assert set(item_zip_crcs(tmp_path / "s")) == {0}
    # a plain torch.save under the user's setting still computes them
    buffer = io.BytesIO()
    torch.save(state["a"], buffer)
    crcs = {r.CRC for r in zipfile.ZipFile(io.BytesIO(buffer.getvalue())).infolist()}
    assert (crcs != {0}) is users_setting
    # stock DCP reads the pieces; our load checks every item against its own CRC32
    stock = {"a": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.long)}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load(stock, checkpoint_id=str(tmp_path / "s"), no_dist=True)
    assert all(torch.equal(stock[k], v) for k, v in state.items())
    with open(tmp_path / "s" / "v-test" / "__0_0.distcp", "r+b") as piece:
        piece.seek(-9, os.SEEK_END)
        byte = piece.read(1)
        piece.seek(-9, os.SEEK_END)
        piece.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=r"CRC32|checksum"):
        Fabric().load(tmp_path / "s")


def test_the_crc32_setting_comes_back_after_a_failed_sharded_save(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError):
        save_sharded(tmp_path / "s", {"a": torch.ones(3), "bad": lambda: None})
    assert torch_serialization.save.compute_crc32 is True


def test_overlapping_writes_restore_the_setting_only_when_the_last_one_ends() -> None:
    first, second = without_torch_crc32(), without_torch_crc32()
    first.__enter__()
    second.__enter__()
    assert torch_serialization.save.compute_crc32 is False
    first.__exit__(None, None, None)
    assert torch_serialization.save.compute_crc32 is False  # the second write still runs
    second.__exit__(None, None, None)
    assert torch_serialization.save.compute_crc32 is True
