"""Finding records from the archive's tail: the offsets our writer keeps beside the CRC32s.

On an object store every local zip header read is a request, so ``Fabric.save`` records where
each record's bytes start, and ``read_index`` trusts such a hint only where it is plausible;
a wrong one is caught by the record's CRC32 like any other damage.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from lightweight_ckpt import CorruptCheckpointError, Fabric
from lightweight_ckpt.formats import torch_writer, zip_records
from lightweight_ckpt.location import resolve
from lightweight_ckpt.sources import open_source
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.models import fresh_like, make_state


class _CountingSource:
    """A real source that counts reads of a record's local header (30 bytes at its start)."""

    def __init__(self, path: Path) -> None:
        self._inner = open_source(resolve(path))
        self.url, self.size = self._inner.url, self._inner.size
        self.headers = {i.header_offset for i in zipfile.ZipFile(path).infolist()}
        self.header_reads = 0

    def read_at(self, offset: int, size: int) -> bytes:
        if offset in self.headers and size == zip_records._LOCAL_HEADER.size:
            self.header_reads += 1
        return self._inner.read_at(offset, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _records_from_headers(path: Path) -> dict[str, zip_records.Record]:
    source = open_source(resolve(path))
    try:
        return {
            i.filename: zip_records._locate(source, i) for i in zipfile.ZipFile(path).infolist()
        }
    finally:
        source.close()


def test_hints_match_local_headers_and_save_header_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    state = make_state(width=32)
    state["empty"] = torch.empty(0)
    state["big"] = torch.randn(70_000)
    Fabric().save(path, state)
    truth = _records_from_headers(path)

    source = _CountingSource(path)
    indexed = zip_records.read_index(source)  # type: ignore[arg-type]
    assert {n: r.offset for n, r in indexed.items()} == {n: r.offset for n, r in truth.items()}
    # only records without a hint: the CRC table itself, empty ones, torch's end-of-file records
    unhinted = [
        r
        for r in truth.values()
        if r.size == 0 or "/.data/" in r.name or r.name.endswith("/version")
    ]
    assert 0 < source.header_reads <= len(unhinted) < len(truth) // 2


def test_plain_torch_save_files_are_indexed_from_headers(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(100), "b": torch.randn(3)}, path)
    source = _CountingSource(path)
    indexed = zip_records.read_index(source)  # type: ignore[arg-type]
    assert {n: r.offset for n, r in indexed.items()} == {
        n: r.offset for n, r in _records_from_headers(path).items()
    }
    assert source.header_reads == len(indexed)


def test_a_wrong_hint_fails_the_crc_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.ckpt"
    real = torch_writer._TrackingSink.data_offset

    def shifted(self: Any, nbytes: int) -> int | None:
        offset = real(self, nbytes)
        return None if offset is None else offset + 64  # still plausible, but wrong

    monkeypatch.setattr(torch_writer._TrackingSink, "data_offset", shifted)
    Fabric().save(path, make_state())
    monkeypatch.undo()
    target = fresh_like(make_state())
    before = snapshot(target)
    with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch|damaged"):
        Fabric().load(path, target)
    assert_states_equal(snapshot(target), before)


def test_an_implausible_hint_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.ckpt"
    monkeypatch.setattr(torch_writer._TrackingSink, "data_offset", lambda self, nbytes: 0)
    saved = make_state()
    Fabric().save(path, saved)
    monkeypatch.undo()
    target = fresh_like(saved)
    assert_states_differ(snapshot(target), snapshot(saved))
    Fabric().load(path, target)
    assert_states_equal(snapshot(target), snapshot(saved))
