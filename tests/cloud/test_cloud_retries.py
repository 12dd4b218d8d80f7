"""Transient and lasting transport faults, injected by a real TCP proxy in front of the servers.

The clients (real s3fs and gcsfs) talk to ``FaultProxy`` on 127.0.0.1, which forwards to moto or
fake-gcs-server and, by rule, drops a connection, stalls it, cuts a response short, or answers
503/403 itself (tests/helpers/proxy.py). botocore's own retries are off here (one attempt), so a
503 reaches our layer; s3fs's wrapper and gcsfs still retry what they retry, and the request log
shows which layer did.

A transient fault is retried and the save or load gives identical values; a lasting fault raises
our error naming the URL; a failed save publishes nothing and keeps the previous checkpoint; a
load that fails before its fill pass changes no tensor. On GCS, gcsfs retries each request 6
times with 1-32 s backoffs (~30 s) before we see a lasting fault; its lasting-fault tests
shorten those sleeps (``fast_gcsfs_retries``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from lightweight_ckpt import CheckpointNotFoundError, CheckpointWriteError, Fabric
from lightweight_ckpt.config import override
from lightweight_ckpt.errors import CheckpointReadError
from lightweight_ckpt.formats import dcp_dir
from lightweight_ckpt.storage import resolve
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.models import fresh_like, make_state
from tests.helpers.proxy import Fault, FaultProxy
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, PROTOCOLS, Store, open_store

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]

MIB = 2**20
WIDTH = 1024  # fc1 weight and its two AdamW moments: 4 MiB each, 12 MiB in all
BLOCK_BYTES = {"s3": 5 * MIB, "gs": 1 * MIB}
RANGE_BYTES = MIB  # chunk_bytes here: each 4 MiB record is read as 4 ranges
# Only tensor data: index, pickle and CRC-table reads are small.
DATA_GET = {"method": "GET", "min_range_bytes": RANGE_BYTES // 2}
# S3: the second multipart part; GCS: component uploads (one request each)
UPLOAD_PART = {
    "s3": {"method": "PUT", "path": "partNumber=2"},
    "gs": {"method": "POST", "path": "uploadType=media"},
}


@dataclass
class Proxied:
    """A bucket, reachable directly (``store``) and through a fault proxy (``options``)."""

    store: Store
    proxy: FaultProxy
    options: dict[str, Any]

    @property
    def protocol(self) -> str:
        return self.store.protocol

    def requests(self, method: str, pattern: str) -> int:
        return sum(1 for m, target, *_ in self.proxy.requests if m == method and pattern in target)


@pytest.fixture(params=PROTOCOLS)
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, request.param)


@pytest.fixture
def proxied_s3(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, "s3")


def _proxied(request: pytest.FixtureRequest, protocol: str) -> Iterator[Proxied]:
    for store in open_store(request, protocol, block_bytes=BLOCK_BYTES[protocol]):
        with FaultProxy(store.server.endpoint) as proxy:
            options = {**store.storage_options, "endpoint_url": proxy.endpoint}
            if protocol == "s3":
                options["config_kwargs"] = {
                    "retries": {"total_max_attempts": 1},  # botocore: no retries of its own
                    "connect_timeout": 2,
                    "read_timeout": 2,
                }
            else:
                options["requests_timeout"] = 2  # seconds per request (aiohttp)
            with override(
                retry_attempts=3,
                retry_backoff_s=0.05,
                io_threads=2,  # two data streams per pass
                chunk_bytes=RANGE_BYTES,
                part_bytes=BLOCK_BYTES["s3"],
            ):
                yield Proxied(store, proxy, options)


def _save_direct(proxied: Proxied, url: str, steps: int = 2) -> dict[str, Any]:
    state = make_state(WIDTH, steps=steps)
    Fabric().save(url, state, storage_options=proxied.store.storage_options)
    return state


def _load_direct(proxied: Proxied, url: str) -> dict[str, Any]:
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    Fabric().load(url, target, storage_options=proxied.store.storage_options)
    return target


# -- transient faults: retried, identical values ----------------------------------------------


@pytest.mark.parametrize("kind", ["drop", "status"])
def test_transient_fault_during_save_is_retried(proxied: Proxied, kind: str) -> None:
    url = proxied.store.url("last.ckpt")
    previous = _save_direct(proxied, url, steps=1)
    fault = proxied.proxy.add(Fault(kind, **UPLOAD_PART[proxied.protocol]))
    state = make_state(WIDTH, steps=3)
    assert_states_differ(state, previous)

    Fabric().save(url, state, storage_options=proxied.options)

    assert fault.hits == 1  # the fault really fired, mid-upload
    assert proxied.store.objects() == ["last.ckpt"]
    assert proxied.store.incomplete_uploads() == []
    assert_states_equal(_load_direct(proxied, url), state)
    if proxied.protocol == "s3" and kind == "status":
        # nobody below retries a 503 here: our layer discarded the upload and started over
        assert proxied.requests("POST", "?uploads") == 2


@pytest.mark.parametrize("kind", ["drop", "status", "truncate", "stall"])
def test_transient_fault_during_load_is_retried(proxied: Proxied, kind: str) -> None:
    url = proxied.store.url("last.ckpt")
    state = _save_direct(proxied, url)
    fault = proxied.proxy.add(
        Fault(kind, skip=1, truncate_bytes=64 * 1024, stall_s=5.0, **DATA_GET)
    )
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    assert_states_differ(target, state)

    assert Fabric().load(url, target, storage_options=proxied.options) == {}

    assert fault.hits == 1
    assert_states_equal(target, state)
    assert target["step"] == state["step"]


def test_a_whole_object_sent_for_a_range_is_never_read_as_the_range(proxied: Proxied) -> None:
    """A data stream answered with the whole object (200, no range) is retried, not misread."""
    url = proxied.store.url("last.ckpt")
    state = _save_direct(proxied, url)
    fault = proxied.proxy.add(Fault("unranged", **DATA_GET))
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    assert_states_differ(target, state)

    Fabric().load(url, target, storage_options=proxied.options)

    assert fault.hits == 1
    assert_states_equal(target, state)


def test_retries_are_logged_with_the_url(
    proxied_s3: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    url = proxied_s3.store.url("last.ckpt")
    state = _save_direct(proxied_s3, url)
    proxied_s3.proxy.add(Fault("status", **DATA_GET))
    with caplog.at_level(logging.WARNING, logger="lightweight_ckpt"):
        raw = Fabric().load(url, storage_options=proxied_s3.options)
    assert_states_equal(raw["model"], state["model"].state_dict())
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 1
    assert url in retried[0]


# -- lasting faults: our error, naming the URL; nothing partial -------------------------------


@pytest.fixture
def fast_gcsfs_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs's 6 tries per request, without its 1-32 s backoffs (~30 s a request otherwise).

    The backoff is fixed in gcsfs (``retry_request``, not an option), so its module's view of
    ``asyncio`` gets a ``sleep`` of 10 ms; the tries and what is retried stay gcsfs's own.
    """
    gcsfs_retry = pytest.importorskip("gcsfs.retry")

    async def short_sleep(delay: float) -> None:
        await asyncio.sleep(min(delay, 0.01))

    monkeypatch.setattr(gcsfs_retry, "asyncio", SimpleNamespace(sleep=short_sleep))


