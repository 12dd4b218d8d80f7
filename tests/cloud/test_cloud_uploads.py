"""S3 multipart and GCS composite saves: bounded parts; incomplete uploads listed, aborted.

A save's parts are counted where they leave the client (``uploads._client_call``, the one call
that sends a part), against the moto server. Incomplete uploads are started with real s3fs
calls (as a killed save leaves them: created, parts sent, never completed);
``test_cloud_faults`` shows a SIGKILLed save leaving one.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightweight_ckpt import Fabric, cli, uploads
from lightweight_ckpt.config import override
from lightweight_ckpt.storage import (
    abort_incomplete_uploads,
    incomplete_uploads,
    resolve,
    write_with_retries,
)
from tests.helpers.asserts import assert_states_differ, assert_states_equal
from tests.helpers.models import fresh_like, make_state
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, Store, open_store

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    yield from open_store(request, "s3")


MIB = 2**20


class PartLog:
    """What a save sent: each call's method and body size, and the most parts sent at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        self.most_at_once = 0
        self._now = 0
        original = uploads._client_call

        async def client_call(fs: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
            self.calls.append((method, len(params["Body"])))
            self._now += 1
            self.most_at_once = max(self.most_at_once, self._now)
            try:
                await asyncio.sleep(0.02)  # let the other parts in flight start
                return await original(fs, method, params)
            finally:
                self._now -= 1

        monkeypatch.setattr(uploads, "_client_call", client_call)

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]

    def sizes(self) -> list[int]:
        return [size for _, size in self.calls]


def _tensors(n: int, mib: int, seed: int) -> dict[str, Any]:
    numel = mib * MIB // 4
    return {f"t{i}": torch.arange(numel, dtype=torch.int32).add_(7919 * i + seed) for i in range(n)}


