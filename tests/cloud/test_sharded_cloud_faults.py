"""Faults on a sharded checkpoint's metadata calls: retried, or our error naming the URL.

A sharded load makes small calls before any data: ``.metadata`` (exists, then read), the listing
of the version folder (piece sizes), each piece's checksum record; a save checks the path and
makes its version folder; ``gc`` lists the tree. Each goes through the fault proxy
(tests/helpers/proxy.py) in front of the session's moto / fake-gcs-server, with real s3fs and
gcsfs. A transient fault is retried and the load gives identical values; a lasting one raises
``CheckpointReadError`` naming the URL (a store that failed, not a damaged checkpoint:
never ``CorruptCheckpointError``), and nothing the caller owns changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lightweight_ckpt import CorruptCheckpointError, Fabric
from lightweight_ckpt.config import override
from lightweight_ckpt.errors import CheckpointReadError
from lightweight_ckpt.manager.orphans import find_orphans
from lightweight_ckpt.strategies import FSDPStrategy
from tests.cloud.test_cloud_retries import (
    Proxied,
    _proxied,
    fast_gcsfs_retries,  # noqa: F401 - a fixture
)
from tests.cloud.test_sharded_remote import _trained
from tests.helpers.asserts import assert_states_differ, assert_states_equal, snapshot
from tests.helpers.proxy import Fault
from tests.helpers.servers import GCSFS_LARGE_BODY_WARNING, PROTOCOLS

pytestmark = [pytest.mark.cloud, GCSFS_LARGE_BODY_WARNING]

# the requests of each metadata call, on S3 and GCS alike (gcsfs may leave "/" unescaped)
CALLS = {
    "metadata": {"path": r"sharded(%2F|/)\.metadata"},
    "listing": {"method": "GET", "path": r"prefix=run(%2F|/)sharded(%2F|/)v-"},
    "record": {"path": r"\.distcp\.crc32"},
}
FAULTS = 6


@pytest.fixture(params=PROTOCOLS)
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    yield from _proxied(request, request.param)


def _save(proxied: Proxied, url: str) -> dict[str, Any]:
    model, optimizer = _trained(seed=1)
    state = {"model": model, "optimizer": optimizer, "step": 1}
    Fabric(strategy=FSDPStrategy()).save(url, state, storage_options=proxied.store.storage_options)
    return snapshot(model)


@pytest.mark.usefixtures("fast_gcsfs_retries")
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("kind", ["status", "drop"])
def test_a_transient_fault_in_a_metadata_call_is_retried(
    proxied: Proxied, call: str, kind: str
) -> None:
    """Six failed requests in a row: more than the clients retry on their own (S3: a 503)."""
    url = proxied.store.url("run", "sharded")
    expected = _save(proxied, url)
    fault = proxied.proxy.add(Fault(kind, times=FAULTS, **CALLS[call]))
    model, optimizer = _trained(seed=99)
    assert_states_differ(snapshot(model), expected)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}

    with override(retry_attempts=2 * FAULTS):
        Fabric(strategy=FSDPStrategy()).load(url, state, storage_options=proxied.options)

    assert fault.hits == FAULTS
    assert_states_equal(snapshot(model), expected)
    assert state["step"] == 1


@pytest.mark.usefixtures("fast_gcsfs_retries")
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_lasting_fault_in_a_metadata_call_names_the_url(proxied: Proxied, call: str) -> None:
    url = proxied.store.url("run", "sharded")
    _save(proxied, url)
    fault = proxied.proxy.add(Fault("status", times=None, **CALLS[call]))
    model, optimizer = _trained(seed=99)
    before = snapshot(model)

    with pytest.raises(CheckpointReadError) as info:
        Fabric(strategy=FSDPStrategy()).load(
            url, {"model": model, "optimizer": optimizer}, storage_options=proxied.options
        )

    assert fault.hits >= 1
    assert not isinstance(info.value, CorruptCheckpointError)
    message = str(info.value)
    assert message.startswith(f"{url}: reading failed after"), message
    assert_states_equal(snapshot(model), before)


@pytest.mark.usefixtures("fast_gcsfs_retries")
def test_gc_listing_retries_then_names_the_url(proxied: Proxied) -> None:
    url = proxied.store.url("run", "sharded")
    _save(proxied, url)
    listing = {"method": "GET", "path": r"(list-type=2|/o\?)"}  # S3 ListObjectsV2, GCS objects.list
    fault = proxied.proxy.add(Fault("status", **listing))
    assert find_orphans(proxied.store.url("run"), proxied.options, older_than_s=0) == []
    assert fault.hits == 1

    proxied.proxy.add(Fault("status", times=None, **listing))
    with pytest.raises(CheckpointReadError) as info:
        find_orphans(proxied.store.url("run"), proxied.options, older_than_s=0)
    assert str(info.value).startswith(f"{proxied.store.url('run')}: listing failed after")
