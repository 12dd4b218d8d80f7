"""Sharded (DCP) saves on object stores go through our uploads: parallel parts, bounded, atomic.

Each piece (and its checksum record) is a ``storage.staged_write``: on S3 a multipart upload, on
GCS parallel component objects composed at the end, several parts in flight, a progress bar,
published when whole and aborted when the save fails. ``.metadata`` is published last, so a
failed or killed save leaves the previous checkpoint, loadable, and no new version visible; a
killed save's uploads are listed by ``storage.incomplete_uploads`` and can be aborted.

Real s3fs / gcsfs against the session's moto and fake-gcs-server (a separate process each), and
the counting proxy (tests/helpers/proxy.py) where requests are counted. One process, no process
group: every rank of a distributed save writes its piece the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightweight_ckpt import CheckpointWriteError, Fabric, progress, storage, uploads
from lightweight_ckpt.config import override
from lightweight_ckpt.storage import resolve
from lightweight_ckpt.strategies import FSDPStrategy
from tests.cloud.test_cloud_faults import _wait_for_line
from tests.cloud.test_cloud_retries import Proxied, _proxied
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.processes import kill
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, PROTOCOLS, Store, open_store

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]

MIB = 2**20
PART_BYTES = 5 * MIB  # S3's smallest part
WIDTH = 1280  # a 6.25 MiB weight: with its two AdamW moments, a piece of four parts
HANG_GUARD_S = 90.0


@pytest.fixture(params=PROTOCOLS)
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, request.param)


@pytest.fixture(params=PROTOCOLS)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    yield from open_store(request, request.param)


def _trained(seed: int, width: int = WIDTH) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(url: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    model, optimizer = _trained(seed)
    state = {"model": model, "optimizer": optimizer, "step": seed}
    Fabric(strategy=FSDPStrategy()).save(url, state, storage_options=options)
    return {"model": snapshot(model), "optimizer": snapshot(optimizer)}


def _assert_loads(url: str, options: dict[str, Any], expected: dict[str, Any], step: int) -> None:
    model, optimizer = _trained(seed=99)
    assert_states_differ(snapshot(model), expected["model"])
    assert_states_differ(snapshot(optimizer)["state"], expected["optimizer"]["state"])
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    assert Fabric(strategy=FSDPStrategy()).load(url, state, storage_options=options) == {}
    assert_states_equal(snapshot(model), expected["model"])
    assert_states_equal(snapshot(optimizer)["state"], expected["optimizer"]["state"])
    assert state["step"] == step


def _piece_parts(proxied: Proxied) -> int:
    """Part uploads of piece data: S3 ``UploadPart``, GCS component objects."""
    if proxied.protocol == "s3":
        return sum(
            1
            for method, target, *_ in proxied.proxy.requests
            if method == "PUT" and "partNumber=" in target and ".distcp?" in target
        )
    return sum(
        1
        for method, target, *_ in proxied.proxy.requests
        if method == "POST" and "uploadType=media" in target and ".distcp.part-" in target
    )


def test_a_piece_uploads_as_parallel_parts_with_progress_and_loads_bitwise(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm", reason="bars need tqdm (the progress extra)")
    monkeypatch.setattr(progress, "TRANSFER_DELAY_S", 0.0)
    url = proxied.store.url("run", "sharded")

    with override(progress="on", part_bytes=PART_BYTES, piece_parts_in_flight=3):
        expected = _save(url, seed=1, options=proxied.options)

    piece_bytes = 3 * WIDTH * WIDTH * 4  # the weight and its two moments, at least
    assert _piece_parts(proxied) >= piece_bytes // PART_BYTES
    assert f"saving {url}/v-" in capsys.readouterr().err  # the piece's upload had a bar
    assert proxied.store.incomplete_uploads() == []
    _assert_loads(url, proxied.store.storage_options, expected, step=1)


def test_a_piece_upload_holds_a_few_parts_in_memory(store: Store) -> None:
    """A 40 MB shard is never buffered whole: the save holds a few parts, whatever its size.

    Python's allocations are traced (part buffers, the clients' copies: about one part more);
    tensors live in torch's own allocator, so the shard itself is not counted. A first small
    save loads the clients' modules and service models before tracing starts.
    """
    url = store.url("run", "sharded")
    options = store.storage_options
    Fabric(strategy=FSDPStrategy()).save(url, {"w": torch.ones(4)}, storage_options=options)
    torch.manual_seed(0)
    model = torch.nn.Linear(3200, 3200, bias=False)  # 40.96 MB in one item
    shard_bytes = model.weight.numel() * 4
    bound = (1 + 2) * PART_BYTES + 4 * MIB  # piece_parts_in_flight 1: 19 MiB
    tracemalloc.start()
    try:
        # pieces take piece_parts_in_flight; 4 for one-rank files would overshoot the bound
        with override(part_bytes=PART_BYTES, parts_in_flight=4, piece_parts_in_flight=1):
            Fabric(strategy=FSDPStrategy()).save(
                url, {"model": model}, storage_options=store.storage_options
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < bound < shard_bytes / 2, peak
    fresh = torch.nn.Linear(3200, 3200, bias=False)
    assert_states_differ(fresh, model)
    Fabric(strategy=FSDPStrategy()).load(
        url, {"model": fresh}, storage_options=store.storage_options
    )
    assert_states_equal(fresh, model)


class InjectedConnectionError(ConnectionResetError):
    """Raised from a part upload, as a reset connection would be."""


def test_an_error_mid_upload_keeps_the_previous_checkpoint(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt fails at its second part (the first is on the server) and is aborted."""
    url = store.url("run", "sharded")
    previous = _save(url, seed=1, options=store.storage_options)
    before = store.objects()
    sent: list[int] = []
    kind = uploads.S3PartWriter if store.protocol == "s3" else uploads.GCSComposeWriter
    original = kind._put_part

    def put_part(self: Any, number: int, data: memoryview) -> Any:
        if ".distcp" in self._key and number >= 2:
            raise InjectedConnectionError("connection reset by peer")
        sent.append(number)
        return original(self, number, data)

    monkeypatch.setattr(kind, "_put_part", put_part)
    with (
        override(
            part_bytes=PART_BYTES, piece_parts_in_flight=1, retry_attempts=2, retry_backoff_s=0.01
        ),
        pytest.raises(CheckpointWriteError) as info,
    ):
        _save(url, seed=2, options=store.storage_options)
    monkeypatch.undo()

    assert url in str(info.value)
    assert "connection reset by peer" in str(info.value)
    assert sent.count(1) == 2  # both attempts had a part on the server
    assert store.objects() == before  # no new version, no component, no new record
    assert store.incomplete_uploads() == []  # both attempts' uploads were aborted
    _assert_loads(url, store.storage_options, previous, step=1)


