"""The single-file format: a stock ``torch.save`` zip archive, written streaming, read verified.

Writing streams ``torch.save`` into the sink ``storage.staged_write`` hands us: records go
straight from tensor memory to the file, never through a whole-checkpoint buffer. The result is
what ``torch.load(path, weights_only=True)`` opens, with no trace of this library.

Reading is staged so that a load is all-or-nothing and needs no extra memory:

1. ``TorchFileReader.skeleton()`` reads the index and ``data.pkl`` (verified) and unpickles the
   object tree with storages that are allocated but not yet read (no page of them is touched).
2. ``verify(bindings)`` checks the CRC32 of every record and fills the tree's own storages. It
   writes nothing the caller owns, and picks which *bindings* (the caller's parameters and
   optimizer moments, see ``state.Binding``) it can honour. On local disk a bound record is
   hashed through a private memory map, its pages dropped as they are hashed; an unbound one
   (a fresh optimizer's moments, a plain tensor value) is read into its storage piece by piece,
   each piece hashed while still in the CPU cache. Nothing handed back is backed by the file
   (``torch.load(mmap=True)`` hands back views of a private mapping: every page is faulted in
   and copied on the first write, i.e. the first optimizer step, and a later in-place rewrite
   of the file can change or truncate what was verified).
3. ``fill()`` reads those records straight into their targets. The caller runs it only once
   everything else has been accepted, so a failed load changes nothing.

Remote sources (s3://, gs://, ...) are read as ranges of at most ``chunk_bytes``, on
``io_threads`` threads at once, whichever records they belong to; each record's CRC32 is
combined from its ranges' (``formats.ranges``). A bound record (one read straight into the
caller's tensor) must not reach its target before every CRC passed, yet must not be held in
memory either: ``verify`` writes its ranges to a *spool*, an unnamed local temporary file
(``LWCKPT_SPOOL_DIR``), as they stream through the CRC, and ``fill`` copies them from there. So
each byte crosses the network once, and an in-place remote load holds ``io_threads *
chunk_bytes`` bytes beyond the targets. Where no spool can be had (RAM-backed tmpfs, too little
free space, ``LWCKPT_SPOOL_DIR=none``) ``fill`` downloads the bound records again and checks
their CRC a second time (which catches an object replaced between the two passes).

The object tree is unpickled with ``weights_only``'s rules, but at C speed (``_FastUnpickler``:
torch's own unpickler is pure Python and took a quarter of a warm 1.5 GB load) for the globals a
dense checkpoint names. Files that are not plain zip checkpoints of dense tensors (pre-1.6
pickles, TorchScript archives, other byte orders, a ``map_location`` other than the CPU, sparse
or quantized tensors, ``add_safe_globals`` types) take ``torch.load`` itself, after the same CRC
checks where the format has them.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import pickle
import sys
import threading
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import torch

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointReadError,
    CorruptCheckpointError,
)
from lightweight_ckpt.formats import ranges, torch_pickle
from lightweight_ckpt.formats.zip_records import (
    LEGACY_MAGIC,
    Record,
    check_crc,
    crc32,
    crc_into,
    crc_of_map,
    crc_of_source,
    read_index,
    require_extent,
)
from lightweight_ckpt.state import iter_tensors
from lightweight_ckpt.storage import Source, SourceFile

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from lightweight_ckpt.types import MapLocation

_BOUNCE_BYTES = 8 * 1024 * 1024
_COPY_WINDOW_BYTES = 16 * 1024 * 1024
_T = TypeVar("_T")


def copy_from_map(source: Source, mapped: mmap.mmap, record: Record, target: torch.Tensor) -> None:
    """Copy a verified record from the file's map into ``target``'s storage, window by window.

    A copy from the map (page-cache pages mapped, then ``memcpy`` outside the GIL) runs at
    about twice the speed of ``preadv`` here; each window's pages are dropped from the map once
    copied, so the load's resident set grows by one window, not by the file. The file's size
    is checked before each window: reading a mapped page past a new end raises SIGBUS, which
    would kill the process, so a file truncated behind our back raises our error instead.

    Raises:
        CorruptCheckpointError: the file shrank since it was verified.
    """
    destination = torch.empty(0, dtype=torch.uint8).set_(target.untyped_storage())
    whole = torch.frombuffer(mapped, dtype=torch.uint8)
    try:
        for start in range(0, record.size, _COPY_WINDOW_BYTES):
            end = min(start + _COPY_WINDOW_BYTES, record.size)
            first, last = record.offset + start, record.offset + end
            require_extent(source, record, last)
            destination[start:end].copy_(whole[first:last])
            aligned = first - first % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, aligned, last - aligned)
    finally:
        del whole  # a traceback keeps this frame: the map could not be closed while it exports


def byte_view(storage: torch.UntypedStorage) -> memoryview:
    """Return a writable memoryview of a CPU storage's bytes (no copy, no numpy needed)."""
    array = (ctypes.c_ubyte * storage.nbytes()).from_address(storage.data_ptr())
    return memoryview(array).cast("B")