COMPLETE = {"method": "POST", "path": "uploadId="}  # CompleteMultipartUpload (create: ?uploads)


def test_a_lost_answer_to_complete_is_not_a_failed_save(proxied_s3: Proxied) -> None:
    """The store completes the upload but its answer never arrives (cut off, or a read timeout
    while a slow store assembles a large object). The object is published; the save must say so,
    not report a failure and upload everything again into a new multipart upload."""
    url = proxied_s3.store.url("last.ckpt")
    _save_direct(proxied_s3, url, steps=1)
    fault = proxied_s3.proxy.add(Fault("truncate", truncate_bytes=0, **COMPLETE))
    # the client's repeat then meets the store still busy with the first (moto answers 500:
    # "seek of closed file" while it assembles a large object), here every time
    busy = proxied_s3.proxy.add(Fault("status", status=500, times=None, **COMPLETE))
    state = make_state(WIDTH, steps=3)

    Fabric().save(url, state, storage_options=proxied_s3.options)

    assert fault.hits == 1  # the store got the request; the client got no answer
    assert busy.hits >= 1  # and the client's own retry failed
    assert proxied_s3.requests("POST", "?uploads") == 1  # one upload: nothing sent twice
    assert proxied_s3.store.objects() == ["last.ckpt"]
    assert proxied_s3.store.incomplete_uploads() == []
    assert_states_equal(_load_direct(proxied_s3, url), state)


