"""Failed and killed saves on object stores: the previous checkpoint stays, nothing partial shows.

On S3 and GCS an upload is published only when it is completed (``complete_multipart_upload``,
the final chunk of a resumable upload); the library opens it with ``autocommit=False`` and
commits after the last byte, or discards (aborts) it on an error. So after a save that fails,
whatever the point of failure, the bucket holds exactly what it held before: no partial object,
no temp key, and on S3 no multipart upload left in progress. A SIGKILLed saver cannot abort its
upload; the object at the path must still be the previous checkpoint.

The servers are real (moto, fake-gcs-server, separate processes on 127.0.0.1). The mid-upload
failure is injected where a broken connection or a failing producer would surface: in the
remote file's ``write``, after the server has acknowledged several parts.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightweight_ckpt import CheckpointWriteError, Fabric, storage, uploads
from lightweight_ckpt.config import override
from lightweight_ckpt.storage import abort_incomplete_uploads, resolve
from tests.helpers.asserts import assert_states_equal, snapshot
from tests.helpers.models import fresh_like, make_state
from tests.helpers.processes import kill
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, PROTOCOLS, Store, open_store

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]

MIB = 2**20
# Small upload parts so that a 24 MiB save is several parts: S3's minimum part is 5 MiB; GCS
# takes any multiple of 256 KiB per resumable chunk.
BLOCK_BYTES = {"s3": 5 * MIB, "gs": 1 * MIB}
N_TENSORS = 6
TENSOR_MIB = 4
PARTS_BEFORE_FAILURE = 2
HANG_GUARD_S = 90.0  # only turns a hang into a failure


@pytest.fixture(params=PROTOCOLS)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh bucket whose filesystem uploads in small parts (see BLOCK_BYTES)."""
    yield from open_store(request, request.param, block_bytes=BLOCK_BYTES[request.param])


def big_state(seed: int = 1) -> dict[str, Any]:
    """24 MiB of deterministic tensors, distinct in every element, plus plain values."""
    numel = TENSOR_MIB * MIB // 4
    return {
        "tensors": {
            f"t{i}": torch.arange(numel, dtype=torch.int32).add_(7919 * i + seed)
            for i in range(N_TENSORS)
        },
        "step": 99,
    }


def _save_previous(store: Store, url: str) -> dict[str, Any]:
    state = make_state()
    Fabric().save(url, state, storage_options=store.storage_options)
    return {"state": state, "snapshot": snapshot(state["model"])}


def _assert_previous_intact(store: Store, url: str, previous: dict[str, Any]) -> None:
    target = fresh_like(previous["state"])
    Fabric().load(url, target, storage_options=store.storage_options)
    assert_states_equal(target, previous["state"])
    assert_states_equal(target["model"], previous["snapshot"])


def _server_parts(store: Store, key: str) -> int:
    """Parts the server holds for the in-progress upload to ``key`` (S3), or components (GCS)."""
    if store.protocol != "s3":
        return len(store.incomplete_uploads())
    uploads = [u for u in store.incomplete_uploads() if u["Key"] == key]
    assert len(uploads) == 1, uploads
    parts = store.fs.call_s3(
        "list_parts", Bucket=store.bucket, Key=key, UploadId=uploads[0]["UploadId"]
    )
    return len(parts.get("Parts", []))


class InjectedConnectionError(ConnectionResetError):
    """Raised from inside the upload, as a dropped connection would be."""