class TorchFileReader:
    """Read one torch zip checkpoint: ``skeleton()``, then ``verify()``, then ``fill()``."""

    def __init__(
        self,
        source: Source,
        weights_only: bool,
        map_location: MapLocation,
        *,
        mapped_storages: bool = False,
    ) -> None:
        """Prepare to read ``source``.

        With ``mapped_storages``, a local file's tensors are views of a private memory map and
        ``verify``/``fill`` are not needed to read them (tools that read one tensor at a time,
        already checked by ``zip_records.verify_records``); loads leave it off.
        """
        self.source = source
        self.weights_only = weights_only
        self.map_location = map_location
        self._mapped_storages = mapped_storages
        self._whole: torch.UntypedStorage | None = None
        self._records: dict[str, Record] = {}
        self._prefix = ""
        self._mapped: Any = None  # mmap.mmap for local files
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._record_by_ptr: dict[int, Record] = {}
        self._chosen: dict[int, tuple[Record, torch.Tensor]] = {}
        self._tree: Any = None
        self._spool: IO[bytes] | None = None  # verified bytes of bound remote records

    def skeleton(self) -> Any:
        """Return the checkpoint's object tree; tensor data is not read (or checked) yet."""
        if self.source.read_at(0, len(LEGACY_MAGIC)) == LEGACY_MAGIC:
            return self._eager()
        self._records = read_index(self.source)
        pickle_name = next((n for n in self._records if n.endswith("/data.pkl")), None)
        if pickle_name is None:
            raise CorruptCheckpointError(f"{self.source.url}: no data.pkl record: not a checkpoint")
        self._prefix = pickle_name[: -len("data.pkl")]
        if self._needs_eager():
            self._verify_all()
            return self._eager()
        self._mapped = self.source.map()
        try:
            self._tree = self._unpickle(self._read_record(pickle_name))
        except torch_pickle.OffFastPathError:
            self._storages.clear()
            self._record_by_ptr.clear()
            self._verify_all()
            return self._eager()
        return self._tree

    def _needs_eager(self) -> bool:
        byteorder = self._records.get(self._prefix + "byteorder")
        is_foreign = (
            byteorder is not None and self._read_record(byteorder.name) != sys.byteorder.encode()
        )
        is_script = self._prefix + "constants.pkl" in self._records
        on_cpu = self.map_location is None or str(self.map_location) == "cpu"
        return is_foreign or is_script or not on_cpu

    def _read_record(self, name: str) -> bytes:
        record = self._records[name]
        data = self.source.read_at(record.offset, record.size)
        check_crc(self.source.url, record, crc32(data, 0))
        return data

    def _unpickle(self, data: bytes) -> Any:
        stream = io.BytesIO(data)
        unpickler: Any
        if self.weights_only:
            unpickler = torch_pickle.FastUnpickler(stream, encoding="utf-8")
        else:
            unpickler = torch_pickle.FullUnpickler(stream, encoding="utf-8")
        unpickler.persistent_load = self._persistent_load
        try:
            return unpickler.load()
        except torch_pickle.OffFastPathError:
            raise
        except pickle.UnpicklingError as err:
            raise torch_pickle.unpickling_error(self.source.url, err, self.weights_only) from err
        except CorruptCheckpointError:
            raise
        except Exception as err:  # a damaged pickle can fail in any way
            raise CorruptCheckpointError(
                f"{self.source.url}: the checkpoint's pickle is damaged: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _persistent_load(self, saved_id: tuple[Any, ...]) -> torch.storage.TypedStorage:
        typename, storage_type, key, _location, numel = saved_id
        if typename not in ("storage", b"storage"):
            raise CorruptCheckpointError(f"{self.source.url}: unknown persistent id {typename!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            self._storages[key] = self._new_storage(key, numel * dtype.itemsize)
        return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=self._storages[key], dtype=dtype, _internal=True
        )

    def _new_storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        record = self._records.get(f"{self._prefix}data/{key}")
        if record is None or record.size != nbytes:
            raise CorruptCheckpointError(
                f"{self.source.url}: storage {key} is missing or has the wrong size"
            )
        if self._mapped_storages and self._mapped is not None and nbytes:
            if self._whole is None:
                self._whole = torch.frombuffer(self._mapped, dtype=torch.uint8).untyped_storage()
            storage = self._whole[record.offset : record.offset + nbytes]
        else:
            storage = torch.UntypedStorage(nbytes)  # type: ignore[no-untyped-call]
        if nbytes:
            self._record_by_ptr[storage.data_ptr()] = record
        return cast("torch.UntypedStorage", storage)

    def verify(self, bindings: Mapping[int, torch.Tensor]) -> set[int]:
        """Check every record's CRC32 and fill the tree's own storages; write no target.

        ``bindings`` maps ``id(tensor in the skeleton)`` to a target tensor of the same shape and
        dtype. Returns the ids that ``fill()`` will read straight into their target; those
        skeleton tensors stay unread and the caller must put the targets in their place.

        Raises:
            CorruptCheckpointError: a record's CRC32 does not match; nothing has been written.
        """
        if self._tree is None:
            return set()
        self._chosen = self._bindable(bindings)
        self._verify_all(
            self._names_by_record(), release={r.name for r, _ in self._chosen.values()}
        )
        return set(self._chosen)

    def fill(self) -> None:
        """Read the verified records of the honoured bindings into their targets.

        Both passes run on ``io_threads`` threads (CRC32 and ``preadv`` release the GIL),
        largest records first.
        """
        copies = sorted(self._chosen.values(), key=lambda pair: -pair[0].size)
        self._chosen = {}
        if self._mapped is None and self._spool is None:
            self._fill_remote(copies)
            return
        if self._spool is not None:
            fd = self._spool.fileno()
            _parallel(
                lambda pair: ranges.preadv_all(
                    fd, byte_view(pair[1].untyped_storage()), pair[0].offset
                ),
                copies,
            )
            self.close_spool()
            return
        mapped = self._mapped
        if mapped is not None:
            _parallel(lambda pair: copy_from_map(self.source, mapped, pair[0], pair[1]), copies)
            return
        _parallel(
            lambda pair: self.source.readinto_at(
                pair[0].offset, byte_view(pair[1].untyped_storage())
            ),
            copies,
        )

    def _fill_remote(self, copies: Sequence[tuple[Record, torch.Tensor]]) -> None:
        """Read into the targets as ranges; a CRC that now differs means the object changed."""
        records = [(record, byte_view(target.untyped_storage())) for record, target in copies]
        try:
            crcs = ranges.ranged_crcs(self.source, records)
        except CheckpointReadError as err:
            raise CheckpointReadError(
                f"{err} Everything was verified, but reading into the targets then failed: "
                "some tensors hold the checkpoint's data and others not; load again."
            ) from err
        for (record, _), actual in zip(records, crcs, strict=True):
            if record.crc not in (actual, 0):
                raise CorruptCheckpointError(
                    f"{self.source.url}: record {record.name!r} changed while it was loaded "
                    f"(CRC32 {record.crc:08x} when verified, {actual:08x} now): another save "
                    "replaced the object. Some tensors hold the new data; load again."
                )

    def _names_by_record(self) -> dict[str, str]:
        names: dict[str, str] = {}
        for name, tensor in iter_tensors(self._tree):
            record = self._record_of(tensor)
            if record is not None:
                names.setdefault(record.name, name)
        return names

    def _record_of(self, tensor: torch.Tensor) -> Record | None:
        return self._record_by_ptr.get(tensor.untyped_storage().data_ptr())

    def _bindable(
        self, bindings: Mapping[int, torch.Tensor]
    ) -> dict[int, tuple[Record, torch.Tensor]]:
        """Keep the bindings we can honour: whole-storage tensors with CPU targets."""
        chosen = {}
        for _, tensor in iter_tensors(self._tree):
            target = bindings.get(id(tensor))
            record = self._record_of(tensor)
            if target is None or record is None or target.device.type != "cpu":
                continue
            if _whole_storage(tensor) and _whole_storage(target):
                chosen[id(tensor)] = (record, target)
        return chosen

    def _verify_all(
        self,
        names: Mapping[str, str] | None = None,
        release: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Check every record's CRC; fill the tree's unbound storages from the source as we go."""
        names = names or {}
        by_record = {f"{self._prefix}data/{k}": s for k, s in self._storages.items()}
        if self._mapped is None:
            self._verify_remote(names, release, by_record)
            return

        def verify(record: Record) -> None:
            storage = by_record.get(record.name)
            unbound = record.name not in release and not self._mapped_storages
            if storage is not None and storage.nbytes() and unbound:
                actual = crc_into(self.source, record, byte_view(storage))
            elif self._mapped is not None:
                actual = crc_of_map(
                    self.source, self._mapped, record, release=record.name in release
                )
            else:
                actual = crc_of_source(
                    self.source, record, bytearray(min(record.size, _BOUNCE_BYTES) or 1)
                )
            check_crc(self.source.url, record, actual, names.get(record.name))

        _parallel(verify, sorted(self._records.values(), key=lambda r: -r.size))

    def _verify_remote(
        self,
        names: Mapping[str, str],
        release: set[str] | frozenset[str],
        by_record: Mapping[str, torch.UntypedStorage],
    ) -> None:
        """Check every record as parallel ranges: into its storage, or only through the CRC.

        Records in ``release`` (bound to a target) and records without a storage of their own
        are hashed and dropped range by range, so they cost no memory here.
        """
        records: list[tuple[Record, memoryview | None]] = []
        for record in self._records.values():
            storage = by_record.get(record.name)
            keep = storage is not None and storage.nbytes() and record.name not in release
            records.append((record, byte_view(storage) if keep and storage is not None else None))
        spooled = {i for i, (record, _) in enumerate(records) if record.name in release}
        self.close_spool()
        self._spool = (
            ranges.open_spool(sum(records[i][0].size for i in spooled)) if spooled else None
        )
        spool = (self._spool.fileno(), spooled) if self._spool is not None else None
        try:
            crcs = ranges.ranged_crcs(self.source, records, spool)
            for (record, _), actual in zip(records, crcs, strict=True):
                check_crc(self.source.url, record, actual, names.get(record.name))
        except BaseException:
            self.close_spool()
            raise

    def close_spool(self) -> None:
        """Drop the spooled bytes (after ``fill``, or when the load is abandoned)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _eager(self) -> Any:
        """Load with ``torch.load`` for files outside the fast path."""
        file = SourceFile(self.source)
        try:
            return torch.load(
                cast("IO[bytes]", file),
                map_location=cast("Any", self.map_location or "cpu"),
                weights_only=self.weights_only,
            )
        except CheckpointError:
            raise  # the store failed (after retries): not a damaged file
        except pickle.UnpicklingError as err:
            raise torch_pickle.unpickling_error(self.source.url, err, self.weights_only) from err
        except Exception as err:  # torch.load of damaged bytes can fail in any way
            detail = f"{type(err).__name__}: {err}".rstrip(": ")
            raise CorruptCheckpointError(f"{self.source.url}: unreadable ({detail})") from err


def _parallel(fn: Callable[[_T], None], items: Sequence[_T]) -> None:
    """Run ``fn`` over ``items`` on the configured threads; re-raise the first failure.

    The calling thread is one of the workers, and each worker takes the next item from a
    shared iterator: a checkpoint of many small records (biases, AdamW's ``step`` scalars)
    costs no future or wake-up per record. After a failure no new item starts.
    """
    threads = min(settings().io_threads, len(items))
    if threads <= 1:
        for item in items:
            fn(item)
        return
    pending = iter(items)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        while not failures:
            with lock:
                item = next(pending, _DONE)
            if item is _DONE:
                return
            try:
                fn(cast("_T", item))
            except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
                failures.append(err)

    helpers = [
        threading.Thread(target=work, name=f"lwckpt-read-{n}", daemon=True)
        for n in range(threads - 1)
    ]
    for helper in helpers:
        helper.start()
    try:
        work()
    finally:
        for helper in helpers:
            helper.join()
    if failures:
        raise failures[0]


_DONE = object()


def _whole_storage(tensor: torch.Tensor) -> bool:
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        and tensor.numel() > 0
    )