def test_a_complete_that_keeps_failing_publishes_nothing(proxied_s3: Proxied) -> None:
    """Every answer to complete is a 503 and nothing completes: the ETag check finds the previous
    object, the save raises our error within the deadline, and the previous checkpoint stays."""
    url = proxied_s3.store.url("last.ckpt")
    previous = _save_direct(proxied_s3, url, steps=1)
    expected = snapshot(previous["model"])
    fault = proxied_s3.proxy.add(Fault("status", times=None, **COMPLETE))

    with override(retry_deadline_s=4.0), pytest.raises(CheckpointWriteError) as info:
        Fabric().save(url, make_state(WIDTH, steps=3), storage_options=proxied_s3.options)

    assert str(info.value).startswith(f"{url}: writing failed after")
    assert "503" in str(info.value)
    assert fault.hits >= 1
    assert proxied_s3.store.objects() == ["last.ckpt"]
    assert proxied_s3.store.incomplete_uploads() == []
    assert_states_equal(_load_direct(proxied_s3, url)["model"], expected)


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_lasting_fault_during_save_raises_and_keeps_the_previous(proxied: Proxied) -> None:
    url = proxied.store.url("last.ckpt")
    previous = _save_direct(proxied, url, steps=1)
    expected = snapshot(previous["model"])
    fault = proxied.proxy.add(Fault("status", times=None, **UPLOAD_PART[proxied.protocol]))

    with pytest.raises(CheckpointWriteError) as info:
        Fabric().save(url, make_state(WIDTH, steps=3), storage_options=proxied.options)

    message = str(info.value)
    assert message.startswith(f"{url}: writing failed after 3 attempts")
    assert "503" in message
    if proxied.protocol == "s3":
        assert fault.hits == 3  # one part upload per attempt, each aborted
    else:  # gcsfs tries each component upload 6 times
        assert fault.hits >= 3 * 6
    assert proxied.store.objects() == ["last.ckpt"]
    assert proxied.store.incomplete_uploads() == []
    assert_states_equal(_load_direct(proxied, url)["model"], expected)


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_lasting_fault_during_verify_leaves_the_state_untouched(proxied: Proxied) -> None:
    url = proxied.store.url("last.ckpt")
    _save_direct(proxied, url)
    proxied.proxy.add(Fault("status", times=None, **DATA_GET))  # the data streams fail for good
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    before = snapshot(target["model"])
    before_optimizer = snapshot(target["optimizer"].state_dict())

    with pytest.raises(CheckpointReadError) as info:
        Fabric().load(url, target, storage_options=proxied.options)

    assert str(info.value).startswith(f"{url}: reading failed after 3 attempts")
    assert_states_equal(target["model"], before)
    assert_states_equal(target["optimizer"].state_dict(), before_optimizer)
    assert target["step"] == 0


def test_lasting_fault_during_fill_says_the_state_is_partial(proxied: Proxied) -> None:
    """After verification the bound tensors are read again, into the targets.

    A fault that outlasts the retries there cannot be undone (no second copy is kept, by
    design): the error says so. Without a spool (``LWCKPT_SPOOL_DIR=none``), so that the fill
    pass reads from the store again. One I/O thread: the verify pass is one stream.
    """
    url = proxied.store.url("last.ckpt")
    _save_direct(proxied, url)
    verify_reads = 1  # one stream over every record
    proxied.proxy.add(Fault("status", skip=verify_reads, times=None, **DATA_GET))
    target = fresh_like(make_state(WIDTH), width=WIDTH)

    with override(spool_dir="none", io_threads=1), pytest.raises(CheckpointReadError) as info:
        Fabric().load(url, target, storage_options=proxied.options)

    assert "reading into the targets then failed" in str(info.value)
    assert url in str(info.value)


# -- lasting conditions: no retries, a clear message ------------------------------------------


def test_access_denied_is_not_retried(proxied: Proxied) -> None:
    url = proxied.store.url("last.ckpt")
    _save_direct(proxied, url)
    fault = proxied.proxy.add(Fault("status", status=403, times=None))

    # one part at a time: GCS component uploads all POST to the same URL
    with override(parts_in_flight=1), pytest.raises(CheckpointWriteError) as write_info:
        Fabric().save(url, make_state(WIDTH), storage_options=proxied.options)
    assert url in str(write_info.value)
    assert "Access denied" in str(write_info.value)
    saving_requests = list(proxied.proxy.requests)

    with pytest.raises(CheckpointReadError) as read_info:
        Fabric().load(url, storage_options=proxied.options)
    assert url in str(read_info.value)
    assert "Access denied" in str(read_info.value)
    # every request was refused once, and none was sent again
    assert fault.hits == len(proxied.proxy.requests)
    assert len(set(saving_requests)) == len(saving_requests)
    assert proxied.store.objects() == ["last.ckpt"]


