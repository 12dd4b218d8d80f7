"""Property tests: whatever nested state goes in comes back bitwise, filters and sharing included.

The expected checkpoint is computed here, independently of ``lightweight_ckpt.state``; every file is
also read back with plain ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import itertools
import math
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR on import: do it at collection
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from lightweight_ckpt import Fabric

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# -- building values ------------------------------------------------------------------------


def random_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaNs, infinities and subnormals included)."""
    generator = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator) == 1
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


shapes = st.lists(st.integers(0, 4), max_size=3)
fresh_tensors = st.builds(random_tensor, shapes, st.sampled_from(DTYPES), st.integers(0, 2**31 - 1))


@st.composite
def derived_tensors(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    """The same tensor object again, or a view/slice of it: storage shared in the checkpoint."""
    base = pool[draw(st.integers(0, len(pool) - 1))]
    kind = draw(st.sampled_from(["same", "flat-slice", "strided", "first-dim"]))
    if kind == "same":
        return base
    flat = base.reshape(-1)
    if kind == "flat-slice":
        start = draw(st.integers(0, flat.numel()))
        stop = draw(st.integers(start, flat.numel()))
        return flat[start:stop]
    if kind == "strided":
        return flat[draw(st.integers(0, 1)) :: 2]
    return base[1:] if base.dim() else base


@st.composite
def plain_states(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(st.lists(fresh_tensors, min_size=1, max_size=3))
    tensor_leaves = fresh_tensors | derived_tensors(pool)
    plain_leaves = (
        st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=8)
        | st.booleans()
        | st.none()
    )
    leaves = st.one_of(tensor_leaves, tensor_leaves, tensor_leaves, plain_leaves)  # ~half tensors
    names = st.text(min_size=1, max_size=6)
    tree = st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=3)
            | st.lists(children, max_size=3).map(tuple)
            | st.dictionaries(names, children, max_size=4)
        ),
        max_leaves=12,
    )
    # dict-valued entries are the ones a filter may target; make sure some exist
    entry = st.dictionaries(names, tree, max_size=5) | tree
    state = draw(st.dictionaries(names, entry, max_size=4))
    state["tensors"] = draw(st.dictionaries(names, tensor_leaves, min_size=1, max_size=4))
    return state


@st.composite
def filters_for(draw: st.DrawFn, state: dict[str, Any]) -> dict[str, frozenset[str]]:
    """For some dict-valued entries, the set of item names a filter keeps."""
    chosen = {}
    for key, value in state.items():
        if isinstance(value, dict) and draw(st.booleans()):
            chosen[key] = frozenset(draw(st.sets(st.sampled_from(sorted(value)))) if value else ())
    return chosen


def keep_fn(names: frozenset[str]) -> Any:
    return lambda name, value: name in names


