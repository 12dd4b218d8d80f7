"""Cloud test fixtures: one local S3 and one local GCS server per session, a bucket per test.

``store`` runs a test on both: ``s3`` (moto) and ``gs`` (fake-gcs-server), each a process of its
own on 127.0.0.1. A server that cannot start at all skips its tests with the reason; with the
``CI`` environment variable set it fails them instead.
"""

from __future__ import annotations

import os

# gcsfs probes for zonal/HNS buckets over gRPC (a 60 s wait per call against a fake server)
# unless this is off. It must be set before gcsfs is imported, and before the hygiene fixture's
# first snapshot of the environment, so: here, at import, for the whole session.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.servers import (
    PROTOCOLS,
    LocalServer,
    ServerUnavailable,
    Store,
    open_store,
    require_module,
    running,
    start_fake_gcs,
    start_moto,
    unavailable,
)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    require_module("s3fs", "s3 tests need s3fs (pip install 'lightweight-ckpt[s3]')")
    try:
        with running(start_moto, tmp_path_factory.mktemp("moto")) as server:
            yield server
    except ServerUnavailable as err:
        unavailable(f"no local S3 server: {err}")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    require_module("gcsfs", "gs tests need gcsfs (pip install 'lightweight-ckpt[gcs]')")
    try:
        with running(start_fake_gcs, tmp_path_factory.mktemp("fake-gcs")) as server:
            yield server
    except ServerUnavailable as err:
        unavailable(f"no local GCS server: {err}")


@pytest.fixture(params=PROTOCOLS)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh bucket on the local S3 and GCS servers (the test runs once for each)."""
    yield from open_store(request, request.param)


@pytest.fixture
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials from the environment, ~/.aws or the instance metadata service.

    A call that misses the test's storage options then fails at once (NoCredentialsError)
    instead of reaching out for credentials or to AWS itself.
    """
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