def test_missing_bucket(store: Store) -> None:
    url = f"{store.protocol}://{store.bucket}-missing/last.ckpt"
    with pytest.raises(CheckpointWriteError) as info:
        Fabric().save(url, make_state(), storage_options=store.storage_options)
    assert url in str(info.value)
    assert "bucket does not exist" in str(info.value)
    with pytest.raises(CheckpointNotFoundError) as load_info:
        Fabric().load(url, storage_options=store.storage_options)
    assert url in str(load_info.value)


@pytest.mark.usefixtures("no_ambient_aws")
def test_missing_credentials(store: Store) -> None:
    if store.protocol == "gs":
        pytest.skip("gcsfs without a token looks for Google credentials beyond 127.0.0.1")
    options = {k: v for k, v in store.storage_options.items() if k not in ("key", "secret")}
    url = store.url("last.ckpt")
    with pytest.raises(CheckpointWriteError) as info:
        Fabric().save(url, make_state(), storage_options=options)
    assert url in str(info.value)
    assert "Credentials are missing or were refused" in str(info.value)
    assert "NoCredentialsError" in str(info.value)


@pytest.mark.parametrize("spool", [True, False], ids=["spooled", "no-spool"])
def test_in_place_load_streams_each_byte_once_in_a_few_requests(
    proxied: Proxied, spool: bool
) -> None:
    """The ranged in-place path: a few long streams, each byte fetched once (twice without spool).

    Verification streams every record through the CRC (bound tensors into an unnamed local spool
    file), one ranged GET per I/O thread, and the fill copies them from the spool once every CRC
    passed. Without a spool (``LWCKPT_SPOOL_DIR=none``) the fill streams the bound records again.
    The index (zip tail, local headers, pickle) takes small reads.
    """
    url = proxied.store.url("last.ckpt")
    state = _save_direct(proxied, url)
    size = proxied.store.fs.size(proxied.store.path("last.ckpt"))
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    assert_states_differ(target, state)
    pointers = [p.data_ptr() for p in target["model"].parameters()]

    with override(spool_dir="" if spool else "none", io_threads=2):
        Fabric().load(url, target, storage_options=proxied.options)

    assert_states_equal(target, state)
    assert [p.data_ptr() for p in target["model"].parameters()] == pointers
    sizes = [size for method, _, size, _ in proxied.proxy.requests if method == "GET"]
    streams = [s for s in sizes if s > MIB]  # more than the zip tail
    bound = 3 * WIDTH * WIDTH * 4  # fc1 weight + 2 AdamW moments
    passes = 1 if spool else 2
    assert len(streams) <= 2 * passes  # at most one stream per I/O thread and pass
    assert size - 2 * MIB + (0 if spool else bound) <= sum(streams) <= passes * size
    assert len(sizes) - len(streams) < 30  # the index: tail, a block per large record, pickle


def test_the_deadline_bounds_the_retries(proxied_s3: Proxied) -> None:
    """No new attempt starts past ``retry_deadline_s``, however many attempts are allowed."""
    url = proxied_s3.store.url("last.ckpt")
    _save_direct(proxied_s3, url)
    fault = proxied_s3.proxy.add(Fault("status", times=None, **DATA_GET))
    with (
        override(retry_attempts=50, retry_backoff_s=0.2, retry_deadline_s=0.0),
        pytest.raises(CheckpointReadError) as info,
    ):
        Fabric().load(url, storage_options=proxied_s3.options)
    assert str(info.value).startswith(f"{url}: reading failed after 1 attempt in ")
    assert fault.hits >= 1  # it failed on the data, and that range was not tried again


# -- lasting faults with the clients' default options: our timeouts end them ------------------

# Where each lasting fault hits: everything (drop, stall), or the bytes of a transfer (truncate:
# the answer to a part upload cut inside its status line; a data read cut after 64 KiB).
LASTING = {
    ("save", "drop"): {},
    ("save", "stall"): {},
    ("load", "drop"): {},
    ("load", "stall"): {},
    ("save", "truncate"): {"truncate_bytes": 10},
    ("load", "truncate"): {"truncate_bytes": 64 * 1024, **DATA_GET},
}
# The client's own exception once its retries ran out: the cause our error carries.
RAW_ERRORS = {
    ("s3", "save", "drop"): "botocore.exceptions.ConnectionClosedError",
    ("s3", "save", "stall"): "botocore.exceptions.ReadTimeoutError",
    ("s3", "save", "truncate"): "botocore.exceptions.ConnectionClosedError",
    ("s3", "load", "drop"): "botocore.exceptions.ConnectionClosedError",
    ("s3", "load", "stall"): "botocore.exceptions.ReadTimeoutError",
    ("s3", "load", "truncate"): "aiohttp.client_exceptions.ClientPayloadError",
    ("gs", "save", "drop"): "aiohttp.client_exceptions.ServerDisconnectedError",
    ("gs", "save", "stall"): "fsspec.exceptions.FSTimeoutError",
    ("gs", "save", "truncate"): "aiohttp.client_exceptions.ServerDisconnectedError",
    ("gs", "load", "drop"): "aiohttp.client_exceptions.ServerDisconnectedError",
    ("gs", "load", "stall"): "fsspec.exceptions.FSTimeoutError",
    ("gs", "load", "truncate"): "aiohttp.client_exceptions.ClientPayloadError",
}


