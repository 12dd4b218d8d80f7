"""``convert``: checkpoints to safetensors and back; ties, values, damage, atomicity, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from lightweight_ckpt import CorruptCheckpointError, Fabric
from lightweight_ckpt.convert import convert
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.state import iter_tensors
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.models import make_state
from tests.helpers.processes import run_cli as cli


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (GPT-2 style tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    plain = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    return dict(iter_tensors(plain))


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_roundtrip_through_safetensors_keeps_every_value(tmp_path: Path) -> None:
    state = make_state()
    state["best"] = float("inf")
    Fabric().save(tmp_path / "a.ckpt", state)
    original = torch.load(tmp_path / "a.ckpt", weights_only=True)

    result = cli("convert", str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dropped"] == {}

    # the reference library reads it; names are the dotted paths, values bitwise equal
    loaded = load_file(tmp_path / "a.safetensors")
    expected = flat(original)
    assert set(loaded) == set(expected)
    assert_states_equal(loaded, expected)
    assert "optimizer.state.0.exp_avg" in loaded

    back = cli("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt"))
    assert back.returncode == 0, back.stderr
    restored = torch.load(tmp_path / "b.pt", weights_only=True)
    assert_states_equal(restored, original)  # keys, int keys, tuples, inf, hparams
    assert isinstance(restored["optimizer"]["param_groups"][0]["betas"], tuple)
    assert_states_equal(Fabric().load(tmp_path / "b.pt"), original)  # passes our CRC checks


def test_tied_weights_are_stored_once_and_load_back_tied(tmp_path: Path) -> None:
    model = TiedLM()
    Fabric().save(tmp_path / "lm.ckpt", {"model": model, "step": 1})
    report = convert(
        str(tmp_path / "lm.ckpt"), str(tmp_path / "lm.safetensors"), select_key="model"
    )
    assert report.aliases == {"head.weight": "embed.weight"}
    with safe_open(str(tmp_path / "lm.safetensors"), "pt") as file:
        assert sorted(file.keys()) == ["block.bias", "block.weight", "embed.weight"]
        aliases = json.loads(file.metadata()["lightweight_ckpt.aliases"])
    assert aliases == {"head.weight": "embed.weight"}

    fresh = TiedLM()
    assert_states_differ(fresh.state_dict(), model.state_dict())
    missing, unexpected = load_model(fresh, tmp_path / "lm.safetensors")  # HF's loader
    assert (missing, unexpected) == (set(), [])
    assert_states_equal(fresh.state_dict(), model.state_dict())
    assert fresh.head.weight is fresh.embed.weight

    convert(str(tmp_path / "lm.safetensors"), str(tmp_path / "lm.pt"))
    back = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert back["embed.weight"].untyped_storage().data_ptr() == (
        back["head.weight"].untyped_storage().data_ptr()
    )
    untied = nn.Linear(8, 16, bias=False)
    assert_states_differ(untied.weight, model.embed.weight)
    assert_states_equal(back["head.weight"], model.embed.weight)


def test_a_view_of_a_shared_storage_is_stored_as_a_copy(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    Fabric().save(tmp_path / "v.ckpt", {"whole": base, "half": base[6:], "same": base})
    report = convert(str(tmp_path / "v.ckpt"), str(tmp_path / "v.safetensors"))
    assert report.aliases == {"same": "whole"}
    assert report.copied_views == ["half (a view of whole's storage)"]
    loaded = load_file(tmp_path / "v.safetensors")
    assert torch.equal(loaded["half"], torch.arange(6.0, 12.0))


def test_values_safetensors_cannot_hold_are_reported(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64), "kind": torch.float16}
    Fabric().save(tmp_path / "c.ckpt", state)
    result = cli("convert", str(tmp_path / "c.ckpt"), str(tmp_path / "c.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "left out z: dtype torch.complex64" in result.stderr
    assert "left out kind: a dtype value" in result.stderr
    assert list(load_file(tmp_path / "c.safetensors")) == ["w"]
    convert(str(tmp_path / "c.safetensors"), str(tmp_path / "c.pt"))
    assert list(torch.load(tmp_path / "c.pt", weights_only=True)) == ["w"]


def test_a_corrupt_source_fails_and_writes_nothing(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", {"model": nn.Linear(64, 64)})
    raw = bytearray((tmp_path / "a.ckpt").read_bytes())
    raw[len(raw) // 3] ^= 0x10  # inside the weight's bytes
    (tmp_path / "a.ckpt").write_bytes(bytes(raw))
    result = cli("convert", str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"))
    assert result.returncode == 1
    assert str(tmp_path / "a.ckpt") in result.stderr
    assert "CRC32 mismatch" in result.stderr
    assert not (tmp_path / "a.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_a_truncated_safetensors_file_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        convert(str(tmp_path / "w.safetensors"), str(tmp_path / "w.pt"))
    assert str(tmp_path / "w.safetensors") in str(caught.value)
    assert not (tmp_path / "w.pt").exists()


def test_a_foreign_safetensors_file_becomes_a_flat_state_dict(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int16)}
    save_file(tensors, tmp_path / "f.safetensors", metadata={"format": "pt"})
    convert(str(tmp_path / "f.safetensors"), str(tmp_path / "f.pt"))
    assert_states_equal(torch.load(tmp_path / "f.pt", weights_only=True), tensors)


def test_usage_errors_name_the_problem(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "a.ckpt", {"w": torch.ones(1)})
    result = cli("convert", str(tmp_path / "a.ckpt"), str(tmp_path / "b.pt"))
    assert result.returncode == 2
    assert "consolidate" in result.stderr
    missing = cli("convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "b.safetensors"))
    assert missing.returncode == 1
    assert str(tmp_path / "nope.ckpt") in missing.stderr
    selected = cli("convert", str(tmp_path / "a.ckpt"), str(tmp_path / "b.safetensors"),
                   "--select", "model")  # fmt: skip
    assert selected.returncode == 1
    assert "no entry 'model'" in selected.stderr


def sharded(path: Path, tensors: int, numel: int) -> dict[str, Any]:
    torch.manual_seed(0)
    checkpoint = {
        "model": {f"layer{i}.weight": torch.randn(numel) for i in range(tensors)},
        "step": 7,
    }
    io = TorchCheckpointIO()
    io.prepare_sharded(str(path), "v-test")
    io.save_sharded(checkpoint, str(path), "v-test")
    return checkpoint


def test_a_sharded_checkpoint_converts(tmp_path: Path) -> None:
    expected = sharded(tmp_path / "sharded", tensors=3, numel=1000)
    convert(str(tmp_path / "sharded"), str(tmp_path / "s.safetensors"))
    loaded = load_file(tmp_path / "s.safetensors")
    assert_states_equal(loaded, dict(iter_tensors(expected)))
    convert(str(tmp_path / "s.safetensors"), str(tmp_path / "s.pt"))
    assert_states_equal(torch.load(tmp_path / "s.pt", weights_only=True), expected)


def test_conversion_works_on_another_filesystem() -> None:
    Fabric().save("memory://conv/a.ckpt", {"model": nn.Linear(3, 3), "step": 2})
    convert("memory://conv/a.ckpt", "memory://conv/a.safetensors")
    convert("memory://conv/a.safetensors", "memory://conv/b.ckpt")
    assert_states_equal(
        Fabric().load("memory://conv/b.ckpt"), Fabric().load("memory://conv/a.ckpt")
    )


def test_memory_stays_near_the_largest_tensor(tmp_path: Path) -> None:
    tensors, tensor_mb = 8, 24
    sharded(tmp_path / "sharded", tensors=tensors, numel=tensor_mb * 2**20 // 4)
    script = textwrap.dedent(
        f"""
        import resource
        import torch
        from lightweight_ckpt.convert import convert
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        torch.ones(1)
        before = peak_mb()
        convert({str(tmp_path / "sharded")!r}, {str(tmp_path / "s.safetensors")!r})
        middle = peak_mb()
        convert({str(tmp_path / "s.safetensors")!r}, {str(tmp_path / "s.pt")!r})
        print(middle - before, peak_mb() - before)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    to_st, back = map(float, result.stdout.split())
    whole_mb = tensors * tensor_mb  # 192 MiB; one tensor is 24 MiB
    assert to_st < whole_mb / 2, f"to safetensors: peak grew {to_st:.0f} MiB"
    assert back < whole_mb / 2, f"from safetensors: peak grew {back:.0f} MiB"


