"""Damaged, truncated and foreign files: every load fails loudly, names the path, changes nothing.

The checkpoints here are real ``torch.save`` zip archives written by ``Fabric.save``; the damage is
done to the bytes on disk (a flipped bit inside a tensor record, a cut-off tail, a corrupted zip
directory), never by mocking the reader.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR at import: do it at collection, not in a test

from lightweight_ckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    Fabric,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from tests.helpers.asserts import (
    as_plain,
    assert_states_differ,
    assert_states_equal,
    snapshot,
    states_equal,
)
from tests.helpers.models import Tiny, fresh_like, make_state

_LOCAL_HEADER = struct.Struct("<4s22xHH")


# -- helpers ----------------------------------------------------------------------------------


def record_spans(path: Path) -> dict[str, tuple[int, int]]:
    """``{record name: (offset of its data, size)}`` from the central directory + local headers."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    data = path.read_bytes()
    spans = {}
    for info in infos:
        header = data[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        assert signature == b"PK\x03\x04"
        assert info.compress_type == zipfile.ZIP_STORED
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        spans[info.filename] = (start, info.file_size)
    return spans


def record_holding(path: Path, tensor: torch.Tensor) -> tuple[str, int, int]:
    """The one ``archive/data/N`` record whose bytes are exactly ``tensor``'s bytes."""
    data = path.read_bytes()
    flat = tensor.detach().contiguous().flatten()
    nbytes = flat.numel() * flat.element_size()
    found = []
    for name, (start, size) in record_spans(path).items():
        if "/data/" not in name or size != nbytes:
            continue
        stored = torch.frombuffer(bytearray(data[start : start + size]), dtype=flat.dtype)
        if torch.equal(stored, flat):
            found.append((name, start, size))
    assert len(found) == 1, f"expected exactly one record holding the tensor, found {found}"
    return found[0]


def entry(tree: Any, dotted: str) -> Any:
    """``tree["optimizer"]["state"][4]["exp_avg_sq"]`` for ``"optimizer.state.4.exp_avg_sq"``.

    Keys may hold dots themselves (``tree["model"]["fc1.weight"]``): the longest key that exists
    wins.
    """
    parts = dotted.split(".")
    while parts:
        for cut in range(len(parts), 0, -1):
            key = ".".join(parts[:cut])
            if key in tree or (key.isdigit() and int(key) in tree):
                tree = tree[key] if key in tree else tree[int(key)]
                parts = parts[cut:]
                break
        else:
            raise KeyError(dotted)
    return tree


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint of ``make_state()`` written by Fabric, and the state it holds."""
    state = make_state()
    path = tmp_path / "last.ckpt"
    Fabric().save(path, state)
    return path, state


def _fresh_target(state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A differently-initialized target and a snapshot of it, proven to differ from ``state``."""
    target = fresh_like(state)
    before = snapshot(target)
    assert_states_differ(before, state)
    return target, before


# -- flipped bits inside records --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "model.fc1.weight",
        "model.fc2.bias",
        "model.norm.running_var",
        "optimizer.state.4.exp_avg_sq",
    ],
)
def test_flipped_bit_in_tensor_data_names_path_record_and_entry(
    saved: tuple[Path, dict[str, Any]], name: str
) -> None:
    path, state = saved
    fabric = Fabric()
    pristine = fabric.load(path)
    record, start, size = record_holding(path, entry(pristine, name))
    flip_byte(path, start + size // 2)

    target, before = _fresh_target(state)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        fabric.load(path, target)
    message = str(excinfo.value)
    assert str(path) in message
    assert repr(record) in message, message
    assert repr(name) in message, message
    # all-or-nothing: not one tensor of the target was written
    assert_states_equal(target, before)

    # a load of the whole dict fails the same way
    with pytest.raises(CorruptCheckpointError) as excinfo:
        fabric.load(path)
    assert str(path) in str(excinfo.value)
    assert repr(name) in str(excinfo.value)


def test_plain_torch_load_silently_returns_the_flipped_data(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    """Why we verify: torch.load does not check the archive's CRC32s."""
    path, state = saved
    weight = state["model"].fc1.weight.detach()
    _, start, size = record_holding(path, weight)
    flip_byte(path, start + size // 2, mask=0x40)

    loaded = torch.load(path, weights_only=True)  # no error at all...
    wrong = loaded["model"]["fc1.weight"]
    assert wrong.shape == weight.shape
    assert (wrong != weight).sum().item() == 1  # ...and one weight is silently wrong

    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        Fabric().load(path)


def test_flipped_byte_in_data_pkl_is_detected(saved: tuple[Path, dict[str, Any]]) -> None:
    path, state = saved
    start, size = record_spans(path)["archive/data.pkl"]
    flip_byte(path, start + size // 2)
    target, before = _fresh_target(state)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(path, target)
    assert str(path) in str(excinfo.value)
    assert "'archive/data.pkl'" in str(excinfo.value)
    assert_states_equal(target, before)


def test_corrupt_file_on_memory_fs_leaves_target_unchanged(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    path, state = saved
    weight = state["model"].fc1.weight
    record, start, size = record_holding(path, weight)
    url = "memory://corrupt/last.ckpt"
    fs = fsspec.filesystem("memory")

    # control: the intact bytes load from memory:// into the target
    fs.pipe("/corrupt/last.ckpt", path.read_bytes())
    control, _ = _fresh_target(state)
    Fabric().load(url, control)
    assert_states_equal(control, state)

    flip_byte(path, start + size // 2)
    fs.pipe("/corrupt/last.ckpt", path.read_bytes())
    target, before = _fresh_target(state)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(url, target)
    assert url in str(excinfo.value)
    assert repr(record) in str(excinfo.value)
    assert_states_equal(target, before)


def test_load_raw_on_corrupt_file_leaves_model_unchanged(tmp_path: Path) -> None:
    source = Tiny()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    fabric = Fabric()

    # control: the intact file loads into a differently-initialized model
    control = Tiny()
    assert_states_differ(control, source)
    fabric.load_raw(path, control)
    assert_states_equal(control, source)

    _, start, size = record_holding(path, source.fc1.weight)
    flip_byte(path, start + size // 2)
    model = Tiny()
    before = snapshot(model)
    assert_states_differ(before, source)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        fabric.load_raw(path, model)
    assert str(path) in str(excinfo.value)
    assert "'fc1.weight'" in str(excinfo.value)
    assert_states_equal(model, before)


# -- truncation -------------------------------------------------------------------------------

TRUNCATIONS = [
    # (id, bytes kept as a function of the full size, expected error)
    ("keep-1-byte", lambda n: 1, InvalidCheckpointError),
    ("keep-3-bytes", lambda n: 3, InvalidCheckpointError),
    ("keep-4-bytes", lambda n: 4, CorruptCheckpointError),
    ("keep-10-bytes", lambda n: 10, CorruptCheckpointError),
    ("keep-22-bytes", lambda n: 22, CorruptCheckpointError),
    ("keep-100-bytes", lambda n: 100, CorruptCheckpointError),
    ("keep-quarter", lambda n: n // 4, CorruptCheckpointError),
    ("keep-half", lambda n: n // 2, CorruptCheckpointError),
    ("drop-200-bytes", lambda n: n - 200, CorruptCheckpointError),
    ("drop-22-bytes", lambda n: n - 22, CorruptCheckpointError),
    ("drop-10-bytes", lambda n: n - 10, CorruptCheckpointError),
    ("drop-1-byte", lambda n: n - 1, CorruptCheckpointError),
]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [pytest.param(keep, expected, id=name) for name, keep, expected in TRUNCATIONS],
)
def test_truncated_checkpoint_raises_and_changes_nothing(
    saved: tuple[Path, dict[str, Any]], keep: Any, expected: type[Exception]
) -> None:
    path, state = saved
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    target, before = _fresh_target(state)
    with pytest.raises(expected) as excinfo:
        Fabric().load(path, target)
    assert not isinstance(excinfo.value, UnsafeCheckpointError)
    assert str(path) in str(excinfo.value)
    assert_states_equal(target, before)


# -- not a checkpoint at all ------------------------------------------------------------------


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.ckpt"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    path.write_bytes(bytes(noise.tolist()))
    with pytest.raises(InvalidCheckpointError) as excinfo:
        Fabric().load(path)
    assert not isinstance(excinfo.value, UnsafeCheckpointError)
    assert str(path) in str(excinfo.value)


def test_empty_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("contents", [[], ["inside.txt"]], ids=["empty", "with-a-file"])
def test_directory_where_a_file_is_expected(tmp_path: Path, contents: list[str]) -> None:
    """A directory that is no sharded checkpoint either (no ``.metadata``) is not a checkpoint."""
    path = tmp_path / "a_dir.ckpt"
    path.mkdir()
    for name in contents:
        (path / name).write_text("not a checkpoint")
    with pytest.raises(InvalidCheckpointError) as excinfo:
        Fabric().load(path)
    assert str(path) in str(excinfo.value)
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(InvalidCheckpointError):
        Fabric().load_raw(path, model)
    assert_states_equal(model, before)


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until someone writes: a load must refuse it instead."""
    path = tmp_path / "pipe.ckpt"
    os.mkfifo(path)
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(InvalidCheckpointError, match="FIFO") as excinfo:
        Fabric().load(path, {"model": model})
    assert str(path) in str(excinfo.value)
    assert_states_equal(model, before)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_missing_path(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "nope.ckpt") if kind == "local" else "memory://nowhere/nope.ckpt"
    with pytest.raises(CheckpointNotFoundError) as excinfo:
        Fabric().load(path, {"model": Tiny()})
    assert isinstance(excinfo.value, FileNotFoundError)
    assert path in str(excinfo.value)
    with pytest.raises(FileNotFoundError):  # what a user of torch.load would catch
        Fabric().load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickled_module_needs_weights_only_false(tmp_path: Path, legacy: bool) -> None:
    module = Tiny()
    path = tmp_path / "module.pt"
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        Fabric().load(path)
    assert str(path) in str(excinfo.value)
    assert "weights_only=False" in str(excinfo.value)

    loaded = Fabric().load(path, weights_only=False)
    assert isinstance(loaded, Tiny)
    assert_states_equal(loaded, module)


def test_legacy_non_zip_file_still_loads(saved: tuple[Path, dict[str, Any]]) -> None:
    _, state = saved
    path = saved[0].with_name("legacy.ckpt")
    checkpoint = {key: as_plain(value) for key, value in state.items()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)

    target, _ = _fresh_target(state)
    remainder = Fabric().load(path, target)
    assert remainder == {}
    assert_states_equal(target, state)
    assert_states_equal(Fabric().load(path), checkpoint)


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello, I am a zip file")
    with pytest.raises(InvalidCheckpointError) as excinfo:
        Fabric().load(path)
    assert not isinstance(excinfo.value, UnsafeCheckpointError)
    assert str(path) in str(excinfo.value)
    assert "data.pkl" in str(excinfo.value) or "not a" in str(excinfo.value)


def test_zip_with_garbage_pickle_is_corrupt_not_unsafe(tmp_path: Path) -> None:
    """data.pkl with an intact CRC but bytes that are no pickle at all.

    This is damage, not an untrusted object: the error must not tell the user to turn
    ``weights_only`` off (which would hand the garbage to the full unpickler).
    """
    path = tmp_path / "garbage.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"garbage, not a pickle")
        archive.writestr("archive/version", b"3\n")
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(path)
    assert not isinstance(excinfo.value, UnsafeCheckpointError), str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_corrupt_legacy_pickle_raises_checkpoint_error(tmp_path: Path) -> None:
    """A legacy (non-zip) file has no checksums; damage must still surface as our error."""
    path = tmp_path / "legacy.ckpt"
    torch.save(
        {"w": torch.arange(3.0), "marker_key": 1}, path, _use_new_zipfile_serialization=False
    )
    assert Fabric().load(path)["marker_key"] == 1  # control: intact file loads
    data = bytearray(path.read_bytes())
    data[data.index(b"marker_key")] = 0xFF  # the key's UTF-8 is now invalid
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(path)
    assert str(path) in str(excinfo.value)


# -- damaged zip directory --------------------------------------------------------------------


def _cd_offset_field(data: bytes) -> tuple[int, int]:
    """(offset, width) of the 'start of central directory' field the reader trusts.

    ``torch.save`` writes a zip64 end record, whose 8-byte field wins; else the classic 4-byte one.
    """
    zip64 = data.rfind(b"PK\x06\x06")
    if zip64 != -1:
        return zip64 + 48, 8
    return data.rindex(b"PK\x05\x06") + 16, 4


DIRECTORY_DAMAGE = [
    # (id, function of (file bytes, central directory start) -> (offset, xor mask))
    ("version-needed-to-extract", lambda data, cd: (cd + 6, 0xFF)),
    ("central-directory-offset-byte-1", lambda data, cd: (_cd_offset_field(data)[0] + 1, 0xFF)),
    ("central-directory-offset-top-byte", lambda data, cd: (sum(_cd_offset_field(data)) - 1, 0xFF)),
]


@pytest.mark.parametrize(
    "where", [pytest.param(where, id=name) for name, where in DIRECTORY_DAMAGE]
)
def test_damaged_zip_directory_raises_checkpoint_error(
    saved: tuple[Path, dict[str, Any]], where: Any
) -> None:
    path, state = saved
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        cd_start = archive.start_dir
    offset, mask = where(data, cd_start)
    flip_byte(path, offset, mask)
    target, before = _fresh_target(state)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        Fabric().load(path, target)
    assert str(path) in str(excinfo.value)
    assert_states_equal(target, before)


def test_every_single_byte_corruption_is_caught_or_harmless(tmp_path: Path) -> None:
    """Flip each byte of the zip directory and many bytes elsewhere of a small checkpoint.

    Each damaged file must either load *exactly* the saved data (the byte was one the reader does
    not depend on, like a timestamp) or raise a ``CheckpointError`` naming the path. A silent wrong
    load, or any other exception, is a failure.
    """
    path = tmp_path / "small.ckpt"
    state = {"w": torch.arange(6.0), "ids": torch.tensor([3, 1, 4], dtype=torch.int64), "step": 3}
    fabric = Fabric()
    fabric.save(path, state)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        cd_start = archive.start_dir
    positions = [*range(0, cd_start, 5), *range(cd_start, len(data))]

    damaged = tmp_path / "damaged.ckpt"
    problems = []
    outcomes = {"loaded": 0, "raised": 0}
    for position in positions:
        corrupt = bytearray(data)
        corrupt[position] ^= 0xFF
        damaged.write_bytes(bytes(corrupt))
        try:
            loaded = fabric.load(damaged)
        except CheckpointError as err:
            outcomes["raised"] += 1
            if str(damaged) not in str(err):
                problems.append((position, "message lacks the path", str(err)[:120]))
        except Exception as err:  # noqa: BLE001 - the point is to report every stray type
            problems.append((position, type(err).__name__, str(err)[:120]))
        else:
            outcomes["loaded"] += 1
            if not states_equal(loaded, state):
                problems.append((position, "silently wrong load", ""))
    assert outcomes["raised"] > 0
    assert not problems, f"{len(problems)} of {len(positions)} damaged files: {problems}"
