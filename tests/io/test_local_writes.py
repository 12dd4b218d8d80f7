"""What local saves spend their time on: direct I/O, write-behind, no second CRC32 of items.

Local saves, single files and sharded pieces alike, go around the page cache
(``local_files.DirectFile``, ``O_DIRECT``) where the filesystem allows, with a writer thread
writing one buffer while the caller fills the next; elsewhere they hand their bytes to the disk
as they write them (``local_files.WriteBehind``). The libc call is watched, not replaced: the
spy records each ``sync_file_range`` request with the file's size at that moment and passes it
on, so the saves below really run write-behind.

A sharded save's items skip torch's own zip CRC32s (``dcp_calls.without_torch_crc32``): the
pieces' records hold ours, and the setting is the user's again afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import mmap
import multiprocessing
import os
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from lightweight_ckpt import Fabric, config, local_files
from lightweight_ckpt.compat import torch_serialization_config as torch_serialization
from lightweight_ckpt.errors import CheckpointWriteError, CorruptCheckpointError
from lightweight_ckpt.formats.dcp_calls import without_torch_crc32
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.strategies import FSDPStrategy
from tests.strategies.test_sharded_faults import assert_commit_complete

if TYPE_CHECKING:
    from collections.abc import Iterator

linux_only = pytest.mark.skipif(
    local_files._SYNC_FILE_RANGE is None, reason="sync_file_range is Linux-only"
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
    spy = Requests(local_files._SYNC_FILE_RANGE)
    monkeypatch.setattr(local_files, "_SYNC_FILE_RANGE", spy)
    return spy


def big_state(megabytes: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    numel = (megabytes << 20) // 4 // 4
    return {f"t{i}": torch.randn(numel, generator=generator) for i in range(4)}


def assert_written_behind(ranges: list[tuple[int, int, int, int]], file_size: int) -> None:
    assert ranges, "no writeback was started while the file was written"
    position = 0
    for offset, nbytes, flags, size_then in ranges:
        assert flags == local_files._SYNC_FILE_RANGE_WRITE  # start writing; never wait
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
    with config.override(write_behind_bytes=STEP, direct_io=False):
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
    with config.override(write_behind_bytes=STEP, direct_io=False):
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
    with config.override(write_behind_bytes=0, direct_io=False):
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

    monkeypatch.setattr(local_files, "_SYNC_FILE_RANGE", refuse)
    state = big_state(24)
    with config.override(write_behind_bytes=STEP, direct_io=False):
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


direct_only = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")


def new_direct_file(path: Path, buffer_bytes: int) -> local_files.DirectFile:
    """A ``DirectFile`` on a plain new file: it turns ``O_DIRECT`` on itself where allowed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return local_files.DirectFile(fd, buffer_bytes)


@direct_only
def test_a_single_file_save_goes_around_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: dict[str, int] = {}
    real_open = os.open

    def watched(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened[os.path.basename(os.fspath(path))] = flags
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(local_files.os, "open", watched)
    state = big_state(6) | {"odd": torch.arange(1001, dtype=torch.int8), "step": 7}
    Fabric().save(tmp_path / "d.ckpt", state)
    monkeypatch.setattr(local_files.os, "open", real_open)
    temps = [flags for name, flags in opened.items() if name.startswith(".d.ckpt.tmp-")]
    assert len(temps) == 1
    assert temps[0] & os.O_DIRECT
    loaded = torch.load(tmp_path / "d.ckpt", weights_only=True)  # stock torch reads it
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "step")
    assert loaded["step"] == 7
    assert not [p for p in os.listdir(tmp_path) if p != "d.ckpt"]  # no temp file left


def write_in_pieces(file: Any, sizes: list[int], seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    expected = b""
    for index, size in enumerate(sizes):
        data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
        chunk = bytes(data.numpy())
        assert file.write(chunk if index % 2 else memoryview(chunk)) == size
        expected += chunk
        if index % 3 == 2:
            file.flush()  # a padded tail written early, rewritten by the next writes
        assert file.tell() == len(expected)
    file.flush()
    return expected


def filesystem_of(folder: Path) -> str:
    best, kind = "", "unknown"
    with open("/proc/mounts", encoding="ascii") as mounts:
        for line in mounts:
            _, mountpoint, fstype, *_ = line.split()
            resolved = str(folder.resolve())
            inside = resolved == mountpoint or resolved.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) > len(best):
                best, kind = mountpoint, fstype
    return kind


