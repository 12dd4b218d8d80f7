"""Multipart uploads on object stores: the S3 multipart uploads a killed save leaves behind.

``incomplete_uploads`` / ``abort_incomplete_uploads`` list and abort them (they are invisible,
but are stored and billed until aborted).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightweight_ckpt.retries import call_with_retries

if TYPE_CHECKING:
    from lightweight_ckpt.location import Location


@dataclass(frozen=True)
class IncompleteUpload:
    """An S3 multipart upload that was neither completed nor aborted."""

    url: str
    upload_id: str
    initiated: datetime.datetime | None


def incomplete_uploads(location: Location, older_than_s: float = 0.0) -> list[IncompleteUpload]:
    """List the S3 multipart uploads in progress under ``location`` started ``older_than_s`` ago.

    The path is a plain key prefix (``s3://bucket/run`` also matches ``run2/...``; end it with
    ``/`` for one folder). A save that is still running has an incomplete upload too: the age
    spares it. Other filesystems have nothing to list: GCS resumable uploads are not listable
    and expire after a week; local and ``memory://`` saves leave temp files (``gc`` command).

    Raises:
        CheckpointReadError: the listing failed (after retries), or was refused.
    """
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
        bucket, _, key = upload.url.split("://", 1)[1].partition("/")

        def abort(bucket: str = bucket, key: str = key, upload_id: str = upload.upload_id) -> Any:
            return location.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id
            )

        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: finished meanwhile
            call_with_retries(upload.url, "writing", abort)
            aborted.append(upload)
    return aborted