def _fail_mid_upload(
    monkeypatch: pytest.MonkeyPatch, store: Store, key: str, error: BaseException
) -> dict[str, int]:
    """Make the upload raise ``error`` once PARTS_BEFORE_FAILURE parts are on the server.

    A connection reset comes from the transport: on S3 from the request that uploads the next
    part, on GCS from the upload of the next component (both on a part-upload thread). A
    KeyboardInterrupt is a Ctrl-C arriving while the save runs, so in the thread that writes the
    checkpoint: it must come out as itself, not as some other error that a training loop might
    catch and carry on after.
    """
    threshold = PARTS_BEFORE_FAILURE * BLOCK_BYTES[store.protocol]
    seen: dict[str, int] = {}

    def record(sent_bytes: int) -> None:
        seen["sent_bytes"] = sent_bytes
        seen["server_parts"] = _server_parts(store, key)

    if store.protocol == "s3" and not isinstance(error, KeyboardInterrupt):
        original_call = uploads._client_call

        async def client_call(fs: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
            number = params.get("PartNumber", 0)
            if method == "upload_part" and number > PARTS_BEFORE_FAILURE:
                ids = {k: params[k] for k in ("Bucket", "Key", "UploadId")}
                for _ in range(200):  # the earlier parts may still be in flight
                    parts = (await fs._call_s3("list_parts", **ids)).get("Parts", [])
                    if len(parts) >= PARTS_BEFORE_FAILURE:
                        break
                    await asyncio.sleep(0.05)
                seen.update(sent_bytes=(number - 1) * BLOCK_BYTES["s3"], server_parts=len(parts))
                raise error
            return await original_call(fs, method, params)

        monkeypatch.setattr(uploads, "_client_call", client_call)
        return seen

    if store.protocol == "s3":  # Ctrl-C in the writing thread, once parts are on the server
        original_write = uploads.S3PartWriter.write

        def write(self: uploads.S3PartWriter, data: Any) -> int:
            if self.tell() >= threshold:
                record(self.tell())
                if seen["server_parts"] >= PARTS_BEFORE_FAILURE:
                    raise error
            return original_write(self, data)

        monkeypatch.setattr(uploads.S3PartWriter, "write", write)
        return seen

    if not isinstance(error, KeyboardInterrupt):  # GCS: the next component upload fails
        original_upload = uploads.GCSComposeWriter._put_part

        def put_part(self: uploads.GCSComposeWriter, number: int, data: memoryview) -> str:
            if number > PARTS_BEFORE_FAILURE:
                for _ in range(200):  # the earlier parts may still be in flight
                    if _server_parts(store, key) >= PARTS_BEFORE_FAILURE:
                        break
                    time.sleep(0.05)
                seen.update(
                    sent_bytes=(number - 1) * BLOCK_BYTES["gs"],
                    server_parts=_server_parts(store, key),
                )
                raise error
            return original_upload(self, number, data)

        monkeypatch.setattr(uploads.GCSComposeWriter, "_put_part", put_part)
        return seen

    original_write = uploads.GCSComposeWriter.write

    def gcs_write(self: uploads.GCSComposeWriter, data: Any) -> int:
        if self.tell() >= threshold:
            record(self.tell())
            if seen["server_parts"] >= PARTS_BEFORE_FAILURE:
                raise error
        return original_write(self, data)

    monkeypatch.setattr(uploads.GCSComposeWriter, "write", gcs_write)
    return seen


@pytest.mark.parametrize(
    ("interrupt", "previous"),
    [(False, True), (False, False), (True, True)],
    ids=["error-over-previous", "error-first-save", "keyboard-interrupt-over-previous"],
)
def test_failure_mid_upload_publishes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch, interrupt: bool, previous: bool
) -> None:
    url = store.url("last.ckpt")
    before = _save_previous(store, url) if previous else None
    reset = InjectedConnectionError("connection reset by peer")
    error = KeyboardInterrupt() if interrupt else reset
    seen = _fail_mid_upload(monkeypatch, store, "last.ckpt", error)
    expected: type[BaseException] = KeyboardInterrupt if interrupt else CheckpointWriteError
    part_bytes = BLOCK_BYTES[store.protocol]
    with override(chunk_bytes=MIB, part_bytes=part_bytes), pytest.raises(expected) as info:
        Fabric().save(url, big_state(), storage_options=store.storage_options)
    monkeypatch.undo()
    if not interrupt:  # a CheckpointWriteError naming the path and the cause
        assert url in str(info.value)
        assert "connection reset by peer" in str(info.value)
    # the failure really came mid-upload: the server had acknowledged parts of the new object
    assert seen["sent_bytes"] >= PARTS_BEFORE_FAILURE * BLOCK_BYTES[store.protocol]
    assert seen["server_parts"] >= PARTS_BEFORE_FAILURE

    # nothing partial is visible, no temp key, no upload left in progress
    assert store.objects() == (["last.ckpt"] if previous else [])
    assert store.incomplete_uploads() == []
    if before is not None:
        _assert_previous_intact(store, url, before)
    # and the next save works
    fresh = big_state(seed=2)
    Fabric().save(url, fresh, storage_options=store.storage_options)
    assert_states_equal(Fabric().load(url, storage_options=store.storage_options), fresh)


