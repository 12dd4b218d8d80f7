"""The README's example runs end to end (it checks its own results)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.distributed import FSDP2_NEEDS_CUDA
from tests.helpers.processes import finish, kill

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quickstart: all steps passed" in result.stdout
    assert (tmp_path / "last.ckpt").is_file()


def test_async_save_example_checks_save_time_values(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "async_save.py")
    result = subprocess.run(
        [sys.executable, script, "--dir", str(tmp_path), "--steps", "20", "--every", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "async_save: all steps passed" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step-{n:04d}.ckpt" for n in (5, 10, 15, 20)
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        *extra,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


# torch 2.13 (gloo, FSDP2) sometimes aborts a worker at interpreter exit, after its last line of
# Python ran: "terminate called without an active exception" from a C++ destructor, with no
# Python frame on the stack. It happens without this library too (a copy of examples/fsdp.py
# with every Fabric call removed aborted 3 times in 40 launches on a loaded 2-core machine), so
# the examples' tests accept that one exit-time abort and judge the run by what it printed and
# wrote, which every caller asserts.
TORCH_EXIT_ABORT = "terminate called without an active exception"


# Two torchrun launches joined by one c10d store: the agent that hosts the store exits when its own
# workers are done, and the other agent, still polling the store while its workers exit, then
# fails with this (torch.distributed.elastic, not the workers). The run is judged as above.
TORCHRUN_STORE_GONE = "The connection to the C10d store has failed"


def _finish(proc: subprocess.Popen[str], *accepted: str) -> str:
    out = finish(proc, timeout_s=240)
    ok = proc.returncode == 0 or any(marker in out for marker in (TORCH_EXIT_ABORT, *accepted))
    assert ok, out
    return out


@pytest.mark.distributed
def test_ddp_example_saves_and_resumes(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "ddp.py")
    first = _finish(_torchrun("--standalone", script, "--dir", str(tmp_path), "--steps", "3"))
    assert "saved step 3" in first
    second = _finish(_torchrun("--standalone", script, "--dir", str(tmp_path), "--steps", "2"))
    assert "resumed at step 3: weights match the file" in second
    assert "saved step 5" in second


# Seen once in CI (2026-12-07): rank 0 had printed its last line and the checkpoint was committed,
# but one torchrun launch was still running after 240 s (it passed 7 of 7 reruns, with and without
# a CPU hog). The likely cause is torchrun's own exit barrier: an agent whose workers finished waits
# there for the other agent for up to 300 s (``exit_barrier_timeout``, not settable from the
# command line), and the other agent may already have left (the store-gone failure above). Such a
# node is killed and judged, like the others, by what the run printed and wrote: the caller asserts
# the save line and the commit, and the resume below checks the weights bitwise.
NODE_TIMEOUT_S = 240


def _finish_node(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=NODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        assert "Traceback" not in (out or ""), out  # a worker failed: not the exit barrier
        logging.getLogger(__name__).warning(
            "a torchrun agent was still running %d s after launch; killed", NODE_TIMEOUT_S
        )
        return out or ""
    ok = proc.returncode == 0 or any(m in out for m in (TORCH_EXIT_ABORT, TORCHRUN_STORE_GONE))
    assert ok, out
    return out or ""


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(bool(FSDP2_NEEDS_CUDA), reason=FSDP2_NEEDS_CUDA)
def test_fsdp_example_two_nodes_then_resume_at_another_world_size(tmp_path: Path) -> None:
    """Two torchrun launches of 2 processes each, joined by a c10d rendezvous on 127.0.0.1."""
    script = str(ROOT / "examples" / "fsdp.py")
    rendezvous = (
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--rdzv-id=lwckpt-test",
    )
    nodes = [
        _torchrun(script, "--dir", str(tmp_path), "--steps", "3", extra=rendezvous) for _ in "ab"
    ]
    try:
        outputs = [_finish_node(node) for node in nodes]
    finally:
        kill(*nodes)
    assert any("saved step 3 at world size 4" in out for out in outputs), outputs
    assert min(os.listdir(tmp_path / "sharded")) == ".metadata"
    resumed = _finish(_torchrun("--standalone", script, "--dir", str(tmp_path), "--steps", "1"))
    assert "resumed step 3 (saved at world size 4) at world size 2" in resumed
    assert "resumed weights match the saved ones" in resumed
