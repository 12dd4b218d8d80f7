"""Where a checkpoint lives: a local path or fsspec URL resolved to ``(fs, path, url)``.

Every other storage module (``storage``, ``sources``, ``uploads``) takes a ``Location``; a
missing client library (s3fs, gcsfs) is reported here with the extra that installs it.

Object-store clients get a request timeout here (``client_options``) where the storage options
set none: ``config.request_timeout_s`` for connecting and for each wait on an answer's bytes
(s3fs: botocore's ``connect_timeout``/``read_timeout``; gcsfs: an aiohttp ``ClientTimeout`` with
``sock_connect``/``sock_read`` and no total, so a slow but moving transfer is not cut off).
Without it a stalled gcsfs request waits on aiohttp's 300 s default, six times over, and no
retry deadline of ours could end it. botocore gets 2 attempts (``standard`` mode) unless
``config_kwargs["retries"]`` is given: s3fs's wrapper already tries 5 times, and botocore's
default 5 under it made a stalled S3 request 25 timeouts and ~40 s of backoffs long.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightweight_ckpt.config import settings

if TYPE_CHECKING:
    from lightweight_ckpt.types import StorageOptions, StrPath

_EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_BOTOCORE_RETRIES = {"mode": "standard", "total_max_attempts": 2}


@dataclass(frozen=True)
class Location:
    """A resolved checkpoint path: the filesystem, its native path, and the URL the user gave."""

    fs: Any  # fsspec.AbstractFileSystem (untyped upstream)
    path: str
    url: str

    @property
    def is_local(self) -> bool:
        """True for the local disk, where rename and mmap are available."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def protocol(self) -> str:
        """The filesystem's primary protocol name (``file``, ``memory``, ``s3``, ...)."""
        protocol = self.fs.protocol
        return str(protocol if isinstance(protocol, str) else protocol[0])


def resolve(path: StrPath, storage_options: StorageOptions | None = None) -> Location:
    """Resolve a local path or fsspec URL to a ``Location``.

    Raises:
        ModuleNotFoundError: the URL's filesystem needs an extra that is not installed.
    """
    url = os.fspath(path)
    try:
        fs, fs_path = fsspec.core.url_to_fs(url, **client_options(url, storage_options))
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        extra = _EXTRA_FOR_PROTOCOL.get(protocol)
        hint = f"pip install 'lightweight-ckpt[{extra}]'" if extra else str(err)
        raise ModuleNotFoundError(f"{url}: {protocol}:// paths need an extra: {hint}") from err
    return Location(fs=fs, path=fs_path, url=url)


def client_options(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """The storage options for ``url``'s client, with our request timeouts where none are set.

    The user's own values (``config_kwargs={"read_timeout": ...}``, ``requests_timeout=...``)
    are kept as given.
    """
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(url)
    if "::" in url or protocol not in _EXTRA_FOR_PROTOCOL:
        return options
    timeout_s = settings().request_timeout_s
    if _EXTRA_FOR_PROTOCOL[protocol] == "s3":
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", timeout_s)
        config_kwargs.setdefault("read_timeout", timeout_s)
        config_kwargs.setdefault("retries", dict(_BOTOCORE_RETRIES))
        options["config_kwargs"] = config_kwargs
    elif "requests_timeout" not in options:
        try:
            import aiohttp  # noqa: PLC0415 - gcsfs's transport, optional like gcsfs
        except ImportError:
            return options
        options["requests_timeout"] = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=timeout_s
        )
    return options