@direct_only
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_direct_writes_of_any_size_give_the_exact_bytes(tmp_path: Path, where: str) -> None:
    folder = tmp_path if where == "disk" else Path("/dev/shm")  # noqa: S108 - tmpfs on Linux
    if not folder.is_dir():
        pytest.skip("no /dev/shm here")
    # ext4/xfs take O_DIRECT; tmpfs does from Linux 6.6 on and refuses it before (then: buffered)
    direct = filesystem_of(folder) not in ("tmpfs", "ramfs")
    path = folder / f"direct-{os.getpid()}-{where}.bin"
    sizes = [1, 4095, 4097, 8192, 20000, 3, 0, 12289, 65536, 7]
    try:
        with new_direct_file(path, buffer_bytes=8192) as file:
            expected = write_in_pieces(file, sizes, seed=1)
            if direct:
                assert file._direct
        assert path.read_bytes() == expected
    finally:
        path.unlink(missing_ok=True)


@direct_only
def test_a_file_written_over_in_place_is_cut_on_a_clean_close_and_abandoned_after_an_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "reused.bin"
    path.write_bytes(b"\xee" * 50000)  # an old piece, longer than what replaces it
    with local_files.DirectFile(os.open(path, os.O_RDWR), 8192, cut_on_close=True) as file:
        expected = write_in_pieces(file, [9000, 7, 12000], seed=3)
    assert path.read_bytes() == expected  # the old tail is gone

    before = path.read_bytes()

    def fail_mid_write() -> None:
        with local_files.DirectFile(os.open(path, os.O_RDWR), 8192, cut_on_close=True) as file:
            file.write(b"\x11" * 100)  # stays in the buffer: never flushed after the error
            raise RuntimeError("serialization failed")

    with pytest.raises(RuntimeError, match="serialization failed"):
        fail_mid_write()
    assert path.read_bytes() == before  # nothing written, nothing cut


@direct_only
def test_a_filesystem_refusing_direct_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    refused: list[int] = []

    def refuse_direct(fd: int, data: Any, offset: int) -> int:
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(local_files.os, "pwrite", refuse_direct)
    path = tmp_path / "refused.bin"
    with new_direct_file(path, buffer_bytes=8192) as file:
        expected = write_in_pieces(file, [10000, 5000, 30000], seed=2)
        assert not file._direct
    assert refused == [0]  # refused once, then written through the page cache
    assert path.read_bytes() == expected


@direct_only
def test_the_caller_fills_the_next_buffer_while_the_last_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    release = threading.Event()
    finished: list[int] = []
    writers: dict[int, int] = {}  # offset -> the thread that wrote it

    def held(fd: int, data: Any, offset: int) -> int:
        writers[offset] = threading.get_ident()
        if offset == 0:
            release.wait(10)  # the first full buffer stays "on its way to the disk"
        count = real_pwrite(fd, data, offset)
        finished.append(offset)
        return count

    monkeypatch.setattr(local_files.os, "pwrite", held)
    path = tmp_path / "overlap.bin"
    data = bytes(range(256)) * 100  # 25600 bytes: three full buffers and a tail
    with new_direct_file(path, buffer_bytes=8192) as file:
        file.write(data[:12000])  # the first buffer is handed over, the second half filled
        assert finished == []  # ... and write returned while the first was still being written
        release.set()
        file.write(data[12000:])
        file.flush()
    assert finished == [0, 8192, 16384, 24576]
    caller = threading.get_ident()
    assert all(writers[offset] != caller for offset in (0, 8192, 16384))  # the writer thread
    assert writers[24576] == caller  # the padded tail: written by flush itself
    assert path.read_bytes() == data


