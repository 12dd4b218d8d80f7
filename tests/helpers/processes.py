"""Child processes that never outlive their test: a hung child is killed, its pipes closed."""

from __future__ import annotations

import os
import subprocess
import sys


def finish(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """Wait for ``proc`` and return its output; on timeout kill it and fail with what it printed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} timed out after {timeout_s} s:\n{out}") from None
    return out or ""


def kill(*procs: subprocess.Popen[str]) -> None:
    """Kill whichever of ``procs`` still run (a test's cleanup after a failure)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()  # else it is closed by the GC, warning in whichever test runs then


def run_cli(
    *args: str, timeout_s: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lightweight_ckpt ARGS`` and return its result (never raises on exit code).

    ``env``: variables added to this process's environment for the child.
    """
    return subprocess.run(
        [sys.executable, "-m", "lightweight_ckpt", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, **env} if env else None,
    )
