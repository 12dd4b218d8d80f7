"""Checksums of sharded checkpoints: every stored item's CRC32, checked before anything is read.

Each rank writes ``<piece>.crc32`` beside its piece before the commit; a load verifies the items
it reads, and a damaged item fails the load on every rank with nothing changed. ``verify``
checks every piece. Checkpoints written before checksums still load, and say so in the log.
Real processes, gloo on CPU, nothing mocked.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lightweight_ckpt import CorruptCheckpointError, Fabric
from lightweight_ckpt.cli import main as cli_main
from lightweight_ckpt.compat import DTensor
from tests.helpers.asserts import assert_states_equal, states_equal
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import build, perturb, reference
from tests.strategies.test_sharded_faults import (
    _assert_load_refused,
    _save_sharded,
    committed_metadata,
    plain_copy,
    versions,
)

PIECES = ("__0_0.distcp", "__1_0.distcp")
VARIANTS = ("flip-piece-0", "flip-piece-1", "swapped", "missing-record-1")


def _piece(path: Path, name: str) -> Path:
    (version,) = versions(path)
    return path / version / name


def _flip_in_piece(path: Path, piece: str) -> None:
    """Flip one byte in the middle of the largest model item stored in ``piece``."""
    infos = [
        info
        for index, info in committed_metadata(path).storage_data.items()
        if info.relative_path.endswith(piece) and index.fqn.startswith("model.")
    ]
    info = max(infos, key=lambda item: item.length)
    file = path / info.relative_path
    data = bytearray(file.read_bytes())
    data[info.offset + info.length // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _make_variants(directory: Path) -> None:
    base = directory / "base"
    for variant in VARIANTS:
        shutil.copytree(base, directory / variant)
    _flip_in_piece(directory / "flip-piece-0", PIECES[0])
    _flip_in_piece(directory / "flip-piece-1", PIECES[1])
    first, second = (_piece(directory / "swapped", name) for name in PIECES)
    first.rename(first.with_suffix(".tmp"))
    second.rename(first)
    first.with_suffix(".tmp").rename(second)
    Path(str(_piece(directory / "missing-record-1", PIECES[1])) + ".crc32").unlink()


def _local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Clones of this rank's shards of every parameter and optimizer tensor."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [(t.to_local() if isinstance(t, DTensor) else t).clone() for t in tensors]


def _damaged_load_fails_everywhere(rank: int, world_size: int, directory: str) -> None:
    root = Path(directory)
    model, optimizer = build("fsdp2")
    fabric = Fabric()
    fabric.save(root / "base", {"model": model, "optimizer": optimizer, "step": 1})
    expected = reference("fsdp2", model, optimizer)
    if rank == 0:
        _make_variants(root)
    fabric.barrier()
    perturb(model, optimizer)
    before = _local_state(model, optimizer)
    problems = []
    for variant in VARIANTS:
        path = root / variant
        state = {"model": model, "optimizer": optimizer, "step": 0}
        try:
            fabric.load(path, state)
            problems.append(f"{variant}: loaded")
        except CorruptCheckpointError as err:
            damaged = "__1_0.distcp" if variant.endswith("1") else "__0_0.distcp"
            if str(path) not in str(err) or (variant != "swapped" and damaged not in str(err)):
                problems.append(f"{variant}: the message names neither path nor piece: {err}")
        if state["step"] != 0 or not states_equal(_local_state(model, optimizer), before):
            problems.append(f"{variant}: the failed load changed the state")
    assert not problems, f"rank {rank}: {problems}"
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(root / "base", state)  # the undamaged copy loads: the damage made the failures
    assert state["step"] == 1
    assert_states_equal(reference("fsdp2", model, optimizer), expected)


@pytest.mark.distributed
def test_damaged_piece_fails_the_load_on_every_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_distributed(_damaged_load_fails_everywhere, 2, tmp_path, args=(str(tmp_path),))
    base = tmp_path / "base"
    for name in PIECES:  # one record per piece, one row per stored item of that piece
        record = json.loads(Path(str(_piece(base, name)) + ".crc32").read_text())
        stored = [
            info
            for info in committed_metadata(base).storage_data.values()
            if info.relative_path.endswith(name)
        ]
        assert len(record["items"]) == len(stored) > 0
        assert record["size"] == _piece(base, name).stat().st_size
    # verify checks every piece: the pristine checkpoint passes, each damage is named
    expected_problem = {
        "flip-piece-0": "__0_0.distcp: entry 'model.",
        "flip-piece-1": "__1_0.distcp: entry 'model.",
        "swapped": "__1_0.distcp",
        "missing-record-1": "__1_0.distcp.crc32",
    }
    capsys.readouterr()
    assert cli_main(["verify", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    for variant, problem in expected_problem.items():
        assert cli_main(["verify", str(tmp_path / variant), "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert any(problem in line for line in report["problems"]), report
        if variant == "swapped":  # both pieces are wrong
            assert any("__0_0.distcp" in line for line in report["problems"]), report


def test_missing_checksum_record_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    expected = _save_sharded(path)
    record = Path(str(_piece(path, "__0_0.distcp")) + ".crc32")
    record.unlink()
    _assert_load_refused(path, CorruptCheckpointError, expected)
    record.parent.joinpath(record.name).write_text("{not json")
    _assert_load_refused(path, CorruptCheckpointError, expected)


def _strip_checksums(path: Path) -> None:
    """Make ``path`` look like a checkpoint written before checksums existed."""
    metadata = committed_metadata(path)
    assert metadata.storage_meta is not None
    metadata.storage_meta.modules = []
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    for record in path.glob("v-*/*.crc32"):
        record.unlink()


def test_checkpoint_without_checksums_loads_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sharded"
    expected = _save_sharded(path)
    _strip_checksums(path)
    model = plain_copy(expected)
    with caplog.at_level(logging.WARNING, logger="lightweight_ckpt"):
        Fabric().load(path, {"model": model})
    assert_states_equal(model, expected)
    assert any(
        "without checksum records" in r.getMessage() and str(path) in r.getMessage()
        for r in caplog.records
    )
    # ... and a flipped bit there goes unnoticed by design: nothing recorded to check against
    assert cli_main(["verify", str(path)]) == 0


def test_checksums_cost_no_files_outside_the_version_folder(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    _save_sharded(path)
    (version,) = versions(path)
    assert sorted(os.listdir(path)) == [".metadata", version]
    assert sorted(os.listdir(path / version)) == ["__0_0.distcp", "__0_0.distcp.crc32"]
