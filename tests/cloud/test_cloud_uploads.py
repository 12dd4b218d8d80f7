"""Incomplete multipart uploads (what a killed save leaves on S3): listed by prefix, aborted.

Uploads are started with real s3fs calls on the moto server (as a killed save leaves them:
created, parts sent, never completed); ``test_cloud_faults`` shows a SIGKILLed save leaving one.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator

import pytest

from lightweight_ckpt import cli
from lightweight_ckpt.storage import abort_incomplete_uploads, incomplete_uploads, resolve
from tests.helpers.servers import Store, open_store

pytestmark = pytest.mark.cloud


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    yield from open_store(request, "s3")


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


def test_nothing_to_list_on_gcs(request: pytest.FixtureRequest) -> None:
    for store in open_store(request, "gs"):
        location = resolve(store.url("run/"), store.storage_options)
        assert incomplete_uploads(location, older_than_s=0) == []
