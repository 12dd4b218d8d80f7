"""``diff``: per-entry differences across layouts, exit codes, and the tensor comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.cli import consolidate
from lightweight_ckpt.convert import convert
from lightweight_ckpt.diff import compare_tensors, diff_checkpoints
from lightweight_ckpt.io import TorchCheckpointIO
from tests.helpers.processes import run_cli as cli


def base_state() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "model": nn.Linear(4, 3),
        "extra": torch.arange(6, dtype=torch.float32),
        "mask": torch.ones(3, dtype=torch.bool),
        "step": 3,
        "gone": torch.zeros(2),
    }


def test_identical_checkpoints_are_equal_across_layouts(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", base_state())
    convert(str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"))
    same = cli("diff", str(tmp_path / "a.ckpt"), str(tmp_path / "a.ckpt"))
    assert same.returncode == 0, same.stderr
    assert "equal" in same.stdout
    # tensors match the safetensors copy; its plain values come back from the metadata too
    report = diff_checkpoints(str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"))
    assert report.equal, report.differences
    assert report.compared == 6


def test_every_kind_of_difference_is_reported(tmp_path: Path) -> None:
    a = base_state()
    Fabric().save(tmp_path / "a.ckpt", a)
    b = base_state()
    with torch.no_grad():
        b["model"].weight[1, 2] += 0.5  # type: ignore[union-attr]
    b["extra"] = torch.arange(6, dtype=torch.float64)
    b["mask"] = torch.ones(4, dtype=torch.bool)
    b["step"] = 4
    del b["gone"]
    b["new"] = torch.ones(1)
    Fabric().save(tmp_path / "b.ckpt", b)

    result = cli("diff", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["equal"] is False
    kinds = {d["name"]: d for d in report["differences"]}
    assert {name: d["kind"] for name, d in kinds.items()} == {
        "gone": "removed",
        "new": "added",
        "model.weight": "value",
        "extra": "dtype",
        "mask": "shape",
        "step": "value",
    }
    assert kinds["model.weight"]["changed"] == 1
    assert kinds["model.weight"]["max_abs_diff"] == pytest.approx(0.5)
    assert (kinds["extra"]["a"], kinds["extra"]["b"]) == ("float32", "float64")
    assert (kinds["step"]["a"], kinds["step"]["b"]) == ("3", "4")

    shown = cli("diff", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"))
    assert shown.returncode == 1
    assert "- removed  gone" in shown.stdout
    assert "~ value    model.weight: 1 elements differ, max abs diff 0.5" in shown.stdout


def test_sharded_and_consolidated_compare_equal_then_differ(tmp_path: Path) -> None:
    checkpoint = {"model": {"w": torch.randn(64, 8), "b": torch.randn(8)}, "step": 1}
    io = TorchCheckpointIO()
    io.prepare_sharded(str(tmp_path / "s"), "v-test")
    io.save_sharded(checkpoint, str(tmp_path / "s"), "v-test")
    consolidate(str(tmp_path / "s"), str(tmp_path / "full.pt"))
    assert cli("diff", str(tmp_path / "s"), str(tmp_path / "full.pt")).returncode == 0
    checkpoint["model"]["b"][3] = float("nan")  # type: ignore[index]
    Fabric().save(tmp_path / "nan.pt", checkpoint)
    report = diff_checkpoints(str(tmp_path / "s"), str(tmp_path / "nan.pt"))
    assert [(d.name, d.changed, d.max_abs_diff) for d in report.differences] == [
        ("model.b", 1, math.inf)
    ]


def test_errors_exit_2_naming_the_path(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", {"w": torch.ones(1)})
    result = cli("diff", str(tmp_path / "a.ckpt"), str(tmp_path / "missing.ckpt"))
    assert result.returncode == 2
    assert str(tmp_path / "missing.ckpt") in result.stderr


def test_compare_tensors_counts_and_tolerates() -> None:
    x = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    y = torch.tensor([1.0, float("nan"), 3.001, 5.0])
    assert compare_tensors(x, x) == (0, 0.0)  # NaN equals NaN
    changed, largest = compare_tensors(x, y)
    assert changed == 2
    assert largest == pytest.approx(1.0)
    assert compare_tensors(x, y, atol=0.01) == (1, pytest.approx(1.0))
    ints = torch.tensor([1, 2, 3]), torch.tensor([1, 2, -3])
    assert compare_tensors(*ints) == (1, 6.0)
    with pytest.raises(ValueError, match="atol"):
        diff_checkpoints("a", "b", atol=-1)
