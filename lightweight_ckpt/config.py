"""Tunables, in one place: each has a default, an environment override and a test override.

``LWCKPT_IO_THREADS``: threads that verify and read records in parallel (default: up to 4, one
per CPU core). ``LWCKPT_CHUNK_BYTES``: the largest single read or remote write (default 16 MiB).

Retries of remote reads, saves and commits after a transient failure (connection reset, timeout,
5xx, throttling), on top of the clients' own (see ``storage``): ``LWCKPT_RETRY_ATTEMPTS`` tries
in all (default 4; 1 turns our retries off), ``LWCKPT_RETRY_BACKOFF_S`` the first backoff (default
0.5 s; doubling, full jitter, capped at 30 s), ``LWCKPT_RETRY_DEADLINE_S`` after which no new
attempt starts (default 300 s). ``LWCKPT_REQUEST_TIMEOUT_S``: how long one request may wait to
connect or for the next bytes of its answer before the client gives up on it (default 10 s; s3fs's
``connect_timeout``/``read_timeout`` and gcsfs's ``requests_timeout`` where the storage options set
none), so that a stalled request fails and ``LWCKPT_RETRY_DEADLINE_S`` bounds the operation.

``LWCKPT_SPOOL_DIR``: where a remote in-place load keeps the bytes it verified, so that they are
downloaded once (default: the system's temporary directory; ``none`` downloads twice instead).
The spool is an unnamed file, gone when the load ends or the process dies; it is not used on a
RAM-backed filesystem (tmpfs) or where free space is short.

``LWCKPT_PART_BYTES``: the part size of S3 multipart saves and of GCS composite saves' components
(default 8 MiB, at least S3's 5 MiB; it doubles every 1000 parts), ``LWCKPT_PARTS_IN_FLIGHT``
parts uploading at once per process (default 4). A save holds at most ``(parts_in_flight + 1) *
part_bytes`` of the checkpoint in memory, on S3 and on GCS alike. The pieces of a sharded save,
which every rank of a node uploads at once, share the default 4 among the node's ranks
(``piece_parts_in_flight``: ``max(2, 4 // LOCAL_WORLD_SIZE)``, ``LOCAL_WORLD_SIZE`` as torchrun
sets it), so that ranks neither multiply the node's upload memory nor compete for its cores and
link; a single file written by one rank (DDP, XLA) keeps all 4. ``LWCKPT_PARTS_IN_FLIGHT`` set
explicitly applies to every upload of the process, pieces included.

``LWCKPT_IO_THREADS`` is also the number of streams (one ranged GET each on S3 and GCS) a remote
load reads its records with; each holds one ``chunk_bytes`` buffer.

``LWCKPT_PROGRESS``: progress bars (tqdm, the ``progress`` extra) for remote uploads and
downloads that last over a second: ``auto`` (default) when stderr is a terminal, ``on``, ``off``.
Every save and load also logs its size, time and throughput at INFO.

``LWCKPT_WRITE_BEHIND_BYTES``: on Linux, a local save asks the disk to start writing every this
many bytes as soon as they are written (``sync_file_range``), so that the disk works while later
tensors are still serialized and the final fsync finds little left to do (default 16 MiB; ``0``
turns it off: everything is written back at the fsync).

``LWCKPT_DIRECT_IO``: ``on`` (default) writes local files (single-file saves and sharded pieces,
new or reused) around the page cache (``O_DIRECT``, from two aligned buffers, one filled while a
writer thread writes the other) where the filesystem allows it, so a save allocates no page cache
and evicts none of the caller's; ``off`` writes through the page cache, written behind as above
(as do filesystems refusing ``O_DIRECT``). The two buffers are all the memory a direct save adds,
and they are kept for the process's next save (at most two files' worth: a single file's and a
piece's), so a run's later saves add none.
A single file's buffers are 4 MiB each (on transparent huge pages where the kernel has them: one
request to the disk per write); a sharded save's pieces, which every rank of a node writes at
once, get 2 MiB each (``piece_buffer_bytes``: one huge page, one request per write, whatever the
number of ranks; 8 MiB of buffers per node at 2 ranks, 32 MiB at 8).
``LWCKPT_DIRECT_BUFFER_BYTES`` set explicitly sizes every direct file's buffers, pieces included.
Sizes are rounded down to a multiple of 4 KiB. On this project's VM, buffers of 2, 4 and 16 MiB
saved a single file equally fast; at FSDP2 world size 2, 2 MiB pieces saved in 0.73x DCP's time
where 512 KiB ones (one request per 512 KiB) took 1.19x.

``LWCKPT_REUSE_PIECES``: ``1`` (default) lets a sharded save on local disk overwrite the pieces of
the version two saves back in place instead of allocating new files; ``0`` writes fresh files
and removes each replaced version.

    with config.override(io_threads=1):
        fabric.load(path, state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True)
class Settings:
    """The tunables in force."""

    io_threads: int
    chunk_bytes: int
    retry_attempts: int = 4
    retry_backoff_s: float = 0.5
    retry_deadline_s: float = 300.0
    request_timeout_s: float = 10.0
    spool_dir: str = ""
    part_bytes: int = 8 << 20
    parts_in_flight: int = 4
    piece_parts_in_flight: int = 4
    progress: str = "auto"
    reuse_pieces: bool = True
    write_behind_bytes: int = 16 << 20
    direct_io: bool = True
    direct_buffer_bytes: int = 4 << 20
    piece_buffer_bytes: int = 2 << 20


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _node_share(per_node: int, least: int) -> int:
    """A process's share of ``per_node``, at least ``least`` (``LOCAL_WORLD_SIZE``: torchrun's)."""
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(least, per_node // local_ranks)


def _from_env() -> Settings:
    parts = os.environ.get("LWCKPT_PARTS_IN_FLIGHT")  # set: per process, pieces included
    buffer = os.environ.get("LWCKPT_DIRECT_BUFFER_BYTES")  # set: every direct file, pieces too
    return Settings(
        io_threads=max(
            1, int(os.environ.get("LWCKPT_IO_THREADS", str(min(4, os.cpu_count() or 1))))
        ),
        chunk_bytes=max(1 << 16, int(os.environ.get("LWCKPT_CHUNK_BYTES", str(16 << 20)))),
        retry_attempts=max(1, int(os.environ.get("LWCKPT_RETRY_ATTEMPTS", "4"))),
        retry_backoff_s=max(0.0, float(os.environ.get("LWCKPT_RETRY_BACKOFF_S", "0.5"))),
        retry_deadline_s=max(0.0, float(os.environ.get("LWCKPT_RETRY_DEADLINE_S", "300"))),
        request_timeout_s=max(0.1, float(os.environ.get("LWCKPT_REQUEST_TIMEOUT_S", "10"))),
        spool_dir=os.environ.get("LWCKPT_SPOOL_DIR", ""),
        part_bytes=max(5 << 20, int(os.environ.get("LWCKPT_PART_BYTES", str(8 << 20)))),
        parts_in_flight=max(1, int(parts)) if parts else 4,
        piece_parts_in_flight=max(1, int(parts)) if parts else _node_share(4, 2),
        progress=_choice("LWCKPT_PROGRESS", ("auto", "on", "off")),
        reuse_pieces=_choice("LWCKPT_REUSE_PIECES", ("1", "0")) == "1",
        direct_io=_choice("LWCKPT_DIRECT_IO", ("on", "off")) == "on",
        direct_buffer_bytes=max(4096, int(buffer)) if buffer else 4 << 20,
        piece_buffer_bytes=max(4096, int(buffer)) if buffer else 2 << 20,
        write_behind_bytes=max(0, int(os.environ.get("LWCKPT_WRITE_BEHIND_BYTES", str(16 << 20)))),
    )


_current: list[Settings] = [_from_env()]


def settings() -> Settings:
    """Return the tunables in force."""
    return _current[-1]


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change tunables inside a ``with`` block (tests, benchmarks)."""
    _current.append(dataclasses.replace(_current[-1], **changes))
    try:
        yield _current[-1]
    finally:
        _current.pop()