@direct_only
def test_a_failed_background_write_fails_the_save_and_leaves_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "full.ckpt"
    old = {"w": torch.arange(10.0)}
    Fabric().save(path, old)
    real_pwrite = os.pwrite

    def disk_full(fd: int, data: Any, offset: int) -> int:
        if offset >= 4 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(local_files.os, "pwrite", disk_full)
    with (
        config.override(direct_buffer_bytes=1 << 20),
        pytest.raises(CheckpointWriteError) as caught,
    ):
        Fabric().save(path, big_state(24))
    assert str(path) in str(caught.value)
    assert "No space left" in str(caught.value)
    monkeypatch.setattr(local_files.os, "pwrite", real_pwrite)
    assert sorted(os.listdir(tmp_path)) == ["full.ckpt"]  # no temp file left
    assert torch.equal(Fabric().load(path)["w"], old["w"])  # the previous checkpoint is intact
    # (the hygiene fixture checks that no writer thread was left running)


@direct_only
def test_sharded_pieces_new_and_reused_are_written_around_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    writes: list[tuple[str, bool, int]] = []

    def watched(fd: int, data: Any, offset: int) -> int:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        writes.append((name, bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(local_files.os, "pwrite", watched)
    path = tmp_path / "sharded"
    fabric = Fabric(strategy=FSDPStrategy())
    pieces = []
    for seed, megabytes in ((1, 8), (2, 8), (3, 5)):  # the third save reuses the first's piece
        writes.clear()
        state = {f"t{i}": t * seed for i, t in enumerate(big_state(megabytes).values())}
        with config.override(direct_buffer_bytes=1 << 20, piece_buffer_bytes=256 << 10):
            fabric.save(path, dict(state))
        (piece,) = (path / assert_commit_complete(path)).glob("*.distcp")
        pieces.append(piece.stat())
        direct = [(flag, size) for name, flag, size in writes if name == piece.name]
        assert len(direct) > 2  # full buffers from the writer thread, then the tail
        assert all(flag for flag, _ in direct)
        assert max(size for _, size in direct) == 256 << 10  # pieces have buffers of their own
        loaded = Fabric().load(path)
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert pieces[2].st_ino == pieces[0].st_ino  # the third save wrote over the first's file
    assert pieces[2].st_size < pieces[0].st_size  # ... and cut off the rest of the old content
    fabric.teardown()


@pytest.fixture
def empty_pool() -> Iterator[local_files._BufferPool]:
    local_files._POOL.forget()
    yield local_files._POOL
    local_files._POOL.forget()


@direct_only
def test_a_runs_repeated_saves_reuse_their_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_pool: local_files._BufferPool
) -> None:
    """The second save maps no new memory: it writes from the buffers the first one used."""
    mapped: list[int] = []
    real_map = local_files._map

    def counted(size: int) -> local_files._Buffer:
        mapped.append(size)
        return real_map(size)

    monkeypatch.setattr(local_files, "_map", counted)
    path = tmp_path / "last.ckpt"
    with config.override(direct_buffer_bytes=1 << 20):
        Fabric().save(path, big_state(8))
        assert mapped == [1 << 20, 1 << 20]  # both buffers of the first save are new
        kept = empty_pool.kept()
        assert [len(buffer) for buffer in kept] == [1 << 20, 1 << 20]
        second = {k: v + 1 for k, v in big_state(8).items()}
        Fabric().save(path, second)
    assert len(mapped) == 2  # the second save took both from the pool ...
    assert {id(b) for b in empty_pool.kept()} == {id(b) for b in kept}  # ... and gave them back
    loaded = Fabric().load(path)
    assert all(torch.equal(loaded[k], v) for k, v in second.items())


def vm_flags_at(address: int) -> list[str]:
    """The ``VmFlags`` of this process's mapping that holds ``address`` (``/proc/self/smaps``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_large_buffers_sit_on_huge_page_boundaries_and_ask_for_huge_pages() -> None:
    """A 4 MiB direct write from 2 MiB pages is two segments, one request to the disk."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    large, small = local_files._map(4 << 20), local_files._map(512 << 10)
    try:
        for buffer in (large, small):
            assert len(buffer) == buffer.view.nbytes == buffer.size
            buffer.view[:] = b"\x01" * buffer.size  # all of it is writable memory
        start = ctypes.addressof(ctypes.c_char.from_buffer(large.view))
        assert start % (2 << 20) == 0
        small_start = ctypes.addressof(ctypes.c_char.from_buffer(small.view))
        assert "hg" not in vm_flags_at(small_start)  # below one huge page: no advice
        if thp.exists() and "[never]" not in thp.read_text():
            assert "hg" in vm_flags_at(start)  # MADV_HUGEPAGE took
    finally:
        large.close()
        small.close()


def test_the_pool_keeps_two_files_worth(empty_pool: local_files._BufferPool) -> None:
    for size in (1, 2, 3):  # three files' buffers of three sizes, returned in turn
        empty_pool.give(local_files._map(size << 20))
        empty_pool.give(local_files._map(size << 20))
    assert [len(buffer) >> 20 for buffer in empty_pool.kept()] == [2, 2, 3, 3]  # newest kept
    assert len(empty_pool.take(1 << 20)) == 1 << 20  # not kept: a new one
    assert len(empty_pool.kept()) == 4


def _save_in_child(path: str, state: dict[str, Any], parents: list[int], result: Any) -> None:
    inherited = len(local_files._POOL.kept())
    with config.override(direct_buffer_bytes=1 << 20):
        Fabric().save(path, state)  # no torch ops here: OpenMP may hang in a forked child
    result.put((inherited, [id(b) for b in local_files._POOL.kept()] != parents))


@direct_only
def test_a_forked_child_starts_with_an_empty_pool_and_saves(
    tmp_path: Path, empty_pool: local_files._BufferPool
) -> None:
    """The parent's kept buffers are not the child's: both may save at once after a fork."""
    with config.override(direct_buffer_bytes=1 << 20):
        Fabric().save(tmp_path / "parent.ckpt", big_state(8))
    parents = empty_pool.kept()
    assert len(parents) == 2
    childs = {k: v * 2 for k, v in big_state(8).items()}
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(
        target=_save_in_child,
        args=(str(tmp_path / "child.ckpt"), childs, [id(b) for b in parents], result),
    )
    child.start()
    inherited, fresh = result.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert inherited == 0
    assert fresh
    assert empty_pool.kept() == parents  # the parent's pool is untouched
    loaded = Fabric().load(tmp_path / "child.ckpt")
    assert all(torch.equal(loaded[k], v) for k, v in childs.items())


def test_direct_io_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LWCKPT_DIRECT_IO", raising=False)
    assert config._from_env().direct_io is True
    monkeypatch.setenv("LWCKPT_DIRECT_IO", "off")
    assert config._from_env().direct_io is False
    monkeypatch.setenv("LWCKPT_DIRECT_IO", "maybe")
    with pytest.raises(ValueError, match="LWCKPT_DIRECT_IO"):
        config._from_env()
    monkeypatch.delenv("LWCKPT_DIRECT_IO")
    monkeypatch.delenv("LWCKPT_DIRECT_BUFFER_BYTES", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    tunables = config._from_env()
    assert (tunables.direct_buffer_bytes, tunables.piece_buffer_bytes) == (4 << 20, 2 << 20)
    monkeypatch.setenv("LWCKPT_DIRECT_BUFFER_BYTES", "10")  # set: every direct file, rounded up
    tunables = config._from_env()
    assert (tunables.direct_buffer_bytes, tunables.piece_buffer_bytes) == (4096, 4096)


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


crc_switch = pytest.mark.skipif(
    torch_serialization is None, reason="torch < 2.6 has no switch for torch.save's CRC32s"
)


@crc_switch
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


@crc_switch
def test_the_crc32_setting_comes_back_after_a_failed_sharded_save(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError):
        save_sharded(tmp_path / "s", {"a": torch.ones(3), "bad": lambda: None})
    assert torch_serialization.save.compute_crc32 is True


@crc_switch
def test_overlapping_writes_restore_the_setting_only_when_the_last_one_ends() -> None:
    first, second = without_torch_crc32(), without_torch_crc32()
    first.__enter__()
    second.__enter__()
    assert torch_serialization.save.compute_crc32 is False
    first.__exit__(None, None, None)
    assert torch_serialization.save.compute_crc32 is False  # the second write still runs
    second.__exit__(None, None, None)
    assert torch_serialization.save.compute_crc32 is True
