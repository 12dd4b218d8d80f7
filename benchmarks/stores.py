"""Object stores for the benchmarks: the test suite's local S3/GCS server, a bucket, URLs.

The servers are tests/helpers/servers.py's: moto (S3) and fake-gcs-server (GCS), each its own
process on 127.0.0.1. ``serving(store, log_dir)`` runs one for a whole benchmark run, with a
fresh bucket that is emptied and deleted afterwards; worker processes rebuild the fsspec options
from the endpoint with ``options_for``. Nothing here talks to anything but 127.0.0.1.

``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is set to ``false`` before gcsfs is imported (otherwise
gcsfs probes a fake server over gRPC, a 60 s wait per call), here and in every child process,
which inherits the environment.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
STORES = ("s3", "gs")
SERVERS = {"s3": "moto", "gs": "fake-gcs-server"}


def _servers_module() -> Any:
    """``tests.helpers.servers``, with the repository on ``sys.path`` and gcsfs's probe off."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.helpers import servers

    return servers


def options_for(store: str, endpoint: str) -> dict[str, Any]:
    """fsspec storage options that reach the local server of ``store`` at ``endpoint``."""
    servers = _servers_module()
    if store == "s3":
        return dict(servers.s3_storage_options(endpoint))
    return dict(servers.gcs_storage_options(endpoint))


def filesystem(store: str, endpoint: str) -> Any:
    """The fsspec filesystem (s3fs or gcsfs) for the local server of ``store``."""
    import fsspec

    return fsspec.filesystem(store, **options_for(store, endpoint))


@dataclass(frozen=True)
class Bucket:
    """A fresh bucket on a running local server."""

    store: str
    endpoint: str
    name: str

    def fresh_url(self, stem: str) -> str:
        """``<store>://<bucket>/<stem>-<random>``: a prefix nothing has written to yet."""
        return f"{self.store}://{posixpath.join(self.name, stem)}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def serving(store: str, log_dir: Path) -> Iterator[Bucket]:
    """Start the local server for ``store`` and create a bucket; delete both afterwards."""
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}; choose from {STORES}")
    servers = _servers_module()
    start = servers.start_moto if store == "s3" else servers.start_fake_gcs
    with servers.running(start, log_dir) as server:
        fs = filesystem(store, server.endpoint)
        bucket = servers.create_bucket(fs, store)
        try:
            yield Bucket(store, server.endpoint, bucket)
        finally:
            with contextlib.suppress(Exception):  # the server stops next anyway
                servers.delete_bucket(fs, store, bucket)


def stored_size(url: str, options: dict[str, Any]) -> tuple[int, int]:
    """``(bytes, objects)`` stored under the prefix ``url``, listed fresh from the server."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)
    return sum(int(info.get("size") or 0) for info in found.values()), len(found)


def remove_url(url: str, options: dict[str, Any]) -> None:
    """Delete every object under the prefix ``url`` (frees the in-memory server's memory)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    keys = fs.find(path)
    if keys:
        fs.rm(keys)
    fs.invalidate_cache()


def import_client(store: str) -> None:
    """Import the store's fsspec client modules (before a memory baseline, for everyone alike)."""
    _servers_module()
    if store == "s3":
        import s3fs  # noqa: F401
    else:
        import gcsfs  # noqa: F401
