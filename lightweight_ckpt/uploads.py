"""Multipart uploads to S3: streamed with bounded memory, published whole; and their cleanup.

``S3PartWriter`` is the sink of an S3 save (``storage.staged_write``). It copies what it is given
into part buffers of ``part_bytes`` and uploads each full one on a pool of ``parts_in_flight``
threads while the next fills, so a save holds at most ``(parts_in_flight + 1) * part_bytes``
bytes of the checkpoint, whatever its size. s3fs's own writer holds a 50 MiB block in a growing
``BytesIO`` and uploads it in one part, after copying it twice (``read()`` of the block, then
botocore/aiohttp's ``BytesIO`` of the bytes), one part at a time while serialization waits.
Here a part's body is a file object over its buffer, which the HTTP client reads 64 KiB at a
time: no copy of the part. Parts grow (x2 every 1000 parts) to stay within S3's 10,000.

The object is published only by ``commit()`` (``complete_multipart_upload``; a checkpoint
smaller than one part is one ``put_object``, atomic as well); ``discard()`` aborts the upload.
Parts go to the client directly: botocore's retries rewind a part's body, while s3fs's retry
loop would resend it consumed. A failure that outlasts them fails the save, which
``storage.write_with_retries`` restarts from its first byte into a fresh upload.

``incomplete_uploads`` / ``abort_incomplete_uploads`` list and abort the S3 multipart uploads a
killed save leaves behind (they are invisible, but are stored and billed until aborted).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import logging
import posixpath
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fsspec.asyn import sync

from lightweight_ckpt.retries import RetryPolicy, call_with_retries, classify_failure

if TYPE_CHECKING:
    from collections.abc import Callable

    from lightweight_ckpt.location import Location

log = logging.getLogger("lightweight_ckpt")

S3_MIN_PART_BYTES = 5 * 2**20  # every part but the last
S3_MAX_PART_BYTES = 5 * 2**30
_PARTS_PER_SIZE = 1000  # part size doubles after each 1000 parts (S3 allows 10,000)


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (no quotes).

    The MD5 of the parts' binary MD5s, then ``-`` and the part count. None where a part's ETag
    is not an MD5 (SSE-C / SSE-KMS objects), so that the completed object cannot be recognised.
    """
    digests = []
    for etag in part_etags:
        plain = etag.strip('"')
        if not re.fullmatch(r"[0-9a-fA-F]{32}", plain):
            return None
        digests.append(bytes.fromhex(plain))
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def part_size(number: int, part_bytes: int) -> int:
    """The size of part ``number`` (from 1): ``part_bytes``, doubled every 1000 parts.

    With 8 MiB parts, S3's 10,000 parts hold 7.8 TiB (S3's largest object is 5 TiB); a part is
    never over S3's 5 GiB.
    """
    return min(S3_MAX_PART_BYTES, part_bytes << ((number - 1) // _PARTS_PER_SIZE))


class _PartBody(io.RawIOBase):
    """A read-only, seekable file over one part's buffer: the client reads it in small pieces."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = min(max(0, base + offset), len(self._data))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        piece = self._data[self._pos : self._pos + len(buffer)]
        memoryview(buffer).cast("B")[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)

    def __len__(self) -> int:
        return len(self._data)


class _PartWriter:
    """Part buffering shared by the S3 and GCS writers: parts upload on a pool while the next fills.

    Subclasses say how a part is stored (``_put_part``), how the parts become the object
    (``_publish``), how an object smaller than one part is stored (``_put_whole``) and how
    stored parts are removed (``_abort``).
    """

    def __init__(
        self,
        location: Location,
        part_bytes: int,
        parts_in_flight: int,
        on_part: Callable[[int], None] | None = None,
    ) -> None:
        self._location = location
        self._bucket, _, self._key = location.path.partition("/")
        self._part_bytes = part_bytes
        self._on_part = on_part
        self._slots = threading.BoundedSemaphore(parts_in_flight)
        self._pool = ThreadPoolExecutor(parts_in_flight, thread_name_prefix="lwckpt-put")
        self._spare: list[bytearray] = []  # buffers whose upload ended, for the next parts
        self._buffer = bytearray(self._part_bytes)
        self._filled = 0
        self._written = 0
        self._started = False
        self._parts: list[Future[Any]] = []

    def write(self, data: Any) -> int:
        """Copy ``data`` into part buffers, uploading each as it fills; return the byte count."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(len(view) - done, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = view[done : done + take]
            self._filled += take
            done += take
            if self._filled == len(self._buffer):
                self._send_part()
        self._written += len(view)
        return len(view)

    def flush(self) -> None:
        """Do nothing: full parts are already on their way, and the rest waits for commit."""

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self._written

    def commit(self) -> None:
        """Upload what is left, wait for every part, and publish the object."""
        if not self._started:  # smaller than one part: one upload, atomic too
            self._put_whole(memoryview(self._buffer)[: self._filled])
            if self._on_part is not None:
                self._on_part(self._filled)
        else:
            if self._filled:
                self._send_part(last=True)
            self._publish([future.result() for future in self._parts])
        self._location.fs.invalidate_cache(self._location.path)
        self._close()

    def discard(self) -> None:
        """Stop the part uploads and remove what they stored (nothing is published)."""
        self._close()
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._abort()

    def _close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._spare.clear()

    def _send_part(self, last: bool = False) -> None:
        if not self._started:
            self._start()
            self._started = True
        self._slots.acquire()  # at most parts_in_flight uploads (and their buffers) at once
        for future in self._parts:  # a failed part fails the save now, not at commit
            if future.done() and future.exception() is not None:
                self._slots.release()
                future.result()
        number = len(self._parts) + 1
        buffer, size = self._buffer, self._filled
        self._parts.append(self._pool.submit(self._upload_part, number, buffer, size))
        if last:  # no buffer for a next part
            self._buffer, self._filled = bytearray(), 0
            return
        want = part_size(number + 1, self._part_bytes)
        spare = self._spare.pop() if self._spare else None
        self._buffer = spare if spare is not None and len(spare) == want else bytearray(want)
        self._filled = 0

    def _upload_part(self, number: int, buffer: bytearray, size: int) -> Any:
        try:
            out = self._put_part(number, memoryview(buffer)[:size])
            if self._on_part is not None:
                self._on_part(size)
            return out
        finally:
            self._spare.append(buffer)  # list.append is atomic; the filler pops
            self._slots.release()

    def _start(self) -> None:
        """Prepare for parts (before the first is sent)."""

    def _put_part(self, number: int, data: memoryview) -> Any:
        raise NotImplementedError

    def _publish(self, parts: list[Any]) -> None:
        raise NotImplementedError

    def _put_whole(self, data: memoryview) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError


class S3PartWriter(_PartWriter):
    """A sink that streams one S3 object as a multipart upload; see the module docstring.

    Args:
        location: the object (an s3fs filesystem and ``bucket/key``).
        part_bytes: the size of every part but the last (at least 5 MiB).
        parts_in_flight: parts uploading at once, on as many threads.
        on_part: called with the byte count of every part the store has acknowledged.
    """

    def __init__(
        self,
        location: Location,
        part_bytes: int,
        parts_in_flight: int,
        on_part: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(location, max(S3_MIN_PART_BYTES, part_bytes), parts_in_flight, on_part)
        self._upload_id: str | None = None

    def _start(self) -> None:
        created = self._location.fs.call_s3(
            "create_multipart_upload", Bucket=self._bucket, Key=self._key
        )
        self._upload_id = str(created["UploadId"])

    def _put_part(self, number: int, data: memoryview) -> dict[str, Any]:
        out = self._client_call("upload_part", data, PartNumber=number, UploadId=self._upload_id)
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:  # as s3fs: the one checksum complete needs repeated
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        return part

    def _publish(self, parts: list[Any]) -> None:
        """Complete the upload; if its answer was lost, ask the store whether it completed.

        Completing a large upload can take the store longer than a read timeout (S3 itself
        keeps the connection alive with whitespace; moto, MinIO and others answer only at the
        end), or its answer can be cut off. botocore then sends the request again, and the
        upload it names is already gone: the object was published, but the save would report
        failure and start over. So after a failure the object's ETag is compared with the one
        these parts give (``multipart_etag``); while the failure looks transient, the store is
        asked again until ``LWCKPT_RETRY_DEADLINE_S``, since it may still be assembling.
        """
        try:
            self._location.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except Exception as err:
            expected = multipart_etag([str(part["ETag"]) for part in parts])
            if expected is None:
                raise
            kind = classify_failure(err)
            patience = RetryPolicy.current().deadline_s if kind and kind[0] == "transient" else 0
            if not self._wait_for_etag(expected, time.monotonic() + patience):
                raise
            log.info(
                "%s: the store completed the upload, though its answer was lost (%s)",
                self._location.url, type(err).__name__,
            )  # fmt: skip

    def _wait_for_etag(self, expected: str, deadline: float) -> bool:
        """True once the object carries ``expected``; False if it does not by ``deadline``."""
        pause = 0.5
        while True:
            with contextlib.suppress(Exception):  # a missing object, or the store still busy
                head = self._location.fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
                if str(head.get("ETag", "")).strip('"') == expected:
                    return True
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 5.0)

    def _put_whole(self, data: memoryview) -> None:
        self._client_call("put_object", data)

    def _abort(self) -> None:
        self._location.fs.call_s3(
            "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
        )

    def _client_call(self, method: str, data: memoryview, **params: Any) -> dict[str, Any]:
        """Call ``method`` with ``data`` as the body, on the client directly (see the docstring).

        botocore's own retries rewind the body; s3fs's would resend it consumed.
        """
        fs = self._location.fs
        params.update(Bucket=self._bucket, Key=self._key, Body=_PartBody(data))
        return sync(fs.loop, _client_call, fs, method, params)  # type: ignore[no-any-return]


GCS_MAX_COMPOSE = 32  # source objects per GCS compose request
_COMPONENT = re.compile(r"^\.(?P<name>.+)\.part-(?P<token>[0-9a-f]{12})-[0-9a-z-]+$")


def _component_prefix(key: str, token: str) -> str:
    """``dir/.name.part-<token>-``: the components of one GCS save are named from this."""
    parent, name = posixpath.split(key)
    return posixpath.join(parent, f".{name}.part-{token}-")


class GCSComposeWriter(_PartWriter):
    """A sink that uploads one GCS object as parallel components, then composes them.

    Each full part is stored as a hidden *component* object next to the target
    (``dir/.name.part-<token>-00001``, ...), ``parts_in_flight`` at once (gcsfs's resumable
    upload sends its chunks one at a time). ``commit`` composes them into the target in one
    request (a tree of requests beyond 32 components), so the object appears only when whole,
    then deletes them; ``discard`` deletes them. A killed save leaves its components, which
    ``incomplete_uploads`` lists by name. Each part is sent from its own memory (a media
    upload), not copied into a request body.
    """

    def __init__(
        self,
        location: Location,
        part_bytes: int,
        parts_in_flight: int,
        on_part: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(location, part_bytes, parts_in_flight, on_part)
        self._prefix = _component_prefix(self._key, uuid.uuid4().hex[:12])

    def _put_part(self, number: int, data: memoryview) -> str:
        key = f"{self._prefix}{number:05d}"
        self._upload(key, data)
        return key

    def _upload(self, key: str, data: memoryview) -> None:
        fs = self._location.fs
        sync(fs.loop, _media_upload, fs, self._bucket, key, data)

    def _put_whole(self, data: memoryview) -> None:
        self._upload(self._key, data)

    def _publish(self, parts: list[Any]) -> None:
        keys: list[str] = parts
        level = 0
        while len(keys) > GCS_MAX_COMPOSE:  # compose groups of 32, then groups of those
            level += 1
            groups = [keys[i : i + GCS_MAX_COMPOSE] for i in range(0, len(keys), GCS_MAX_COMPOSE)]
            keys = [f"{self._prefix}c{level}-{i:05d}" for i in range(len(groups))]
            list(self._compose_pool().map(self._compose, keys, groups))
        self._compose(self._key, keys)
        with contextlib.suppress(Exception):  # leftovers are listed by incomplete_uploads
            self._abort()

    def _compose_pool(self) -> ThreadPoolExecutor:
        self._pool.shutdown(wait=True)
        self._pool = ThreadPoolExecutor(GCS_MAX_COMPOSE // 4, thread_name_prefix="lwckpt-compose")
        return self._pool

    def _compose(self, key: str, sources: list[str]) -> None:
        fs = self._location.fs
        target = f"{self._bucket}/{key}"
        paths = [f"{self._bucket}/{source}" for source in sources]
        call_with_retries(self._location.url, "writing", lambda: fs.merge(target, paths))

    def _abort(self) -> None:
        fs = self._location.fs
        parent = posixpath.dirname(f"{self._bucket}/{self._key}")
        fs.invalidate_cache(parent)
        found = fs.find(parent, prefix=posixpath.basename(self._prefix), maxdepth=1)
        if found:
            fs.rm(found)
        fs.invalidate_cache(parent)


async def _media_upload(fs: Any, bucket: str, key: str, data: memoryview) -> Any:
    """One-request GCS upload whose body is ``data`` itself (``uploadType=media``).

    gcsfs's ``simple_upload`` wraps the bytes in a multipart body, a copy of every part; a media
    upload sends the part's own memory, so a save holds each part in flight once.
    """
    path = f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o"
    headers = {"Content-Type": "application/octet-stream"}
    body = _sliced_body(data)
    return await fs._call(
        "POST", path, uploadType="media", name=key, headers=headers, data=body, json_out=True
    )


_BODY_SLICE_BYTES = 256 * 1024


def _sliced_body(data: memoryview) -> Any:
    """``data`` as an aiohttp body handed to the connection a slice at a time (re-sendable).

    aiohttp joins the request head and a whole bytes body into one new buffer before sending
    (Python < 3.12.9): a copy of every part in flight. In slices, only the first is joined, and
    the connection's buffer holds at most about one slice.
    """
    return _sliced_payload_class()(data, content_type="application/octet-stream")


@functools.cache
def _sliced_payload_class() -> Any:
    from aiohttp.payload import BytesPayload  # noqa: PLC0415 - gcsfs's dependency, loaded here

    class SlicedPayload(BytesPayload):
        async def write(self, writer: Any) -> None:
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            data = memoryview(self._value)
            end = len(data) if content_length is None else min(content_length, len(data))
            for start in range(0, end, _BODY_SLICE_BYTES):
                await writer.write(data[start : min(end, start + _BODY_SLICE_BYTES)])

    return SlicedPayload


async def _client_call(fs: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``method`` on the fs's client, with the fs's extra arguments (encryption, payer)."""
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]  # noqa: PLC0415
    from s3fs.errors import translate_boto_error  # noqa: PLC0415

    await fs.set_session()
    client = await fs.get_s3(params["Bucket"])
    name = client.meta.method_to_api_mapping[method]
    members = client.meta.service_model.operation_model(name).input_shape.members
    extra = {k: v for k, v in {**fs.s3_additional_kwargs, **fs.req_kw}.items() if k in members}
    try:
        result: dict[str, Any] = await getattr(client, method)(**extra, **params)
    except ClientError as err:
        raise translate_boto_error(err) from err  # as s3fs: OSError, PermissionError, ...
    return result


@dataclass(frozen=True)
class IncompleteUpload:
    """An upload neither completed nor aborted: S3 multipart, or GCS components.

    ``url`` is the object it was writing; ``upload_id`` the S3 upload id, or on GCS the token
    its components are named with; ``parts`` the GCS components' paths (empty on S3).
    """

    url: str
    upload_id: str
    initiated: datetime.datetime | None
    parts: tuple[str, ...] = ()


def incomplete_uploads(location: Location, older_than_s: float = 0.0) -> list[IncompleteUpload]:
    """List the uploads in progress under ``location`` started ``older_than_s`` ago.

    S3: multipart uploads. GCS: the components of a ``GCSComposeWriter`` save (one entry per
    save, dated by its oldest component). The path is a plain key prefix of the *target*
    (``s3://bucket/run`` also matches ``run2/...``; end it with ``/`` for one folder). A save that
    is still running has an incomplete upload too: the age spares it. Other filesystems have
    nothing to list: local and ``memory://`` saves leave temp files (``gc`` command).

    Raises:
        CheckpointReadError: the listing failed (after retries), or was refused.
    """
    if location.protocol in ("gs", "gcs"):
        return _gcs_components(location, older_than_s)
    if location.protocol not in ("s3", "s3a"):
        return []
    bucket, _, prefix = location.path.partition("/")
    params: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
    found: list[IncompleteUpload] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    while True:
        page = call_with_retries(
            location.url,
            "listing uploads",
            lambda: location.fs.call_s3("list_multipart_uploads", **params),
        )
        for upload in page.get("Uploads", []):
            started = upload.get("Initiated")
            if started is not None and (now - started).total_seconds() < older_than_s:
                continue
            found.append(
                IncompleteUpload(
                    f"{location.protocol}://{bucket}/{upload['Key']}",
                    str(upload["UploadId"]),
                    started,
                )
            )
        if not page.get("IsTruncated"):
            return found
        params["KeyMarker"] = str(page.get("NextKeyMarker", ""))
        params["UploadIdMarker"] = str(page.get("NextUploadIdMarker", ""))


def abort_incomplete_uploads(
    location: Location, older_than_s: float = 3600.0
) -> list[IncompleteUpload]:
    """Abort the uploads ``incomplete_uploads(location, older_than_s)`` lists; return them.

    An upload that completes or is aborted meanwhile is skipped.

    Raises:
        CheckpointReadError: the listing failed (after retries), or was refused.
        CheckpointWriteError: an abort failed (after retries), or was refused.
    """
    aborted = []
    for upload in incomplete_uploads(location, older_than_s):
        if upload.parts:  # GCS components: delete them

            def remove(parts: tuple[str, ...] = upload.parts) -> None:
                location.fs.rm(list(parts))

            with contextlib.suppress(FileNotFoundError):
                call_with_retries(upload.url, "writing", remove)
                aborted.append(upload)
            continue
        bucket, _, key = upload.url.split("://", 1)[1].partition("/")

        def abort(bucket: str = bucket, key: str = key, upload_id: str = upload.upload_id) -> Any:
            return location.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id
            )

        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: finished meanwhile
            call_with_retries(upload.url, "writing", abort)
            aborted.append(upload)
    return aborted


def _gcs_components(location: Location, older_than_s: float) -> list[IncompleteUpload]:
    """The component sets ``GCSComposeWriter`` saves left under ``location``'s prefix."""
    fs = location.fs
    bucket, _, prefix = location.path.partition("/")
    parent = posixpath.dirname(prefix)
    root = posixpath.join(bucket, parent) if parent else bucket
    fs.invalidate_cache(root)
    found = call_with_retries(location.url, "listing uploads", lambda: fs.find(root, detail=True))
    sets: dict[tuple[str, str], list[tuple[str, datetime.datetime | None]]] = {}
    for path, info in found.items():
        directory, name = posixpath.split(path.split("/", 1)[1] if "/" in path else "")
        match = _COMPONENT.match(name)
        target = posixpath.join(directory, match["name"]) if match else ""
        if match and target.startswith(prefix):
            sets.setdefault((target, match["token"]), []).append((path, _created(info)))
    now = datetime.datetime.now(datetime.timezone.utc)
    uploads = []
    for (target, token), parts in sorted(sets.items()):
        dates = [date for _, date in parts if date is not None]
        started = min(dates) if dates else None
        if started is not None and (now - started).total_seconds() < older_than_s:
            continue
        url = f"{location.protocol}://{bucket}/{target}"
        uploads.append(IncompleteUpload(url, token, started, tuple(sorted(p for p, _ in parts))))
    return uploads


def _created(info: dict[str, Any]) -> datetime.datetime | None:
    value = info.get("timeCreated")
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
