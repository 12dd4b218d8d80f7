"""Where a checkpoint lives: a local path or fsspec URL resolved to ``(fs, path, url)``.

Every other storage module (``storage``, ``sources``, ``uploads``) takes a ``Location``; a
missing client library (s3fs, gcsfs) is reported here with the extra that installs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from lightweight_ckpt.types import StorageOptions, StrPath

_EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


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
        fs, fs_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        extra = _EXTRA_FOR_PROTOCOL.get(protocol)
        hint = f"pip install 'lightweight-ckpt[{extra}]'" if extra else str(err)
        raise ModuleNotFoundError(f"{url}: {protocol}:// paths need an extra: {hint}") from err
    return Location(fs=fs, path=fs_path, url=url)
