"""Storage failures: what kind they are, retries with backoff, and our errors naming the URL.

s3fs retries most transport errors itself (its wrapper tries 5 times over ~2 s; under it,
botocore, which ``location.client_options`` sets to 2 attempts unless ``config_kwargs=
{"retries": ...}`` says otherwise), and gcsfs retries connection errors, timeouts and
408/429/5xx 6 times with 1-32 s backoffs. Each request waits at most ``request_timeout_s``
(``config``) to connect or for more bytes, so a stalled attempt ends after about ten timeouts
on either store (plus gcsfs's backoffs). What escapes them (an endpoint down for longer than the
clients' few attempts, a stall, a payload cut short after the last retry) is retried by
``call_with_retries`` with exponential backoff and full jitter, bounded by ``retry_attempts``
and ``retry_deadline_s``: no attempt starts that would end past the deadline at the pace of the
one before. What is left is translated by ``storage_error`` into our errors naming the URL:
``CheckpointWriteError`` when writing, ``CheckpointReadError`` when reading, never a raw client
exception (the client's exception is the ``__cause__``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from lightweight_ckpt.config import settings
from lightweight_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger("lightweight_ckpt")
_T = TypeVar("_T")

# Matched by qualified name anywhere in an exception's MRO and its cause chain, so that no
# client library is imported here (s3fs and gcsfs are optional).
_TRANSIENT_TYPES = frozenset(
    {
        "builtins.ConnectionError",  # reset, refused, aborted, broken pipe
        "builtins.TimeoutError",  # socket/asyncio timeouts, aiohttp ServerTimeoutError
        # before Python 3.11 these two were not the builtin TimeoutError
        "asyncio.exceptions.TimeoutError",  # aiohttp's total timeout, fsspec's FSTimeoutError
        "concurrent.futures._base.TimeoutError",
        "http.client.IncompleteRead",
        "botocore.exceptions.ConnectionError",  # EndpointConnectionError, ConnectTimeoutError
        "botocore.exceptions.HTTPClientError",  # ReadTimeoutError, ConnectionClosedError
        "botocore.exceptions.IncompleteReadError",
        "aiohttp.client_exceptions.ClientConnectionError",  # ServerDisconnectedError, ...
        "aiohttp.client_exceptions.ClientPayloadError",  # a body cut short
        "fsspec.exceptions.FSTimeoutError",
        "requests.exceptions.ConnectionError",  # gcsfs maps a 502 to ProxyError, a subclass
        "requests.exceptions.Timeout",
        "requests.exceptions.ChunkedEncodingError",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}
)  # fmt: skip
_CREDENTIAL_TYPES = frozenset(
    {
        "botocore.exceptions.NoCredentialsError",
        "botocore.exceptions.PartialCredentialsError",
        "botocore.exceptions.CredentialRetrievalError",
        "google.auth.exceptions.GoogleAuthError",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_MAX_BACKOFF_S = 30.0
_UNAUTHORIZED = 401
_FORBIDDEN = 403
REMEDIES = {
    "transient": "The store did not answer reliably; check the endpoint and the network, or "
    "allow more with LWCKPT_RETRY_ATTEMPTS / LWCKPT_RETRY_DEADLINE_S",
    "credentials": "Credentials are missing or were refused; pass them in storage_options "
    "(key/secret, token) or set them up for the client",
    "denied": "Access denied; check these credentials' permissions on the bucket",
    "no-bucket": "The bucket does not exist; create it or correct the URL",
}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_and_code(err: BaseException) -> tuple[int | None, str]:
    """HTTP status and service error code of a botocore ``ClientError`` or gcsfs ``HttpError``."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), str(
            response.get("Error", {}).get("Code", "")
        )
    code = getattr(err, "code", None)
    if type(err).__module__.startswith("gcsfs") and isinstance(code, int):
        return code, ""
    return None, ""


def classify_failure(err: BaseException) -> tuple[str, BaseException] | None:
    """Say what kind of storage failure ``err`` is, and which exception in its chain shows it.

    Returns ``("transient" | "credentials" | "denied" | "no-bucket", cause)``, or None for
    anything else (a missing object, damaged bytes, a bug), which is not ours to judge here.
    """
    for cause in _chain(err):
        names = {f"{k.__module__}.{k.__qualname__}" for k in type(cause).__mro__}
        status, code = _status_and_code(cause)
        if names & _CREDENTIAL_TYPES or code in _CREDENTIAL_CODES or status == _UNAUTHORIZED:
            return "credentials", cause
        if code == "NoSuchBucket":
            return "no-bucket", cause
        if code == "AccessDenied" or status == _FORBIDDEN or isinstance(cause, PermissionError):
            return "denied", cause
        if str(cause).startswith("Forbidden"):  # gcsfs's 403
            return "denied", cause
        if names & _TRANSIENT_TYPES or status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return "transient", cause
    return None


def storage_error(url: str, action: str, err: BaseException, detail: str = "") -> CheckpointError:
    """Translate a failure while ``action`` (``"reading"``, ``"writing"``, ...) into our error.

    Writing gives ``CheckpointWriteError``, anything else ``CheckpointReadError``; the message
    names the URL, the problem, the client's own words and a remedy.
    """
    kind = classify_failure(err)
    cause = err if kind is None else kind[1]
    what = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
    remedy = REMEDIES[kind[0]] if kind else "See the cause above"
    message = f"{url}: {action} failed{detail} ({what}). {remedy}."
    if action == "writing":
        return CheckpointWriteError(message)
    if kind is not None and kind[0] == "no-bucket":
        return CheckpointNotFoundError(message)
    return CheckpointReadError(message)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure (from ``config``)."""

    attempts: int
    backoff_s: float
    deadline_s: float

    @classmethod
    def current(cls) -> RetryPolicy:
        """The policy the tunables in force describe."""
        tunables = settings()
        return cls(tunables.retry_attempts, tunables.retry_backoff_s, tunables.retry_deadline_s)

    def delay_s(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1``: exponential, capped, full jitter."""
        ceiling = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography


def call_with_retries(url: str, action: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; retry transient storage failures with backoff; translate what is left.

    Failures that ``classify_failure`` does not know (a missing object, damaged bytes) and our
    own errors without a transient cause propagate unchanged.

    Raises:
        CheckpointWriteError: ``action`` is ``"writing"`` and it failed for good.
        CheckpointReadError: any other action failed for good.
    """
    policy = RetryPolicy.current()
    start = time.monotonic()
    attempt = 1
    while True:
        attempt_start = time.monotonic()
        try:
            return fn()
        except Exception as err:
            kind = classify_failure(err)
            if kind is None:
                raise
            now = time.monotonic()
            elapsed = now - start
            delay = policy.delay_s(attempt)
            if kind[0] != "transient" or attempt >= policy.attempts:
                raise _final(url, action, err, attempt, elapsed) from err
            # a stall tends to repeat: an attempt as long as this one must end by the deadline
            if elapsed + delay + (now - attempt_start) > policy.deadline_s:
                raise _final(url, action, err, attempt, elapsed) from err
            log.warning(
                "%s: %s failed (attempt %d of %d: %s: %s); retrying in %.2f s",
                url, action, attempt, policy.attempts, type(kind[1]).__name__, kind[1], delay,
            )  # fmt: skip
            time.sleep(delay)
            attempt += 1


def _final(url: str, action: str, err: Exception, attempt: int, elapsed: float) -> CheckpointError:
    detail = f" after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.1f} s"
    return storage_error(url, action, err, detail)
