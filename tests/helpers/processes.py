"""Child processes that never outlive their test: a hung child is killed, its pipes closed."""

from __future__ import annotations

import subprocess


def finish(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """Wait for ``proc`` and return its output; on timeout kill it and fail with what it printed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} timed out after {timeout_s} s:\n{out}") from None
    return out or ""


def kill(*procs: subprocess.Popen[str]) -> None:
    """Kill whichever of ``procs`` still run (a test's cleanup after a failure)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
