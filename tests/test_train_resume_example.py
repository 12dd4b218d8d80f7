"""examples/train_resume.py: killed mid-run and resumed, it ends with the uninterrupted weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.processes import finish, kill

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_resume.py")
TIMEOUT_S = 180


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--steps", "30", "--every", "5", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out = finish(proc, TIMEOUT_S)
    return proc.returncode, out


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    resumed_out, reference_out = tmp_path / "resumed.bin", tmp_path / "reference.bin"
    killed = _start("--dir", str(run_dir), "--die-at-step", "17", "--async-save")
    reference = _start("--dir", str(ref_dir), "--weights-out", str(reference_out))
    try:
        code, out = _finish(killed)
        assert code == -signal.SIGKILL, out
        assert "fresh run" in out
        assert "dying at step 17" in out
        code, ref_log = _finish(reference)
        assert code == 0, ref_log
    finally:
        kill(killed, reference)

    code, out = _finish(_start("--dir", str(run_dir), "--weights-out", str(resumed_out)))
    assert code == 0, out
    match = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert match, out
    assert int(match.group(2)) in {10, 15}  # 15 unless its async write had not committed yet
    assert "done at step 30" in out

    reference_bytes = reference_out.read_bytes()
    assert len(reference_bytes) > 0
    assert resumed_out.read_bytes() == reference_bytes
    # the resumed run did train: the checkpoint it started from holds other weights
    start = torch.load(match.group(1), weights_only=True)["model"]
    start_bytes = b"".join(t.contiguous().numpy().tobytes() for t in start.values())
    assert len(start_bytes) == len(reference_bytes)
    assert start_bytes != reference_bytes
