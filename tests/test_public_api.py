"""The public surface: __all__ sorted and complete, API.md's names importable, docs/api.md true."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import lightweight_ckpt
from lightweight_ckpt import Fabric
from lightweight_ckpt.io import CheckpointIO, TorchCheckpointIO
from lightweight_ckpt.strategies import SingleDeviceStrategy, Strategy

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_importable() -> None:
    names = lightweight_ckpt.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(lightweight_ckpt, name), name


def test_fabric_signatures_match_api_md() -> None:
    save = inspect.signature(Fabric.save).parameters
    assert list(save)[:4] == ["self", "path", "state", "filter"]
    load = inspect.signature(Fabric.load).parameters
    assert list(load)[:4] == ["self", "path", "state", "strict"]
    assert load["state"].default is None
    assert load["strict"].default is True
    assert load["weights_only"].kind is inspect.Parameter.KEYWORD_ONLY
    load_raw = inspect.signature(Fabric.load_raw).parameters
    assert list(load_raw)[:4] == ["self", "path", "obj", "strict"]
    init = inspect.signature(Fabric.__init__).parameters
    assert init["strategy"].default == "auto"
    assert init["checkpoint_io"].default is None


def test_checkpoint_io_abstract_methods() -> None:
    assert CheckpointIO.__abstractmethods__ == {
        "save_checkpoint",
        "load_checkpoint",
        "remove_checkpoint",
    }
    assert issubclass(TorchCheckpointIO, CheckpointIO)
    assert issubclass(SingleDeviceStrategy, Strategy)


def test_docs_api_md_names_exist() -> None:
    """Every `lightweight_ckpt...Name` that docs/api.md marks as available imports."""
    text = (ROOT / "docs" / "api.md").read_text()
    available = text.split("## Planned")[0]
    for module, name in re.findall(r"`(lightweight_ckpt(?:\.\w+)*)\.(\w+)`", available):
        imported = __import__(module, fromlist=[name])
        assert hasattr(imported, name), f"docs/api.md names {module}.{name}, which is missing"
