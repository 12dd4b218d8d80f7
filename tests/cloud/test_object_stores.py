"""Fabric on object stores: S3 (moto) and GCS (fake-gcs-server), real servers on 127.0.0.1.

Every test runs on both through ``store`` (a fresh bucket): round trips, overwrites, raw loads,
``load_raw`` of a plain ``torch.save`` file, a missing object, sharded (DCP) checkpoints in one
process and ``consolidate`` on them, and a DDP save/load on two processes (S3 and GCS). Nothing is
mocked.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import CheckpointNotFoundError, CheckpointWriteError, Fabric
from lightweight_ckpt.io import TorchCheckpointIO
from lightweight_ckpt.strategies import DDPStrategy, FSDPStrategy
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.helpers.models import Tiny, fresh_like, make_state, train_steps
from tests.helpers.processes import run_cli
from tests.helpers.servers import (
    GCSFS_LARGE_BODY_WARNING,
    Store,
    cli_storage_options,
    open_store,
)

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    yield from open_store(request, "s3")


def test_round_trip_restores_every_tensor_bitwise(store: Store) -> None:
    url = store.url("run", "last.ckpt")
    fabric = Fabric()
    state = make_state()
    fabric.save(url, state, storage_options=store.storage_options)
    assert store.objects() == ["run/last.ckpt"]  # the object, and no temp key beside it

    target = fresh_like(state)
    assert_states_differ(target, state)
    remainder = fabric.load(url, target, storage_options=store.storage_options)
    assert remainder == {}
    assert_states_equal(target, state)
    assert target["step"] == 2
    assert target["hparams"] == state["hparams"]


@pytest.mark.usefixtures("no_ambient_aws")
@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_checkpoint_io_default_storage_options_serve_every_call(
    s3_store: Store, layout: str
) -> None:
    """``TorchCheckpointIO(storage_options=...)``: "default fsspec options for every path".

    S3 only: on GCS a call that misses them would look for Google credentials and the public
    endpoint, i.e. leave 127.0.0.1.
    """
    io = TorchCheckpointIO(storage_options=s3_store.storage_options)
    strategy = FSDPStrategy(checkpoint_io=io) if layout == "sharded" else "auto"
    fabric = Fabric(strategy=strategy, checkpoint_io=None if layout == "sharded" else io)
    url = s3_store.url("defaults")
    model, optimizer = _trained_mlp()
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2})
    expected = snapshot(model)
    _perturb(model)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(url, state) == {}
    assert_states_equal(model, expected)
    assert state["step"] == 2


def test_overwrite_replaces_the_previous_checkpoint(store: Store) -> None:
    url = store.url("last.ckpt")
    fabric = Fabric()
    first = make_state(steps=1)
    fabric.save(url, first, storage_options=store.storage_options)
    second = make_state(steps=3)
    assert_states_differ(first, second)
    fabric.save(url, second, storage_options=store.storage_options)
    assert store.objects() == ["last.ckpt"]

    target = fresh_like(second)
    fabric.load(url, target, storage_options=store.storage_options)
    assert_states_equal(target, second)
    assert target["step"] == 3


def test_load_without_state_returns_the_raw_dict(store: Store) -> None:
    url = store.url("last.ckpt")
    state = make_state()
    Fabric().save(url, state, storage_options=store.storage_options)
    raw = Fabric().load(url, storage_options=store.storage_options)
    assert sorted(raw) == sorted(state)
    assert_states_equal(raw["model"], state["model"].state_dict())
    assert_states_equal(raw["optimizer"], state["optimizer"].state_dict())
    assert raw["step"] == 2
    assert raw["hparams"] == {"lr": 1e-2, "name": "tiny", "layers": [8, 2]}


def test_load_raw_of_a_plain_torch_save_object(store: Store) -> None:
    torch.manual_seed(7)
    expected = Tiny().state_dict()
    buffer = io.BytesIO()
    torch.save(expected, buffer)
    store.fs.pipe(store.path("friend.pt"), buffer.getvalue())  # uploaded by someone else

    model = Tiny()
    assert_states_differ(model.state_dict(), expected)
    report = Fabric().load_raw(store.url("friend.pt"), model, storage_options=store.storage_options)
    assert report is not None
    assert_states_equal(model.state_dict(), expected)


def test_missing_object_raises_not_found_naming_the_url(store: Store) -> None:
    url = store.url("run", "nothing-here.ckpt")
    state = make_state()
    before = snapshot(state["model"])
    with pytest.raises(CheckpointNotFoundError) as info:
        Fabric().load(url, state, storage_options=store.storage_options)
    assert url in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert_states_equal(state["model"], before)  # nothing changed
    with pytest.raises(CheckpointNotFoundError, match=url):
        Fabric().load_raw(url, Tiny(), storage_options=store.storage_options)
    assert store.objects() == []


def test_saves_release_their_upload_files(store: Store) -> None:
    """A save keeps no reference to its upload once it returned, committed or discarded.

    (fsspec's ``open(..., autocommit=False)``, which saves used before our own writers, kept
    every file in the process-wide filesystem's ``transaction.files``.)
    """
    file_class = "S3PartWriter" if store.protocol == "s3" else "GCSComposeWriter"

    def live_uploads() -> int:
        gc.collect()
        # type(obj), not isinstance: some objects warn when their __class__ is looked up
        return sum(1 for obj in gc.get_objects() if type(obj).__name__ == file_class)

    before = live_uploads()
    url = store.url("last.ckpt")
    for steps in (1, 2, 3):
        Fabric().save(url, make_state(steps=steps), storage_options=store.storage_options)

    def failing_save() -> None:  # the traceback, which holds the upload, goes with this frame
        with pytest.raises(CheckpointWriteError):
            Fabric().save(url, {"bad": lambda: None}, storage_options=store.storage_options)

    failing_save()
    assert live_uploads() == before
    assert store.incomplete_uploads() == []


# -- sharded (DCP) checkpoints in one process ---------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _trained_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 2)
    return model, optimizer


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)


def _sharded_layout(store: Store, prefix: str) -> list[str]:
    keys = [key.removeprefix(prefix + "/") for key in store.objects() if key.startswith(prefix)]
    versions = {key.split("/")[0] for key in keys if key.startswith("v-")}
    assert len(versions) == 1, keys
    (version,) = versions
    # the piece and its checksum record, committed by .metadata
    assert sorted(keys) == [".metadata", f"{version}/__0_0.distcp", f"{version}/__0_0.distcp.crc32"]
    return keys


def test_sharded_save_and_load_in_one_process(store: Store) -> None:
    url = store.url("run", "sharded")
    model, optimizer = _trained_mlp()
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2}, **_opts(store))
    _sharded_layout(store, "run/sharded")  # .metadata and one piece (+ CRCs) in one version

    expected_model = snapshot(model)
    expected_optimizer = snapshot(optimizer)
    _perturb(model)
    assert_states_differ(model, expected_model)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(url, state, **_opts(store)) == {}
    assert state["step"] == 2
    assert_states_equal(model, expected_model)
    assert_states_equal(optimizer.state_dict()["state"], expected_optimizer["state"])

    # a plain Fabric reads the whole dict back
    raw = Fabric().load(url, **_opts(store))
    assert_states_equal(raw["model"], expected_model)
    assert raw["step"] == 2


def test_sharded_overwrite_commits_a_new_version_and_removes_the_old(store: Store) -> None:
    url = store.url("run", "sharded")
    model, _ = _trained_mlp()
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(url, {"model": model, "step": 1}, **_opts(store))
    first_layout = _sharded_layout(store, "run/sharded")
    _perturb(model)
    fabric.save(url, {"model": model, "step": 2}, **_opts(store))
    second_layout = _sharded_layout(store, "run/sharded")
    assert second_layout != first_layout

    fresh = _mlp()
    assert_states_differ(fresh, model)
    state: dict[str, Any] = {"model": fresh, "step": 0}
    fabric.load(url, state, **_opts(store))
    assert_states_equal(fresh, model)
    assert state["step"] == 2


def _opts(store: Store) -> dict[str, Any]:
    return {"storage_options": store.storage_options}


def test_consolidate_cli_reads_a_sharded_checkpoint_from_the_store(
    store: Store, tmp_path: Path
) -> None:
    url = store.url("sharded")
    model, optimizer = _trained_mlp()
    Fabric(strategy=FSDPStrategy()).save(
        url, {"model": model, "optimizer": optimizer, "step": 2, "tag": "run-1"}, **_opts(store)
    )
    out = tmp_path / "full.pt"
    result = run_cli(
        "consolidate",
        url,
        str(out),
        # every option, typed: S3's client_kwargs={"region_name": ...} is a dict
        *cli_storage_options(store.storage_options),
    )
    assert result.returncode == 0, result.stderr
    consolidated = torch.load(out, weights_only=True)
    assert_states_equal(consolidated["model"], model.state_dict())
    assert consolidated["step"] == 2
    assert consolidated["tag"] == "run-1"
    assert_states_equal(Fabric().load(out)["model"], model.state_dict())  # CRCs check out


# -- DDP: two processes save to the store, both load ---------------------------------------------


def _ddp_round_trip(rank: int, world_size: int, url: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(Tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # different data per rank
    train_steps(model, optimizer, 2)
    fabric = Fabric()
    assert isinstance(fabric.strategy, DDPStrategy)
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 2}, storage_options=options)

    # the checkpoint holds rank 0's state; every rank restores it
    expected = [{"model": snapshot(model.module), "optimizer": snapshot(optimizer)}]
    torch.distributed.broadcast_object_list(expected, src=0)
    _perturb(model)
    for entry in optimizer.state.values():
        entry["exp_avg"].add_(1.0)
    assert_states_differ(model.module, expected[0]["model"])
    assert_states_differ(optimizer, expected[0]["optimizer"])
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(url, state, storage_options=options) == {}
    assert state["step"] == 2
    assert_states_equal(model.module, expected[0]["model"])
    assert_states_equal(optimizer, expected[0]["optimizer"])
    fabric.barrier()


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_world_2_saves_to_the_store_and_every_rank_loads(store: Store, tmp_path: Path) -> None:
    url = store.url("ddp", "last.ckpt")
    run_distributed(_ddp_round_trip, 2, tmp_path, args=(url, store.storage_options))
    assert store.objects() == ["ddp/last.ckpt"]
    # and it loads into a plain model in this process
    model = Tiny()
    before = snapshot(model)
    Fabric().load(url, {"model": model}, strict=False, storage_options=store.storage_options)
    assert_states_differ(model, before)