# -- comparing ------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype)  # fresh: stride 1 even for 1 element
    flat.copy_(tensor.detach().reshape(-1))
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def assert_bitwise(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, where
        assert actual.stride() == expected.stride() or actual.numel() <= 1, where
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{where}: bytes differ"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys or their order differ"
        for key in expected:
            assert_bitwise(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise(a, e, f"{where}.{index}")
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), where
    else:
        assert actual == expected, where


def tensor_pairs(actual: Any, expected: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(expected, torch.Tensor):
        return [(actual, expected)]
    if isinstance(expected, dict):
        return [p for key in expected for p in tensor_pairs(actual[key], expected[key])]
    if isinstance(expected, list | tuple):
        return [p for a, e in zip(actual, expected, strict=True) for p in tensor_pairs(a, e)]
    return []


def assert_sharing_preserved(actual: Any, expected: Any) -> None:
    """Tensors sharing a storage before the save share one after the load, at the same offsets."""
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for got, want in tensor_pairs(actual, expected):
        if want.untyped_storage().nbytes():
            groups.setdefault(want.untyped_storage().data_ptr(), []).append((got, want))
    for members in groups.values():
        pointers = {got.untyped_storage().data_ptr() for got, _ in members}
        assert len(pointers) == 1, "tensors that shared a storage were saved apart"
        for got, want in members:
            assert got.storage_offset() == want.storage_offset()


def expected_checkpoint(state: dict[str, Any], kept: dict[str, frozenset[str]]) -> dict[str, Any]:
    expected = {}
    for key, value in state.items():
        if key in kept:
            expected[key] = {name: item for name, item in value.items() if name in kept[key]}
        else:
            expected[key] = value
    return expected


def checkpoint_path(directory: str, where: str) -> str:
    if where == "local":
        return str(Path(directory) / "nested" / "state.ckpt")
    return f"memory://props/{uuid.uuid4().hex}/state.ckpt"


# -- properties -----------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), where=st.sampled_from(["local", "memory"]))
def test_saved_state_loads_back_bitwise_with_filters(data, where):
    state = data.draw(plain_states(), label="state")
    kept = data.draw(filters_for(state), label="filters")
    expected = expected_checkpoint(state, kept)
    pairs = tensor_pairs(expected, expected)
    storages = {t.untyped_storage().data_ptr() for _, t in pairs if t.untyped_storage().nbytes()}
    event(f"tensors: {min(len(pairs), 5)}+, shared storage: {len(storages) < len(pairs)}")
    event(f"filtered entries: {len(kept)}")

    with tempfile.TemporaryDirectory() as directory:
        path = checkpoint_path(directory, where)
        fabric = Fabric()
        fabric.save(path, state, filter={key: keep_fn(names) for key, names in kept.items()})

        loaded = fabric.load(path)
        assert_bitwise(loaded, expected)
        assert_sharing_preserved(loaded, expected)

        if where == "local":
            plain = torch.load(path, weights_only=True)
            assert_bitwise(plain, expected)
            assert_sharing_preserved(plain, expected)


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, torch.dtype]:
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out, bias=draw(st.booleans())))
        if index == 0 and draw(st.booleans()):
            layers.append(nn.BatchNorm1d(fan_out))
    dtype = draw(st.sampled_from(MODEL_DTYPES))
    model = nn.Sequential(*layers).to(dtype)
    for tensor in model.state_dict().values():
        seed = draw(st.integers(0, 2**31 - 1))
        tensor.copy_(random_tensor(list(tensor.shape), tensor.dtype, seed))
    return model, dtype


def perturb(model: nn.Module) -> None:
    """Flip every bit of every parameter and buffer, in place."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.reshape(-1).view(torch.uint8).bitwise_not_()


@SETTINGS
@given(
    built=models(),
    extra=st.dictionaries(st.text(min_size=1, max_size=4), fresh_tensors, max_size=3),
    where=st.sampled_from(["local", "memory"]),
)
def test_load_restores_a_perturbed_state_exactly(built, extra, where):
    model, _ = built
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = {"model": model, "extra": extra, "step": 3}

    with tempfile.TemporaryDirectory() as directory:
        path = checkpoint_path(directory, where)
        fabric = Fabric()
        fabric.save(path, state)

        perturb(model)
        identity = {n: (id(t), t.data_ptr()) for n, t in model.state_dict(keep_vars=True).items()}
        for name, tensor in model.state_dict().items():
            assert tensor_bytes(tensor) != tensor_bytes(saved[name]) or tensor.numel() == 0
        target = {"model": model, "extra": {}, "step": 0}

        remainder = fabric.load(path, target)

    assert remainder == {}
    assert_bitwise(dict(model.state_dict()), saved, "model")
    after = {n: (id(t), t.data_ptr()) for n, t in model.state_dict(keep_vars=True).items()}
    assert after == identity, "parameters were replaced, not restored in place"
    assert_bitwise(target["extra"], extra, "extra")
    assert target["step"] == 3
