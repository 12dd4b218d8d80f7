"""Checkpoints written under one strategy load under another, bitwise; strictness on sharded loads.

DDP file → FSDP2 model, FSDP full file → DDP model, sharded FSDP directory → DDP model,
``load_raw`` of a plain ``torch.save(model.state_dict())`` file into FSDP1/FSDP2 models, save
filters and several models in one sharded checkpoint, strict/non-strict sharded loads, and a
sharded save to ``memory://`` in one process. Real processes, gloo on CPU, nothing mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lightweight_ckpt import Fabric, MissingKeysError, StateMismatchError
from lightweight_ckpt.compat import fully_shard
from lightweight_ckpt.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.strategies.test_matrix import (
    FULL,
    build,
    from_rank_zero,
    mlp,
    perturb,
    reference,
    train_steps,
    wrap,
)


def by_name(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An index-keyed optimizer ``state`` (``optimizer.state_dict()``) keyed by parameter name."""
    names = [name for name, _ in model.named_parameters()]
    return {names[index]: entry for index, entry in optimizer_state.items()}


def full_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's gathered state dict, cloned."""
    return snapshot(get_model_state_dict(model, options=FULL))


def gather_error_types(error: BaseException | None) -> list[str | None]:
    """Every rank's exception type name (None where it raised nothing)."""
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, None if error is None else type(error).__name__)
    return names


# -- DDP file → FSDP2 model ----------------------------------------------------------------------