def test_a_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightweight_ckpt.entries import OpenCheckpoint

    Fabric().save(tmp_path / "a.ckpt", {"a": torch.ones(10), "b": torch.zeros(10)})
    convert(str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"))
    before = (tmp_path / "a.safetensors").read_bytes()
    real = OpenCheckpoint.load
    loads: list[int] = []

    def dies_on_the_second(self: OpenCheckpoint, tensor: torch.Tensor) -> torch.Tensor:
        loads.append(1)
        if len(loads) == 2:
            raise OSError("the source went away")
        return real(self, tensor)

    monkeypatch.setattr(OpenCheckpoint, "load", dies_on_the_second)
    with pytest.raises(OSError, match="the source went away"):
        convert(str(tmp_path / "a.ckpt"), str(tmp_path / "a.safetensors"))
    loads.clear()
    with pytest.raises(OSError, match="the source went away"):
        convert(str(tmp_path / "a.ckpt"), str(tmp_path / "new.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == before  # the old output is intact
    assert not (tmp_path / "new.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_a_damaged_sharded_checkpoint_fails_before_writing(tmp_path: Path) -> None:
    sharded(tmp_path / "sharded", tensors=2, numel=1000)
    piece = tmp_path / "sharded" / "v-test" / "__0_0.distcp"
    piece.write_bytes(piece.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        convert(str(tmp_path / "sharded"), str(tmp_path / "s.safetensors"))
    assert str(tmp_path / "sharded") in str(caught.value)
    assert not (tmp_path / "s.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_a_key_named_like_the_header_metadata_is_left_out(tmp_path: Path) -> None:
    Fabric().save(tmp_path / "h.ckpt", {"__metadata__": torch.ones(2), "w": torch.zeros(2)})
    report = convert(str(tmp_path / "h.ckpt"), str(tmp_path / "h.safetensors"))
    assert report.dropped == {"__metadata__": "its name is reserved in safetensors headers"}
    assert list(load_file(tmp_path / "h.safetensors")) == ["w"]