def test_unpicklable_value_fails_before_upload_and_publishes_nothing(store: Store) -> None:
    """A value that cannot be pickled fails the save; ``torch.save`` pickles before any data.

    So this failure comes before the first byte is sent: it can never leave a partial upload
    (the mid-upload case is the test above).
    """
    url = store.url("last.ckpt")
    before = _save_previous(store, url)
    state = {**big_state(), "callback": lambda step: step}  # a lambda cannot be pickled
    with pytest.raises(CheckpointWriteError) as info:
        Fabric().save(url, state, storage_options=store.storage_options)
    assert url in str(info.value)
    assert "serialize" in str(info.value)
    assert store.objects() == ["last.ckpt"]
    assert store.incomplete_uploads() == []
    _assert_previous_intact(store, url, before)


# -- a saver SIGKILLed mid-upload -------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import json
    import sys
    import time

    import torch
    from lightweight_ckpt import Fabric
    from lightweight_ckpt.config import override
    from lightweight_ckpt.uploads import GCSComposeWriter, S3PartWriter

    url, options = sys.argv[1], json.loads(sys.argv[2])
    n_tensors, numel = int(sys.argv[3]), int(sys.argv[4])
    original_part = S3PartWriter._upload_part  # the same for both writers

    def upload_part(self, number, buffer, size):
        part = original_part(self, number, buffer, size)
        print(f"sent part {number}", flush=True)  # on the server: say so, then go slowly
        time.sleep(0.5)
        return part

    S3PartWriter._upload_part = upload_part  # S3: multipart parts
    GCSComposeWriter._upload_part = upload_part  # GCS: component objects
    state = {
        "tensors": {f"t{i}": torch.full((numel,), i, dtype=torch.int32) for i in range(n_tensors)}
    }
    with override(chunk_bytes=2**20, part_bytes=5 * 2**20, parts_in_flight=1):
        Fabric().save(url, state, storage_options=options)
    print("saved", flush=True)
    """
)


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, deadline_s: float) -> str:
    """Read the child's stdout until a line starts with ``prefix`` (fail on exit or timeout)."""
    assert proc.stdout is not None
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line
            if not line and proc.poll() is not None:
                break
    stderr = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    pytest.fail(f"the saver never printed {prefix!r} (exit {proc.poll()}): {stderr[-2000:]}")


def test_sigkilled_saver_leaves_the_previous_checkpoint(store: Store) -> None:
    url = store.url("last.ckpt")
    before = _save_previous(store, url)
    numel = TENSOR_MIB * MIB // 4
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SAVER,
            url,
            json.dumps(store.storage_options),
            str(N_TENSORS),
            str(numel),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait_for_line(proc, "sent ", HANG_GUARD_S)  # the first part is on the server
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(HANG_GUARD_S)
    finally:
        kill(proc)  # a no-op once it is dead; closes its pipes
    assert proc.returncode == -signal.SIGKILL

    # the kill came mid-upload: S3 lists the upload it left behind, GCS its hidden components
    left = store.incomplete_uploads()
    if store.protocol == "s3":
        assert [u["Key"] for u in left] == ["last.ckpt"]
    else:
        assert left
        assert all(u["Key"].startswith(".last.ckpt.part-") for u in left)
    # no partial object: only the previous checkpoint, whole
    assert store.visible_objects() == ["last.ckpt"]
    _assert_previous_intact(store, url, before)
    # the orphan upload can be aborted afterwards (storage.abort_incomplete_uploads)
    location = resolve(url, store.storage_options)
    assert [u.url for u in storage.incomplete_uploads(location, older_than_s=0)] == [url]
    aborted = abort_incomplete_uploads(location, older_than_s=0)
    assert [u.url for u in aborted] == [url]
    assert store.incomplete_uploads() == []
    assert store.objects() == ["last.ckpt"]
    # and a new save over it works
    fresh = big_state(seed=3)
    Fabric().save(url, fresh, storage_options=store.storage_options)
    assert_states_equal(Fabric().load(url, storage_options=store.storage_options), fresh)
