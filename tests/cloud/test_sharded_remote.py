"""Sharded (DCP) checkpoints on object stores: items read whole, once, and retried.

Real s3fs/gcsfs against the session's moto and fake-gcs-server, through the fault-injecting TCP
proxy (tests/helpers/proxy.py) where a test needs to count or break requests. A sharded save and
load in one process (no process group) exercises the same reader and writer as every rank of a
distributed one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from lightweight_ckpt import CorruptCheckpointError, Fabric
from lightweight_ckpt.config import override
from lightweight_ckpt.formats import dcp_dir, dcp_remote
from lightweight_ckpt.storage import resolve
from lightweight_ckpt.strategies import FSDPStrategy
from tests.cloud.test_cloud_retries import Proxied, _proxied
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.distributed import run_distributed
from tests.helpers.proxy import Fault
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, PROTOCOLS

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]

WIDTH = 512  # a 1 MiB weight and its two AdamW moments: the large stored items


@pytest.fixture(params=PROTOCOLS)
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, request.param)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, 8))


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, WIDTH)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(proxied: Proxied, url: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    model, optimizer = _trained(seed)
    fabric = Fabric(strategy=FSDPStrategy())
    fabric.save(
        url, {"model": model, "optimizer": optimizer, "step": seed}, storage_options=options
    )
    return {"model": snapshot(model), "optimizer": optimizer.state_dict()}


def _load(url: str, options: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    model, optimizer = _trained(99)
    assert_states_differ(snapshot(model), expected["model"])
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    Fabric().load(url, state, storage_options=options)
    return state


def _metadata(proxied: Proxied, url: str) -> Metadata:
    options = proxied.store.storage_options
    return dcp_dir.read_metadata(resolve(url, options))


def _piece_gets(proxied: Proxied) -> list[int]:
    """Sizes of the ranged GETs of piece data (not records, not object metadata)."""
    return [
        size
        for method, target, size, _ in proxied.proxy.requests
        if method == "GET" and "__0_0.distcp" in target and "crc32" not in target and size > 0
    ]


def test_each_item_is_downloaded_once_and_verified(proxied: Proxied) -> None:
    """The items are streamed once, in parallel, through their CRC32; the fill reuses them.

    One ranged GET per I/O thread (two here) on S3 and GCS alike, tiling the piece's items, each
    byte once.
    """
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    items = _metadata(proxied, url).storage_data
    proxied.proxy.requests.clear()

    state = _load(url, proxied.options, expected)

    assert_states_equal(snapshot(state["model"]), expected["model"])
    assert state["step"] == 1
    gets = _piece_gets(proxied)
    total = sum(int(info.length) for info in items.values())
    assert len(gets) == 2  # io_threads streams
    assert sum(gets) == total


def test_a_flipped_bit_fails_the_load_and_changes_nothing(proxied: Proxied) -> None:
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    (piece,) = {info.relative_path for info in _metadata(proxied, url).storage_data.values()}
    path = proxied.store.path("run", "sharded", piece)
    data = bytearray(proxied.store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    proxied.store.fs.pipe_file(path, bytes(data))

    model, opt = _trained(99)
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as info:
        Fabric().load(url, {"model": model, "optimizer": opt}, storage_options=proxied.options)
    assert url in str(info.value)
    assert_states_equal(snapshot(model), before)
    assert_states_differ(before, expected["model"])


@pytest.mark.parametrize("kind", ["drop", "status", "truncate"])
def test_a_transient_fault_reading_an_item_is_retried(proxied: Proxied, kind: str) -> None:
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    fault = proxied.proxy.add(
        Fault(kind, method="GET", path="__0_0.distcp", min_range_bytes=WIDTH * WIDTH, skip=1)
    )

    state = _load(url, proxied.options, expected)

    assert fault.hits == 1
    assert_states_equal(snapshot(state["model"]), expected["model"])


def test_a_transient_fault_writing_a_piece_is_retried(proxied_s3: Proxied) -> None:
    proxied = proxied_s3
    url = proxied.store.url("run", "sharded")
    previous = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    fault = proxied.proxy.add(Fault("status", method="PUT", path="__0_0.distcp(?!\\.crc32)"))

    expected = _save(proxied, url, seed=2, options=proxied.options)

    assert fault.hits == 1
    assert_states_differ(previous["model"], expected["model"])
    state = _load(url, proxied.store.storage_options, expected)
    assert_states_equal(snapshot(state["model"]), expected["model"])
    assert state["step"] == 2


@pytest.fixture
def proxied_s3(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, "s3")


# -- DDP: a remote single file is downloaded once (rank 0) and broadcast ----------------------


def _ddp_load_once(  # noqa: PLR0917 - a run_distributed body takes positional arguments
    rank: int, world_size: int, url: str, direct: Any, proxied: Any, limit: int
) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lightweight_ckpt.strategies import ddp as ddp_module

    ddp_module.READ_ONCE_MAX_BYTES = limit  # this process's own copy of the module

    model, optimizer = _trained(seed=5)  # every rank the same, as DDP keeps them
    ddp = DistributedDataParallel(model)
    fabric = Fabric()
    fabric.save(url, {"model": ddp, "optimizer": optimizer, "step": 5}, storage_options=direct)
    expected = {"model": snapshot(model), "optimizer": optimizer.state_dict()}

    other, other_optimizer = _trained(seed=6 + rank)
    assert_states_differ(snapshot(other), expected["model"])
    state: dict[str, Any] = {"model": other, "optimizer": other_optimizer, "step": 0}
    fabric.load(url, state, storage_options=proxied)
    assert_states_equal(snapshot(other), expected["model"])
    assert_states_equal(other_optimizer.state_dict()["state"], expected["optimizer"]["state"])
    assert state["step"] == 5
    del ddp


@pytest.mark.distributed
@pytest.mark.parametrize(("limit", "reads"), [(1 << 30, 1), (1000, 2)], ids=["once", "too-large"])
def test_ddp_load_of_a_remote_file_downloads_it_once(
    proxied_s3: Proxied, tmp_path: Path, limit: int, reads: int
) -> None:
    """Rank 0 downloads and broadcasts; a file over the limit is read by every rank."""
    url = proxied_s3.store.url("ddp.ckpt")
    options = (proxied_s3.store.storage_options, proxied_s3.options)
    run_distributed(_ddp_load_once, 2, tmp_path, args=(url, *options, limit))
    size = proxied_s3.store.fs.size(proxied_s3.store.path("ddp.ckpt"))
    fetched = sum(
        length
        for method, target, length, _ in proxied_s3.proxy.requests
        if method == "GET" and "ddp.ckpt" in target
    )
    assert reads * size <= fetched < (reads + 0.5) * size


# -- FSDP: a remote full file is downloaded once (rank 0) and broadcast -----------------------


def _fsdp_full_load_once(rank: int, world_size: int, url: str, direct: Any, proxied: Any) -> None:
    from tests.strategies.test_matrix import build, perturb, reference

    model, optimizer = build("fsdp2")
    fabric = Fabric(strategy=FSDPStrategy(state_dict_type="full"))
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": 5}, storage_options=direct)
    expected = reference("fsdp2", model, optimizer)
    perturb(model, optimizer)
    assert_states_differ(reference("fsdp2", model, optimizer)["model"], expected["model"])
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(url, state, storage_options=proxied)
    after = reference("fsdp2", model, optimizer)
    assert_states_equal(after["model"], expected["model"])
    assert_states_equal(after["optimizer"], expected["optimizer"])
    assert state["step"] == 5


@pytest.mark.distributed
def test_fsdp_load_of_a_remote_full_file_downloads_it_once(
    proxied_s3: Proxied, tmp_path: Path
) -> None:
    """Under FSDP too, rank 0 downloads a full file and broadcasts it (was: every rank)."""
    url = proxied_s3.store.url("full.ckpt")
    options = (proxied_s3.store.storage_options, proxied_s3.options)
    run_distributed(_fsdp_full_load_once, 2, tmp_path, args=(url, *options))
    by_two_ranks = _fetched(proxied_s3, "full.ckpt")
    proxied_s3.proxy.requests.clear()
    Fabric().load(url, None, storage_options=proxied_s3.options)  # one read, in one process
    once = _fetched(proxied_s3, "full.ckpt")
    assert once <= by_two_ranks < 1.5 * once  # every rank reading it: twice as much


def _fetched(proxied: Proxied, name: str) -> int:
    return sum(
        length
        for method, target, length, _ in proxied.proxy.requests
        if method == "GET" and name in target
    )


# -- the read: straight into the targets; without a spool, fetched again and checked -----------


def test_tensors_are_read_straight_into_their_targets(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only non-tensor values take DCP's own steps (``torch.load`` of the item, then a copy)."""
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    values = [
        fqn
        for fqn, item in _metadata(proxied, url).state_dict_metadata.items()
        if type(item).__name__ == "BytesStorageMetadata"
    ]
    slow: list[str] = []
    original = dcp_remote.read_item

    def read_item(request: Any, *args: Any) -> None:
        slow.append(request.storage_index.fqn)
        original(request, *args)

    monkeypatch.setattr(dcp_remote, "read_item", read_item)
    model, optimizer = _trained(99)
    assert_states_differ(snapshot(model), expected["model"])
    pointers = [param.data_ptr() for param in model.parameters()]
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}

    Fabric().load(url, state, storage_options=proxied.options)

    assert_states_equal(snapshot(model), expected["model"])
    assert_states_equal(optimizer.state_dict()["state"], expected["optimizer"]["state"])
    assert [param.data_ptr() for param in model.parameters()] == pointers
    assert sorted(slow) == sorted(values)


def test_without_a_spool_items_beyond_the_budget_are_fetched_again(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LWCKPT_SPOOL_DIR=none`` and no memory budget: the read fetches every item again."""
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url, seed=1, options=proxied.store.storage_options)
    total = sum(int(info.length) for info in _metadata(proxied, url).storage_data.values())
    monkeypatch.setattr(dcp_remote, "KEEP_BYTES", 0)
    proxied.proxy.requests.clear()

    with override(spool_dir="none"):
        state = _load(url, proxied.options, expected)

    assert_states_equal(snapshot(state["model"]), expected["model"])
    assert_states_equal(state["optimizer"].state_dict()["state"], expected["optimizer"]["state"])
    fetched = sum(_piece_gets(proxied))
    assert 2 * total <= fetched < 2 * total + 128 * 1024  # verified, then read: twice
