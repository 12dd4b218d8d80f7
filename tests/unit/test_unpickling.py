"""Which unpickler reads a checkpoint's object tree under ``weights_only=True``.

Dense checkpoints take the C-speed restricted unpickler; anything else (sparse tensors, types
allowed with ``add_safe_globals``, refused globals) goes to ``torch.load`` itself, so its rules,
its post-load validation and its messages apply unchanged. These tests read real files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import _weights_only_unpickler

from lightweight_ckpt import Fabric, UnsafeCheckpointError
from lightweight_ckpt.formats import torch_pickle


@dataclasses.dataclass
class Point:
    """A user type that must be allowlisted before ``weights_only`` loads it."""

    x: int
    y: int


def _count_torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_dense_checkpoint_never_reaches_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(4, 3)
    state = {"model": model.state_dict(), "sizes": torch.Size([2, 3]), "dtype": torch.bfloat16}
    extra = {"builtins.set": {1, 2}, "builtins.bytearray": bytearray(b"ab"), "builtins.complex": 1j}
    allowed = _weights_only_unpickler._get_allowed_globals()  # these came in torch 2.5
    state["extra"] = {name: value for name, value in extra.items() if name in allowed}
    path = tmp_path / "dense.pt"
    torch.save(state, path)
    calls = _count_torch_loads(monkeypatch)
    loaded = Fabric().load(path)
    assert calls == []
    assert loaded["sizes"] == torch.Size([2, 3])
    assert loaded["dtype"] is torch.bfloat16
    assert loaded["extra"] == state["extra"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)


def test_sparse_tensor_goes_to_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sparse = torch.sparse_coo_tensor([[0, 2], [1, 0]], [3.0, 4.0], (3, 2), check_invariants=True)
    path = tmp_path / "sparse.pt"
    torch.save({"s": sparse, "d": torch.arange(4.0)}, path)
    calls = _count_torch_loads(monkeypatch)
    loaded = Fabric().load(path)
    assert len(calls) == 1
    assert loaded["s"].is_sparse
    assert torch.equal(loaded["s"].to_dense(), sparse.to_dense())
    assert torch.equal(loaded["d"], torch.arange(4.0))


@contextlib.contextmanager
def _safe_globals(types: list[Any]) -> Iterator[None]:
    """``torch.serialization.safe_globals`` (torch >= 2.5), or add and clear the same globals."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(types):
            yield
        return
    torch.serialization.add_safe_globals(types)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()


def test_safe_globals_are_honoured_through_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "point.pt"
    torch.save({"p": Point(1, 2), "t": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="add_safe_globals"):
        Fabric().load(path)
    with _safe_globals([Point]):
        loaded = Fabric().load(path)
    assert loaded["p"] == Point(1, 2)
    assert torch.equal(loaded["t"], torch.ones(2))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_refused_global_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"t": torch.ones(1), "evil": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        Fabric().load(path)
    assert str(path) in str(excinfo.value)
    assert "this must never run" not in capsys.readouterr().out


def test_fast_unpickler_refuses_what_torch_refuses() -> None:
    """The fast set is a subset of torch's allowlist: nothing outside it resolves."""
    allowed = torch._weights_only_unpickler._get_allowed_globals()
    fast = torch_pickle.fast_globals()
    assert fast, "the fast set is empty: every load would fall back to torch.load"
    assert all(allowed[name] is value for name, value in fast.items())
    assert "torch._utils._rebuild_sparse_tensor" not in fast
    data = pickle.dumps(print)
    unpickler = torch_pickle.FastUnpickler(__import__("io").BytesIO(data))
    with pytest.raises(torch_pickle.OffFastPathError):
        unpickler.load()
