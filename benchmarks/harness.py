"""Reusable pieces for the checkpoint benchmarks.

Everything here is independent of what is being measured, so the later benchmarks (sharded,
async, cloud) can reuse it:

* ``measure``: time one call and record the peak extra resident memory it caused, sampled by a
  background thread (``RssSampler``) and cross-checked with the kernel's ``VmHWM`` high-water mark
  after resetting it through ``/proc/self/clear_refs``.
* ``fsync_path`` / ``drop_page_cache``: make a write durable, or evict a file from the page cache.
* ``run_worker``: run one measurement in a fresh Python process and read back its JSON result.
* ``markdown_table`` / ``machine_info``: report.

Linux only: memory figures come from ``/proc/self/status``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

T = TypeVar("T")

MIB = 1024 * 1024
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


# --------------------------------------------------------------------------------------------
# Memory: /proc/self/status, peak reset, background sampler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemStatus:
    """Resident memory of this process, in bytes, from ``/proc/self/status``."""

    rss: int
    hwm: int
    anon: int
    file: int
    shmem: int


def read_mem_status() -> MemStatus:
    """Read VmRSS, VmHWM, RssAnon, RssFile and RssShmem of the current process."""
    values = dict.fromkeys(_STATUS_FIELDS, 0)
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return MemStatus(
        rss=values["VmRSS"],
        hwm=values["VmHWM"],
        anon=values["RssAnon"],
        file=values["RssFile"],
        shmem=values["RssShmem"],
    )


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the baseline is tight."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """Background thread that records the peak VmRSS and RssAnon every ``interval_s`` seconds.

    Use as a context manager around the code being measured. The thread mostly sleeps and reads a
    small procfs file; torch releases the GIL during I/O and tensor copies, so it keeps sampling
    while the measured call runs.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        first = read_mem_status()
        self.peak_rss = first.rss
        self.peak_anon = first.anon
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        status = read_mem_status()
        self.peak_rss = max(self.peak_rss, status.rss)
        self.peak_anon = max(self.peak_anon, status.anon)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass(frozen=True)
class Measurement:
    """Wall time and peak extra memory of one measured call (memory in bytes over baseline)."""

    seconds: float
    peak_extra_rss: int
    peak_extra_anon: int
    sampled_peak_extra_rss: int
    hwm_peak_extra_rss: int | None
    retained_extra_rss: int
    baseline_rss: int
    baseline_anon: int
    samples: int

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for the worker's JSON result."""
        return asdict(self)


def measure(fn: Callable[[], T], interval_s: float = 0.005) -> tuple[Measurement, T]:
    """Run ``fn`` once; return its wall time and peak extra RSS, and its return value.

    The baseline is taken right before the call (after a GC and ``malloc_trim``). The peak extra
    total RSS is the larger of the sampled peak and ``VmHWM`` (reset just before the call) minus
    the baseline; the anonymous peak (``RssAnon``, i.e. excluding mapped file pages) can only be
    sampled.
    """
    release_free_memory()
    hwm_ok = reset_peak_rss()
    base = read_mem_status()
    with RssSampler(interval_s) as sampler:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    after = read_mem_status()
    sampled = sampler.peak_rss - base.rss
    hwm = after.hwm - base.rss if hwm_ok else None
    measurement = Measurement(
        seconds=seconds,
        peak_extra_rss=max(sampled, hwm or 0),
        peak_extra_anon=sampler.peak_anon - base.anon,
        sampled_peak_extra_rss=sampled,
        hwm_peak_extra_rss=hwm,
        retained_extra_rss=after.rss - base.rss,
        baseline_rss=base.rss,
        baseline_anon=base.anon,
        samples=sampler.samples,
    )
    return measurement, value


# --------------------------------------------------------------------------------------------
# Files: durability and the page cache
# --------------------------------------------------------------------------------------------