@pytest.fixture(params=PROTOCOLS)
def default_clients(request: pytest.FixtureRequest, fast_gcsfs_retries: None) -> Iterator[Proxied]:
    """A bucket behind a fault proxy, reached with the store's plain options: no timeouts.

    The clients' timeouts are ours (``LWCKPT_REQUEST_TIMEOUT_S``, shortened here), not the
    test's; so is botocore's retry count. gcsfs's backoffs are shortened as in the other
    lasting-fault tests. A 3 s deadline: an attempt that stalled for longer is not repeated.
    """
    for store in open_store(request, request.param, block_bytes=BLOCK_BYTES[request.param]):
        with FaultProxy(store.server.endpoint) as proxy:
            options = {**store.storage_options, "endpoint_url": proxy.endpoint}
            with override(
                request_timeout_s=0.25,
                retry_attempts=2,
                retry_backoff_s=0.05,
                retry_deadline_s=3.0,
                io_threads=2,
                chunk_bytes=RANGE_BYTES,
                part_bytes=BLOCK_BYTES["s3"],
            ):
                yield Proxied(store, proxy, options)


def _causes(err: BaseException) -> list[str]:
    names = []
    current: BaseException | None = err
    while current is not None:
        names += [f"{k.__module__}.{k.__qualname__}" for k in type(current).__mro__]
        current = current.__cause__ or current.__context__
    return names


@pytest.mark.timeout(120)  # without our client timeouts a stalled request waits 300 s, 6 times
@pytest.mark.parametrize("kind", ["drop", "stall", "truncate"])
@pytest.mark.parametrize("action", ["save", "load"])
def test_lasting_fault_with_default_client_options_raises_our_error(
    default_clients: Proxied, action: str, kind: str
) -> None:
    proxied = default_clients
    url = proxied.store.url("last.ckpt")
    previous = _save_direct(proxied, url, steps=1)
    expected = snapshot(previous["model"])
    where = LASTING[action, kind]
    if kind == "truncate" and action == "save":
        where = {**where, **UPLOAD_PART[proxied.protocol]}
    fault = proxied.proxy.add(Fault(kind, times=None, stall_s=600.0, **where))
    target = fresh_like(make_state(WIDTH), width=WIDTH)
    before = snapshot(target["model"])
    error = CheckpointWriteError if action == "save" else CheckpointReadError

    def act() -> None:
        if action == "save":
            Fabric().save(url, make_state(WIDTH, steps=3), storage_options=proxied.options)
        else:
            Fabric().load(url, target, storage_options=proxied.options)

    with pytest.raises(error) as info:
        act()

    assert fault.hits >= 1
    message = str(info.value)
    assert message.startswith(f"{url}: {'writing' if action == 'save' else 'reading'} failed")
    raw = RAW_ERRORS[proxied.protocol, action, kind]
    assert raw in _causes(info.value), [n for n in _causes(info.value) if "builtins" not in n]
    # nothing half-written, nothing half-loaded
    assert proxied.store.visible_objects() == ["last.ckpt"]
    assert_states_equal(target["model"], before)
    assert_states_equal(_load_direct(proxied, url)["model"], expected)


@pytest.mark.timeout(120)
def test_a_store_that_is_down_is_not_taken_for_a_missing_directory(
    default_clients: Proxied,
) -> None:
    """fsspec's ``isdir`` answers False for any OSError: a dead store looked like "no directory".

    The directory probe behind every load (sharded or not) and the CLI must raise our error
    naming the URL instead, after its retries, rather than go on to the next request.
    """
    proxied = default_clients
    url = proxied.store.url("sharded")
    location = resolve(url, proxied.options)
    fault = proxied.proxy.add(Fault("drop", times=None))
    with pytest.raises(CheckpointReadError, match=re.escape(url)):
        dcp_dir.is_sharded(location)
    assert fault.hits >= 1