def _ddp_file_into_fsdp(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "ddp.pt")
    ddp, ddp_optimizer = build("ddp", arch="mlp")
    Fabric(strategy="ddp").save(path, {"model": ddp, "optimizer": ddp_optimizer, "step": 2})
    expected = from_rank_zero(reference("ddp", ddp, ddp_optimizer))
    expected_by_name = by_name(ddp.module, expected["optimizer"]["state"])

    # weights only
    model, optimizer = build(kind, seed=5, steps=1)
    assert_states_differ(reference(kind, model, optimizer)["model"], expected["model"])
    fabric = Fabric()
    remainder = fabric.load(path, {"model": model})
    assert isinstance(fabric.strategy, FSDPStrategy)
    assert set(remainder) == {"optimizer", "step"}
    assert_states_equal(reference(kind, model, optimizer)["model"], expected["model"])

    # weights and optimizer: the index-keyed DDP optimizer state lands on the named parameters
    # (FSDP1: renamed to the names of the parameters its flattened optimizer updates)
    model, optimizer = build(kind, seed=5, steps=1)
    perturb(model, optimizer)
    assert_states_differ(reference(kind, model, optimizer)["optimizer"]["state"], expected_by_name)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(path, state) == {}
    assert state["step"] == 2
    after = reference(kind, model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"]["state"], expected_by_name)
    assert after["optimizer"]["param_groups"][0]["lr"] == 1e-2
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_ddp_file_into_fsdp_model(tmp_path: Path, kind: str) -> None:
    run_distributed(_ddp_file_into_fsdp, 2, tmp_path, args=(kind, str(tmp_path)))


# -- FSDP full file → DDP model ------------------------------------------------------------------


def _full_file_into_ddp(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, f"{kind}-full.pt")
    model, optimizer = build(kind)
    Fabric(strategy=FSDPStrategy(state_dict_type="full")).save(
        path, {"model": model, "optimizer": optimizer, "step": 2}
    )
    expected = reference(kind, model, optimizer)  # the same, gathered, on every rank

    ddp, ddp_optimizer = build("ddp", seed=5, arch="mlp")
    perturb(ddp, ddp_optimizer)
    assert_states_differ(ddp.module, expected["model"])
    fabric = Fabric(strategy="ddp")
    state = {"model": ddp, "optimizer": ddp_optimizer, "step": 0}
    assert fabric.load(path, state) == {}
    assert isinstance(fabric.strategy, DDPStrategy)
    assert state["step"] == 2
    assert_states_equal(ddp.module, expected["model"])
    loaded = ddp_optimizer.state_dict()
    assert_states_equal(by_name(ddp.module, loaded["state"]), expected["optimizer"]["state"])
    assert loaded["param_groups"][0]["lr"] == 1e-2
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_fsdp_full_file_into_ddp_model(tmp_path: Path, kind: str) -> None:
    run_distributed(_full_file_into_ddp, 2, tmp_path, args=(kind, str(tmp_path)))


# -- sharded FSDP directory → DDP model ----------------------------------------------------------


def _sharded_into_ddp(rank: int, world_size: int, directory: str, with_optimizer: bool) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = build("fsdp2")
    Fabric().save(path, {"model": model, "optimizer": optimizer, "step": 2})
    expected = reference("fsdp2", model, optimizer)
    ddp, ddp_optimizer = build("ddp", seed=5, arch="mlp")
    assert_states_differ(ddp.module, expected["model"])
    fabric = Fabric()

    if not with_optimizer:  # weights: every rank reads the whole tensors into its replica
        state: dict[str, Any] = {"model": ddp, "step": 0}
        remainder = fabric.load(path, state)
        assert isinstance(fabric.strategy, DDPStrategy)
        assert state["step"] == 2
        assert set(remainder) == {"optimizer"}
        assert_states_equal(ddp.module, expected["model"])
        fabric.barrier()
        return

    # weights and optimizer: both restored bitwise on every rank (names → DDP's indices)
    perturb(ddp, ddp_optimizer)
    before = ddp_optimizer.state_dict()
    assert_states_differ(by_name(ddp.module, before["state"]), expected["optimizer"]["state"])
    state = {"model": ddp, "optimizer": ddp_optimizer, "step": 0}
    assert fabric.load(path, state) == {}  # strict=True
    assert state["step"] == 2
    assert_states_equal(ddp.module, expected["model"])
    loaded = ddp_optimizer.state_dict()
    assert_states_equal(by_name(ddp.module, loaded["state"]), expected["optimizer"]["state"])
    assert loaded["param_groups"][0]["lr"] == 1e-2  # perturb set 0.5
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("with_optimizer", [False, True], ids=["weights", "weights+optimizer"])
def test_sharded_checkpoint_into_ddp_model(tmp_path: Path, with_optimizer: bool) -> None:
    run_distributed(_sharded_into_ddp, 2, tmp_path, args=(str(tmp_path), with_optimizer))


def test_sharded_checkpoint_into_plain_model_and_optimizer(tmp_path: Path) -> None:
    # one process, no process group: written by FSDPStrategy, read back by "auto" (single device)
    path = tmp_path / "sharded"
    model, optimizer = build("plain", arch="mlp")
    Fabric(strategy=FSDPStrategy()).save(path, {"model": model, "optimizer": optimizer})
    expected = reference("plain", model, optimizer)
    model, optimizer = build("plain", seed=5, arch="mlp")
    perturb(model, optimizer)
    before = reference("plain", model, optimizer)
    assert_states_differ(before["model"], expected["model"])
    assert_states_differ(before["optimizer"], expected["optimizer"])
    fabric = Fabric()
    assert fabric.load(path, {"model": model, "optimizer": optimizer}) == {}  # strict=True
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert_states_equal(reference("plain", model, optimizer), expected)


# -- stock torch.distributed.checkpoint.load reads our directory -------------------------------


def _stock_dcp_load(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(directory, "sharded")
    model, optimizer = build("fsdp2")
    Fabric().save(path, {"model": model, "optimizer": optimizer, "step": 2})
    expected = reference("fsdp2", model, optimizer)

    model, optimizer = build("fsdp2", seed=5, steps=1)
    perturb(model, optimizer)
    before = reference("fsdp2", model, optimizer)
    assert_states_differ(before["model"], expected["model"])
    assert_states_differ(before["optimizer"], expected["optimizer"])
    # DCP's documented recipe, nothing of ours on the way in
    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optimizer_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
    )
    assert_states_equal(reference("fsdp2", model, optimizer), expected)
    dist.barrier()


@pytest.mark.distributed
def test_stock_dcp_load_reads_our_sharded_checkpoint(tmp_path: Path) -> None:
    run_distributed(_stock_dcp_load, 2, tmp_path, args=(str(tmp_path),))


# -- load_raw of a plain torch.save file into FSDP1 / FSDP2 ------------------------------------


def _load_raw_sharded(rank: int, world_size: int, path: str) -> None:
    expected = torch.load(path, weights_only=True)
    for kind in ("fsdp1", "fsdp2"):
        model, optimizer = build(kind, seed=5, steps=1)
        assert_states_differ(reference(kind, model, optimizer)["model"], expected)
        fabric = Fabric()
        report = fabric.load_raw(path, model)
        assert isinstance(fabric.strategy, FSDPStrategy)
        assert report.clean
        assert fabric.last_load_report is report
        assert_states_equal(reference(kind, model, optimizer)["model"], expected)
        train_steps(model, optimizer, 1)  # the restored model trains on every rank alike


@pytest.mark.distributed
def test_load_raw_plain_file_into_fsdp1_and_fsdp2(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(mlp(seed=7).state_dict(), path)
    run_distributed(_load_raw_sharded, 2, tmp_path, args=(str(path),))


# -- filter on a sharded save; several models and optimizers in one sharded checkpoint --------


def _filtered_and_multi(rank: int, world_size: int, directory: str) -> None:
    model, optimizer = build("fsdp2")
    fabric = Fabric()
    keep_weights = {"model": lambda name, value: name.endswith("weight")}
    fabric.save(
        os.path.join(directory, "filtered"),
        {"model": model, "optimizer": optimizer, "step": 2},
        filter=keep_weights,
    )
    expected = reference("fsdp2", model, optimizer)
    if rank == 0:
        torch.save(expected, os.path.join(directory, "filtered-expected.pt"))

    # two FSDP2 models, each with its own AdamW, different weights: nothing may be swapped
    model_a, optimizer_a = build("fsdp2", seed=1)
    model_b, optimizer_b = build("fsdp2", seed=2)
    path = os.path.join(directory, "multi")
    state = {"a": model_a, "opt_a": optimizer_a, "b": model_b, "opt_b": optimizer_b, "step": 3}
    fabric.save(path, state)
    expected_a = reference("fsdp2", model_a, optimizer_a)
    expected_b = reference("fsdp2", model_b, optimizer_b)
    assert_states_differ(expected_a["model"], expected_b["model"])
    if rank == 0:
        multi = {"a": expected_a["model"], "b": expected_b["model"]}
        torch.save(multi, os.path.join(directory, "multi-expected.pt"))
    perturb(model_a, optimizer_a)
    perturb(model_b, optimizer_b)
    assert_states_differ(reference("fsdp2", model_a, optimizer_a), expected_a)
    assert_states_differ(reference("fsdp2", model_b, optimizer_b), expected_b)
    state["step"] = 0
    assert fabric.load(path, state) == {}
    assert state["step"] == 3
    assert_states_equal(reference("fsdp2", model_a, optimizer_a), expected_a)
    assert_states_equal(reference("fsdp2", model_b, optimizer_b), expected_b)
    fabric.barrier()


@pytest.mark.distributed
def test_filter_and_several_models_in_one_sharded_checkpoint(tmp_path: Path) -> None:
    run_distributed(_filtered_and_multi, 2, tmp_path, args=(str(tmp_path),))
    expected = torch.load(tmp_path / "filtered-expected.pt", weights_only=True)
    # read back in one process without a process group: only the weights were saved
    raw = Fabric().load(tmp_path / "filtered")
    assert set(raw) == {"model", "optimizer", "step"}
    weights = {k: v for k, v in expected["model"].items() if k.endswith("weight")}
    assert set(raw["model"]) == set(weights) == {"0.weight", "2.weight", "4.weight"}
    assert_states_equal(raw["model"], weights)
    assert raw["step"] == 2
    assert_states_equal(raw["optimizer"]["state"], expected["optimizer"]["state"])
    # the two-model checkpoint loads into two plain models in one process, none swapped
    multi = torch.load(tmp_path / "multi-expected.pt", weights_only=True)
    plain_a, plain_b = mlp(seed=8), mlp(seed=9)
    state: dict[str, Any] = {"b": plain_b, "a": plain_a}
    remainder = Fabric().load(tmp_path / "multi", state)
    assert set(remainder) == {"opt_a", "opt_b", "step"}
    assert_states_equal(plain_a, multi["a"])
    assert_states_equal(plain_b, multi["b"])


# -- strict and non-strict sharded loads ----------------------------------------------------------


def _grown(seed: int) -> nn.Module:
    """``mlp`` plus one more layer (keys "5.weight" / "5.bias" the checkpoint lacks), FSDP2."""
    model = mlp(seed)
    model.append(nn.Linear(4, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _load_error(fabric: Fabric, path: str, state: dict[str, Any]) -> BaseException | None:
    """Run a strict load; return what it raised (on this rank), or None."""
    try:
        fabric.load(path, state, strict=True)
    except BaseException as err:  # noqa: BLE001 - checked by the caller (DCP raises BaseException)
        return err
    return None


def _strictness(rank: int, world_size: int, directory: str) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = build("fsdp2")
    fabric = Fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2})
    expected = reference("fsdp2", model, optimizer)

    # strict=True, a state key the checkpoint lacks: the same error on every rank, no change
    model, optimizer = build("fsdp2", seed=5, steps=1)
    extra, _ = build("fsdp2", seed=6, steps=1)
    before = reference("fsdp2", model, optimizer)
    before_extra = full_model(extra)
    state = {"model": model, "optimizer": optimizer, "ema": extra, "step": 0}
    error = _load_error(fabric, path, state)
    assert isinstance(error, MissingKeysError), repr(error)
    assert isinstance(error, KeyError)
    assert "ema" in str(error)
    assert gather_error_types(error) == ["MissingKeysError"] * world_size
    assert state["step"] == 0
    assert_states_equal(reference("fsdp2", model, optimizer), before)
    assert_states_equal(full_model(extra), before_extra)

    # strict=True, a module key the checkpoint lacks: the same error on every rank, no change
    grown = _grown(seed=5)
    grown_before = full_model(grown)
    error = _load_error(fabric, path, {"model": grown})
    assert isinstance(error, StateMismatchError), repr(error)
    assert "5.weight" in str(error)
    assert gather_error_types(error) == ["StateMismatchError"] * world_size
    assert_states_equal(full_model(grown), grown_before)

    # strict=False: what matches loads bitwise, the rest is reported and left alone
    remainder = fabric.load(path, state, strict=False)
    assert remainder == {}
    assert state["step"] == 2
    assert_states_equal(reference("fsdp2", model, optimizer), expected)
    assert_states_equal(full_model(extra), before_extra)
    report = fabric.last_load_report
    assert report is not None
    assert not report.strict
    assert report.missing_entries == ("ema",)
    assert not report.clean

    fabric.load(path, {"model": grown}, strict=False)
    report = fabric.last_load_report
    assert report is not None
    assert report.entries["model"].missing_keys == ("5.bias", "5.weight")
    assert report.remainder_keys == ("optimizer", "step")
    for name, value in full_model(grown).items():
        wanted = grown_before[name] if name.startswith("5.") else expected["model"][name]
        assert_states_equal(value, wanted)
    fabric.barrier()


@pytest.mark.distributed
def test_strict_and_non_strict_sharded_load(tmp_path: Path) -> None:
    run_distributed(_strictness, 2, tmp_path, args=(str(tmp_path),))


def _narrowed(kind: str) -> nn.Module:
    """``mlp`` with its middle layer 6 wide instead of 8: the same keys, other shapes."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))
    return wrap(kind, model)


def _shortened(kind: str) -> nn.Module:
    """``mlp`` without its last layer: the checkpoint holds keys ("4.*") it lacks."""
    torch.manual_seed(5)
    return wrap(kind, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))


def _strict_mismatches(rank: int, world_size: int, kind: str, directory: str) -> None:
    path = os.path.join(directory, "sharded")
    model, optimizer = build(kind)
    fabric = Fabric()
    fabric.save(path, {"model": model, "optimizer": optimizer})
    expected = full_model(model)
    for make, names in ((_shortened, ["4.bias", "4.weight"]), (_narrowed, ["2.weight"])):
        target = make(kind)
        before = full_model(target)
        error = _load_error(fabric, path, {"model": target})
        assert isinstance(error, StateMismatchError), repr(error)
        assert path in str(error)
        for name in names:
            assert name in str(error)
        assert gather_error_types(error) == ["StateMismatchError"] * world_size
        assert_states_equal(full_model(target), before)  # nothing loaded
    # a missing requested key and a mismatched module: one error names both
    target = _narrowed(kind)
    before = full_model(target)
    error = _load_error(fabric, path, {"model": target, "nope": 1})
    assert isinstance(error, MissingKeysError), repr(error)
    assert "'nope'" in str(error)
    assert "2.weight" in str(error)
    assert_states_equal(full_model(target), before)
    # non-strict: the shortened model takes what it has, bitwise
    target = _shortened(kind)
    fabric.load(path, {"model": target}, strict=False)
    report = fabric.last_load_report
    assert report is not None
    assert report.entries["model"].unexpected_keys == ("4.bias", "4.weight")
    got = full_model(target)
    assert_states_equal(got, {k: v for k, v in expected.items() if not k.startswith("4.")})
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_strict_sharded_load_refuses_unexpected_keys_and_shapes(tmp_path: Path, kind: str) -> None:
    run_distributed(_strict_mismatches, 2, tmp_path, args=(kind, str(tmp_path)))


# -- a sharded save to memory:// in one process, no process group ------------------------------


def test_sharded_save_to_memory_in_one_process() -> None:
    assert not dist.is_initialized()
    url = "memory://run/sharded"
    model, optimizer = build("plain", arch="mlp")
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2})
    fs = fsspec.filesystem("memory")
    names = sorted(os.path.basename(p) for p in fs.ls("/run/sharded", detail=False))
    assert names[0] == ".metadata"
    assert len(names) == 2
    assert names[1].startswith("v-")
    pieces = [os.path.basename(p) for p in fs.ls(f"/run/sharded/{names[1]}", detail=False)]
    assert sorted(pieces) == ["__0_0.distcp", "__0_0.distcp.crc32"]  # piece + its checksums

    expected = reference("plain", model, optimizer)
    perturb(model, optimizer)
    assert_states_differ(reference("plain", model, optimizer)["model"], expected["model"])
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(url, state) == {}
    assert state["step"] == 2
    assert_states_equal(reference("plain", model, optimizer)["model"], expected["model"])
    loaded = optimizer.state_dict()
    assert_states_equal(loaded["state"], expected["optimizer"]["state"])
    assert loaded["param_groups"][0]["lr"] == 1e-2

    # and "auto" in a plain process reads it back as a whole dict
    raw = Fabric().load(url)
    assert_states_equal(raw["model"], expected["model"])
    assert raw["step"] == 2