SAVER = textwrap.dedent(
    """
    import json
    import sys
    import time

    import torch
    from lightweight_ckpt import Fabric
    from lightweight_ckpt.config import override
    from lightweight_ckpt.strategies import FSDPStrategy
    from lightweight_ckpt.uploads import GCSComposeWriter, S3PartWriter

    url, options = sys.argv[1], json.loads(sys.argv[2])
    original_part = S3PartWriter._upload_part  # the same for both writers

    def upload_part(self, number, buffer, size):
        part = original_part(self, number, buffer, size)
        print(f"sent part {number} of {self._key}", flush=True)  # then go slowly
        time.sleep(0.5)
        return part

    S3PartWriter._upload_part = upload_part
    GCSComposeWriter._upload_part = upload_part
    model = torch.nn.Linear(2048, 2048, bias=False)  # 16 MiB: four parts
    with override(part_bytes=5 * 2**20, piece_parts_in_flight=1):
        Fabric(strategy=FSDPStrategy()).save(url, {"model": model}, storage_options=options)
    print("saved", flush=True)
    """
)


def test_a_sigkilled_sharded_save_keeps_the_previous_checkpoint(store: Store) -> None:
    url = store.url("run", "sharded")
    previous = _save(url, seed=1, options=store.storage_options)
    before = store.visible_objects()
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, url, json.dumps(store.storage_options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = _wait_for_line(proc, "sent part 1 of ", HANG_GUARD_S)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(HANG_GUARD_S)
    finally:
        kill(proc)  # a no-op once it is dead; closes its pipes
    assert proc.returncode == -signal.SIGKILL
    assert ".distcp" in line  # killed mid-piece

    # nothing new is visible, and the previous checkpoint loads
    assert store.visible_objects() == before
    _assert_loads(url, store.storage_options, previous, step=1)
    # the killed piece's upload is listed, and can be aborted
    location = resolve(url, store.storage_options)
    (left,) = storage.incomplete_uploads(location, older_than_s=0)
    assert left.url.startswith(f"{url}/v-")
    assert left.url.endswith("/__0_0.distcp")
    assert [u.url for u in storage.abort_incomplete_uploads(location, older_than_s=0)] == [left.url]
    assert store.incomplete_uploads() == []
    assert store.objects() == before
    # and the next save works
    expected = _save(url, seed=3, options=store.storage_options)
    _assert_loads(url, store.storage_options, expected, step=3)
