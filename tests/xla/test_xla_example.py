"""examples/xla.py runs end to end on torch_xla's CPU runtime (it checks its own results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SKIP_REASON = "torch_xla is not installed (it needs torch==2.9.0): run bash scripts/xla-tests"
pytest.importorskip("torch_xla", reason=SKIP_REASON)
pytestmark = pytest.mark.xla
ROOT = Path(__file__).resolve().parents[2]


def test_xla_example_saves_and_resumes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "xla.py"), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PJRT_DEVICE": "CPU"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "xla example: all steps passed" in result.stdout
    assert (tmp_path / "xla.ckpt").is_file()
