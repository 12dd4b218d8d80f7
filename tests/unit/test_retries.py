"""Failure classification and the retry loop (``lightweight_ckpt.retries``), without a store."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from lightweight_ckpt.config import override
from lightweight_ckpt.errors import CheckpointReadError
from lightweight_ckpt.retries import call_with_retries, classify_failure


def _named(module: str, name: str) -> type[Exception]:
    """An exception class under another module's name, deriving from Exception only."""
    cls = type(name, (Exception,), {})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


@pytest.mark.parametrize(
    ("module", "name"),
    [
        # Python 3.10: neither is the builtin TimeoutError (3.11 made them aliases of it)
        ("asyncio.exceptions", "TimeoutError"),
        ("concurrent.futures._base", "TimeoutError"),
    ],
)
def test_python_3_10_timeouts_are_transient(module: str, name: str) -> None:
    err = _named(module, name)("timed out")
    assert classify_failure(err) == ("transient", err)


def test_timeouts_of_this_python_are_transient() -> None:
    for cls in (asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError):
        err = cls()
        assert classify_failure(err) == ("transient", err)


def test_a_timeout_found_in_the_cause_chain_is_named() -> None:
    cause = _named("asyncio.exceptions", "TimeoutError")()
    err = RuntimeError("wrapped")
    err.__cause__ = cause
    assert classify_failure(err) == ("transient", cause)


def test_no_attempt_starts_that_would_end_past_the_deadline() -> None:
    """An attempt that stalled is not repeated when one more as long would pass the deadline."""
    calls = []

    def stalls() -> None:
        calls.append(time.monotonic())
        time.sleep(0.4)
        raise ConnectionResetError("reset after a stall")

    with (
        override(retry_attempts=10, retry_backoff_s=0.0, retry_deadline_s=0.6),
        pytest.raises(CheckpointReadError) as info,
    ):
        call_with_retries("s3://bucket/last.ckpt", "reading", stalls)
    assert len(calls) == 1
    assert str(info.value).startswith("s3://bucket/last.ckpt: reading failed after 1 attempt")
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_quick_failures_are_retried_up_to_the_attempts() -> None:
    calls = []

    def fails() -> None:
        calls.append(1)
        raise ConnectionResetError("reset")

    with (
        override(retry_attempts=3, retry_backoff_s=0.0, retry_deadline_s=60.0),
        pytest.raises(CheckpointReadError, match="after 3 attempts"),
    ):
        call_with_retries("gs://bucket/last.ckpt", "reading", fails)
    assert len(calls) == 3
