"""Property tests: whatever nested state goes in comes back bitwise, filters and sharing included.

The expected checkpoint is computed here, independently of ``lightweight_ckpt.state``; every file is
also read back with plain ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import itertools
import math
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # sets TORCHINDUCTOR_CACHE_DIR on import: do it at collection
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from lightweight_ckpt import Fabric, StateMismatchError

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


def trained_optimizer(model: nn.Module, seed: int) -> torch.optim.Optimizer:
    """SGD with momentum after one step on arbitrary gradients: a buffer per parameter."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, foreach=False)
    for index, param in enumerate(model.parameters()):
        param.grad = random_tensor(list(param.shape), param.dtype, seed + index)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


@st.composite
def subsets(draw: st.DrawFn, names: list[str]) -> frozenset[str] | None:
    """None (no filter) or the names a filter keeps."""
    if not draw(st.booleans()):
        return None
    return frozenset(draw(st.sets(st.sampled_from(names)))) if names else frozenset()


def optimizer_refusal(saved: dict[str, Any], params: list[torch.Tensor]) -> str | None:
    """Why an SGD entry cannot load over ``params`` (computed here, not by the library)."""
    if "state" not in saved or "param_groups" not in saved:
        return "not an optimizer state dict"
    if [len(group["params"]) for group in saved["param_groups"]] != [len(params)]:
        return "parameter groups of sizes"
    for index, entries in saved["state"].items():
        if entries["momentum_buffer"].shape != params[index].shape:
            return "other shapes than its parameters"
    return None


def resized(model: nn.Sequential, dtype: torch.dtype, grow: int) -> nn.Sequential:
    """The same layers with one width one larger: same parameter count, other shapes."""
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    widths = [linears[0].in_features] + [layer.out_features for layer in linears]
    widths[grow % len(widths)] += 1
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            index = len([x for x in layers if isinstance(x, nn.Linear)])
            layers.append(nn.Linear(widths[index], widths[index + 1], bias=layer.bias is not None))
        else:
            layers.append(nn.BatchNorm1d(widths[1]))
    return nn.Sequential(*layers).to(dtype)


def build_twin(kind: str, model: nn.Sequential, dtype: torch.dtype, data: Any) -> nn.Module:
    """The target model: a bit-flipped copy, the same layers resized, or another model."""
    if kind == "flipped copy":
        twin = copy.deepcopy(model)
        perturb(twin)
        return twin
    if kind == "resized":
        return resized(model, dtype, data.draw(st.integers(0, 4), label="grow"))
    return data.draw(models(), label="other model")[0].to(dtype)


def assert_non_strict_model_load(
    model: nn.Module, before: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], entry: Any
) -> None:
    """Each tensor is the saved one where its name is saved with its shape, else as before."""
    want = {
        name: saved[name] if name in saved and saved[name].shape == tensor.shape else tensor
        for name, tensor in before.items()
    }
    assert_bitwise(dict(model.state_dict()), want, "model")
    assert entry.missing_keys == tuple(sorted(set(before) - set(saved)))
    assert entry.unexpected_keys == tuple(sorted(set(saved) - set(before)))
    assert entry.mismatched_shapes == tuple(
        sorted(
            (name, tuple(saved[name].shape), tuple(tensor.shape))
            for name, tensor in before.items()
            if name in saved and saved[name].shape != tensor.shape
        )
    )


@SETTINGS
@given(
    built=models(),
    twin_kind=st.sampled_from(["flipped copy", "resized", "other model"]),
    data=st.data(),
    where=st.sampled_from(["local", "memory"]),
)
def test_filtered_modules_and_optimizers_save_and_load_partially_non_strict(
    built, twin_kind, data, where
):
    """Filters on module, optimizer and dict entries; non-strict loads of a subset of keys.

    The target model is a bit-flipped copy of the saved one, the same layers with one width
    changed, or another model: what matches by name and shape loads. An optimizer entry that
    cannot load whole (filtered, other parameter count or shapes) is refused, strict or not,
    and nothing changes.
    """
    model, dtype = built
    optimizer = trained_optimizer(model, data.draw(st.integers(0, 2**31 - 1), label="grads"))
    extra = data.draw(st.dictionaries(st.text(min_size=1, max_size=4), fresh_tensors, max_size=3))
    state = {"model": model, "optimizer": optimizer, "extra": extra, "step": 3}
    plain = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}
    kept = {
        key: names
        for key in ("model", "optimizer", "extra")
        if (names := data.draw(subsets(sorted(plain[key])), label=f"keep {key}")) is not None
    }
    expected = expected_checkpoint({**plain, "step": 3}, kept)
    requested = data.draw(st.sets(st.sampled_from(sorted(state)), min_size=1), label="requested")
    absent = data.draw(st.sets(st.sampled_from(["gone", "other"])), label="absent")

    twin = build_twin(twin_kind, model, dtype, data)
    fresh = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5, foreach=False)
    refusal = optimizer_refusal(expected["optimizer"], list(twin.parameters()))
    objects = {"model": twin, "optimizer": fresh, "extra": {}, "step": 0, "gone": 1, "other": 2}
    target = {key: objects[key] for key in sorted(requested | absent)}
    identity = {n: (id(t), t.data_ptr()) for n, t in twin.state_dict(keep_vars=True).items()}
    before_model = {n: t.clone() for n, t in twin.state_dict().items()}
    event(f"filtered: {sorted(kept)}, target model: {twin_kind}")
    event(f"optimizer requested: {'optimizer' in target}, refused: {refusal}")

    with tempfile.TemporaryDirectory() as directory:
        path = checkpoint_path(directory, where)
        fabric = Fabric()
        fabric.save(path, state, filter={key: keep_fn(names) for key, names in kept.items()})
        assert_bitwise(fabric.load(path), expected)

        if "optimizer" in target and refusal is not None:  # half an optimizer never loads
            with pytest.raises(StateMismatchError, match=refusal):
                fabric.load(path, target, strict=False)
            assert_bitwise(dict(twin.state_dict()), before_model, "model")
            assert fresh.state_dict()["state"] == {}
            assert all(target[key] == objects[key] for key in ("step", "gone") if key in target)
            del target["optimizer"]
            if not target:
                return
        remainder = fabric.load(path, target, strict=False)

    assert_bitwise(remainder, {k: v for k, v in expected.items() if k not in target})
    report = fabric.last_load_report
    assert report is not None
    assert report.missing_entries == tuple(sorted(absent))
    assert all(target[key] == objects[key] for key in absent)
    if "model" in target:
        assert_non_strict_model_load(twin, before_model, expected["model"], report.entries["model"])
        after = {n: (id(t), t.data_ptr()) for n, t in twin.state_dict(keep_vars=True).items()}
        assert after == identity, "parameters were replaced, not restored in place"
    if "optimizer" in target:
        assert_bitwise(fresh.state_dict(), expected["optimizer"], "optimizer")
    if "extra" in target:
        assert_bitwise(target["extra"], expected["extra"], "extra")
    if "step" in target:
        assert target["step"] == 3