def test_a_large_save_streams_in_parts_a_few_at_a_time(
    s3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts of ``part_bytes``, at most ``parts_in_flight`` uploading: memory stays bounded."""
    url = s3_store.url("big.ckpt")
    state = {"tensors": _tensors(6, 4, seed=1), "step": 7}
    log = PartLog(monkeypatch)
    with override(part_bytes=5 * MIB, parts_in_flight=2):
        Fabric().save(url, state, storage_options=s3_store.storage_options)

    size = s3_store.fs.size(s3_store.path("big.ckpt"))
    assert size > 24 * MIB
    assert log.methods() == ["upload_part"] * len(log.calls)
    assert log.sizes()[:-1] == [5 * MIB] * (len(log.calls) - 1)  # every part but the last
    assert sum(log.sizes()) == size
    assert 1 < log.most_at_once <= 2
    assert s3_store.objects() == ["big.ckpt"]
    assert s3_store.incomplete_uploads() == []

    target = {"tensors": _tensors(6, 4, seed=2), "step": 0}
    assert not torch.equal(target["tensors"]["t0"], state["tensors"]["t0"])
    Fabric().load(url, target, storage_options=s3_store.storage_options)
    for name, tensor in state["tensors"].items():
        assert torch.equal(target["tensors"][name], tensor)
    assert target["step"] == 7


def test_a_save_smaller_than_a_part_is_one_put(
    s3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = s3_store.url("small.ckpt")
    state = make_state()
    log = PartLog(monkeypatch)
    Fabric().save(url, state, storage_options=s3_store.storage_options)

    assert log.methods() == ["put_object"]
    assert log.sizes() == [s3_store.fs.size(s3_store.path("small.ckpt"))]
    assert s3_store.incomplete_uploads() == []
    target = fresh_like(state)
    assert_states_differ(target, state)
    Fabric().load(url, target, storage_options=s3_store.storage_options)
    assert_states_equal(target, state)


def _start_upload(store: Store, key: str) -> str:
    """Begin a multipart upload of ``key`` and send one part, as a save does before its kill."""
    upload = store.fs.call_s3("create_multipart_upload", Bucket=store.bucket, Key=key)
    store.fs.call_s3(
        "upload_part",
        Bucket=store.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    return str(upload["UploadId"])


def _keys(store: Store) -> list[str]:
    return sorted(u["Key"] for u in store.incomplete_uploads())


def test_listed_and_aborted_under_a_prefix_only(s3_store: Store) -> None:
    run_a = _start_upload(s3_store, "run/a.ckpt")
    _start_upload(s3_store, "run/b/c.ckpt")
    _start_upload(s3_store, "other/d.ckpt")
    location = resolve(s3_store.url("run/"), s3_store.storage_options)

    listed = incomplete_uploads(location)
    assert sorted(u.url for u in listed) == [
        s3_store.url("run/a.ckpt"),
        s3_store.url("run/b/c.ckpt"),
    ]
    assert run_a in {u.upload_id for u in listed}
    assert all(u.initiated is not None for u in listed)

    # the age guard spares younger uploads (a save still running). moto reports every upload as
    # started on 2010-11-10 (hard-coded), so "younger" here means younger than that plus a day
    oldest = min(u.initiated for u in listed if u.initiated is not None)
    age_s = (datetime.datetime.now(datetime.timezone.utc) - oldest).total_seconds()
    assert abort_incomplete_uploads(location, older_than_s=age_s + 86400) == []
    assert len(_keys(s3_store)) == 3

    aborted = abort_incomplete_uploads(location, older_than_s=0)
    assert sorted(u.url for u in aborted) == sorted(u.url for u in listed)
    assert _keys(s3_store) == ["other/d.ckpt"]
    assert s3_store.objects() == []  # aborting publishes nothing


def test_cli_lists_then_aborts(s3_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _start_upload(s3_store, "run/last.ckpt")
    options = [
        f"--storage-option={key}={s3_store.storage_options[key]}"
        for key in ("endpoint_url", "key", "secret")
    ]
    url = s3_store.url("run/")

    assert cli.main(["clean-uploads", url, "--older-than", "0", "--json", *options]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [u["url"] for u in listed["uploads"]] == [s3_store.url("run/last.ckpt")]
    assert listed["aborted"] is False
    assert _keys(s3_store) == ["run/last.ckpt"]  # listing aborts nothing

    assert cli.main(["clean-uploads", url, "--older-than", "0", "--abort", *options]) == 0
    out = capsys.readouterr().out
    assert f"aborted {s3_store.url('run/last.ckpt')}" in out
    assert _keys(s3_store) == []


@pytest.fixture
def gs_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    yield from open_store(request, "gs")


@pytest.mark.parametrize("protocol", ["s3", "gs"])
@pytest.mark.parametrize("nbytes", [3 * MIB + 1, 40 * 5 * MIB + 7], ids=["3-parts", "41-parts"])
def test_round_trip_across_part_boundaries(
    request: pytest.FixtureRequest, protocol: str, nbytes: int
) -> None:
    """Byte-exact objects across part boundaries, beyond 32 parts (GCS composes in a tree)."""
    part = 5 * MIB if protocol == "s3" else MIB
    nbytes = nbytes if protocol == "s3" else nbytes // 5
    data = bytes(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy())
    for store in open_store(request, protocol):
        location = resolve(store.url("run/blob"), store.storage_options)
        with override(part_bytes=part, parts_in_flight=3):
            assert write_with_retries(location, lambda sink: sink.write(data)) == nbytes
        assert store.objects() == ["run/blob"]  # no components left over
        assert store.fs.cat_file(store.path("run/blob")) == data


def test_gcs_components_of_a_killed_save_are_listed_and_removed(gs_store: Store) -> None:
    """A save's components (as a SIGKILL leaves them) are listed under the target's prefix."""
    for key in ("run/a.ckpt", "other/b.ckpt"):
        writer = uploads.GCSComposeWriter(
            resolve(gs_store.url(key), gs_store.storage_options), MIB, 2
        )
        writer.write(b"x" * (3 * MIB + 5))
        writer._pool.shutdown(wait=True)  # the parts are stored; nothing composes or deletes them
    assert gs_store.visible_objects() == []  # components are hidden and nothing is published
    location = resolve(gs_store.url("run/"), gs_store.storage_options)

    listed = incomplete_uploads(location, older_than_s=0)
    assert [u.url for u in listed] == [gs_store.url("run/a.ckpt")]
    assert len(listed[0].parts) == 3
    assert listed[0].initiated is not None
    assert abort_incomplete_uploads(location, older_than_s=3600) == []  # too young

    aborted = abort_incomplete_uploads(location, older_than_s=0)
    assert [u.url for u in aborted] == [gs_store.url("run/a.ckpt")]
    assert [u["Key"].split("/")[0] for u in gs_store.incomplete_uploads()] == ["other"] * 3
