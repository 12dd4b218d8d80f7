"""``gc`` / ``manager.orphans``: leftovers of killed saves, found by age, removed on request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightweight_ckpt import Fabric, InvalidCheckpointError
from lightweight_ckpt.cli import consolidate
from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.manager.orphans import find_orphans, remove_orphans
from tests.helpers.processes import run_cli as cli

HOUR = 3600


def age(path: Path, seconds: float) -> None:
    """Make ``path`` (and everything under it) look ``seconds`` old."""
    then = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (then, then))


def killed_save(target: Path) -> Path:
    """SIGKILL a real save mid-write; return the temp file it left behind."""
    script = (
        "import torch, lightweight_ckpt.formats.torch_writer as tf\n"
        "import os, signal\n"
        "real = tf._RecordWriter.write_record\n"
        "def dying(self, name, data, nbytes):\n"
        "    if name.startswith('data/'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, name, data, nbytes)\n"
        "tf._RecordWriter.write_record = dying\n"
        "from lightweight_ckpt import Fabric\n"
        f"Fabric().save({str(target)!r}, {{'w': torch.ones(1000)}})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL
    temps = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    assert len(temps) == 1
    return temps[0]


def test_temp_files_of_killed_saves_are_listed_then_deleted(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "good.ckpt", {"w": torch.ones(3)})
    old = killed_save(tmp_path / "a.ckpt")
    young = killed_save(tmp_path / "b.ckpt")
    age(old, 2 * HOUR)

    listed = cli("gc", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert f"would remove temp file {old}" in listed.stdout
    assert young.name not in listed.stdout  # a save may still be writing it
    assert old.exists()  # listing is the default

    report = json.loads(cli("gc", str(tmp_path), "--delete", "--json").stdout)
    assert report["removed"] == [str(old)]
    assert not old.exists()
    assert young.exists()
    assert (tmp_path / "good.ckpt").exists()
    assert [o.path for o in find_orphans(str(tmp_path), older_than_s=0)] == [str(young)]


def sharded(path: Path) -> str:
    version = dcp_dir.new_version()
    io = TorchCheckpointIO()
    io.prepare_sharded(str(path), version)
    io.save_sharded({"w": torch.arange(10.0), "step": 1}, str(path), version)
    return version


def test_unreferenced_sharded_versions_are_orphans_the_committed_one_never(
    tmp_path: Path,
) -> None:
    committed = sharded(tmp_path / "ckpt")
    stale = tmp_path / "ckpt" / dcp_dir.new_version()
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 100)  # pieces of a save that died
    age(tmp_path / "ckpt", 2 * HOUR)  # the committed version is old too

    orphans = find_orphans(str(tmp_path))
    assert [(o.kind, o.path, o.nbytes) for o in orphans] == [("stale version", str(stale), 100)]
    (stale / "__0_1.distcp").write_bytes(b"y")  # written just now: a save is running
    assert find_orphans(str(tmp_path)) == []

    age(stale, 2 * HOUR)
    assert remove_orphans(find_orphans(str(tmp_path))) == [str(stale)]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".metadata", committed]
    consolidate(str(tmp_path / "ckpt"), str(tmp_path / "full.pt"))  # still loads
    assert torch.equal(torch.load(tmp_path / "full.pt", weights_only=True)["w"], torch.arange(10.0))


def test_a_damaged_sharded_checkpoint_is_left_alone(tmp_path: Path) -> None:
    sharded(tmp_path / "ckpt")
    (tmp_path / "ckpt" / dcp_dir.new_version()).mkdir()
    (tmp_path / "ckpt" / ".metadata").write_bytes(b"not a pickle")
    age(tmp_path / "ckpt", 2 * HOUR)
    assert find_orphans(str(tmp_path)) == []


def test_an_interrupted_first_sharded_save_is_an_orphan(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt" / dcp_dir.new_version()
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"z" * 10)
    age(tmp_path / "ckpt", 2 * HOUR)
    assert [o.path for o in find_orphans(str(tmp_path / "ckpt"))] == [str(folder)]


def test_bad_arguments(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", {"w": torch.ones(1)})
    with pytest.raises(InvalidCheckpointError, match="is a file"):
        find_orphans(str(tmp_path / "a.ckpt"))
    with pytest.raises(ValueError, match="older_than_s"):
        find_orphans(str(tmp_path), older_than_s=-1)
    missing = cli("gc", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert str(tmp_path / "nowhere") in missing.stderr