def _fsync_fd_of(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Fsync a file, or every file and directory under a directory, and then the parent directory.

    Cheap when the writer already synced (clean pages), so it is applied to every contender.
    """
    root = Path(path)
    if root.is_dir():
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                _fsync_fd_of(Path(dirpath) / name)
            _fsync_fd_of(Path(dirpath))
    else:
        _fsync_fd_of(root)
    _fsync_fd_of(root.parent)


def iter_files(path: str | os.PathLike[str]) -> Iterable[Path]:
    """Yield ``path`` if it is a file, else every file below it."""
    root = Path(path)
    if root.is_file():
        yield root
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name


def path_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of a file or of all files under a directory."""
    return sum(file.stat().st_size for file in iter_files(path))


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Evict a (synced) file or directory tree from the page cache with POSIX_FADV_DONTNEED."""
    for file in iter_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(path: str | os.PathLike[str]) -> None:
    """Read every file under ``path`` once, so that a load finds it all in the page cache."""
    buffer = bytearray(16 << 20)
    for file in iter_files(path):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete a file or a directory tree if it exists."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Subprocess workers
# --------------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A worker subprocess failed; the message carries the tail of its output."""


def run_worker(
    script: str | os.PathLike[str],
    args: Sequence[str],
    timeout_s: float = 600.0,
    extra_pythonpath: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Run ``python script *args --result FILE`` in a fresh process and return the JSON it wrote.

    The worker must write a JSON object to the path given after ``--result``. Raises
    ``WorkerError`` (with the last lines of its stderr) if it fails, times out or writes nothing.
    """
    env = dict(os.environ)
    if extra_pythonpath:
        parts = [str(p) for p in extra_pythonpath]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
    fd, result_file = tempfile.mkstemp(prefix="bench-result-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(script), *args, "--result", result_file]
    try:
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise WorkerError(f"worker timed out after {timeout_s:.0f}s: {' '.join(cmd)}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise WorkerError(f"worker failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
        text = Path(result_file).read_text(encoding="utf-8")
        if not text.strip():
            raise WorkerError(f"worker wrote no result: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(text)
        return result
    finally:
        Path(result_file).unlink(missing_ok=True)


def exit_rank_worker() -> NoReturn:
    """End a torchrun rank worker after a clean run, without interpreter teardown.

    torch's static destructors occasionally abort a rank after a clean run ("terminate called
    without an active exception"); the result is already written, so skip them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_result(path: str | os.PathLike[str], result: Mapping[str, Any]) -> None:
    """Write a worker's JSON result (counterpart of ``run_worker``)."""
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render a GitHub-flavoured markdown table; numeric-looking columns are right-aligned."""
    str_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in str_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def is_numeric(col: int) -> bool:
        cells = [row[col] for row in str_rows if row[col] not in ("", "-", "—")]
        return bool(cells) and all(_looks_numeric(cell) for cell in cells)

    numeric = [is_numeric(i) for i in range(len(headers))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    seps = [
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
    ]
    lines.append("| " + " | ".join(seps) + " |")
    for row in str_rows:
        cells = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _looks_numeric(cell: str) -> bool:
    head = cell.split(" ", 1)[0].rstrip("%x")
    try:
        float(head)
    except ValueError:
        return False
    return True


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mount_of(path: Path) -> str:
    best = ("", "unknown")
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text(encoding="ascii").splitlines():
            device, mountpoint, fstype, *_ = line.split()
            if resolved.startswith(mountpoint) and len(mountpoint) > len(best[0]):
                best = (mountpoint, f"{device} ({fstype}) on {mountpoint}")
    return best[1]


def machine_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """CPU, memory, library versions and the filesystem holding ``data_dir``."""
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "filesystem": _mount_of(Path(data_dir)),
    }


def parse_contenders(text: str, contenders: Mapping[str, Callable[[], Any]]) -> list[str]:
    """Split a ``--contenders a,b`` value; exit naming any unknown contender."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in contenders]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {sorted(contenders)}")
    return names


def runnable(
    requested: Iterable[str], contenders: Mapping[str, Callable[[], Any]]
) -> tuple[list[str], dict[str, str]]:
    """Split contender names into those that can run here and ``{name: why not}``."""
    names: list[str] = []
    not_run: dict[str, str] = {}
    for name in requested:
        reason = contenders[name]().unavailable()
        if reason:
            not_run[name] = reason
            print(f"not run: {name}: {reason}", file=sys.stderr, flush=True)
        else:
            names.append(name)
    if not names:
        raise SystemExit("no contender can run")
    return names, not_run


@contextlib.contextmanager
def scratch_dir(requested: Path | None, repo_root: Path) -> Iterator[Path]:
    """Yield the folder benchmark files go to: ``requested``, or a temp folder on the repo's
    filesystem (not /dev/shm or a tmpfs), removed afterwards."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
        return
    path = Path(tempfile.mkdtemp(prefix=".ckpt-bench-", dir=repo_root))
    try:
        yield path
    finally:
        remove_path(path)


def dump_json(path: str | os.PathLike[str], payload: Mapping[str, Any], args: Any) -> None:
    """Write raw results with the command-line arguments that produced them."""
    record = {**payload, "args": {k: str(v) for k, v in vars(args).items()}}
    Path(path).write_text(json.dumps(record, indent=1), encoding="utf-8")
