"""XLA tests: real torch_xla on its CPU runtime (``PJRT_DEVICE=CPU``), run by scripts/xla-tests.

They need a venv with torch==2.9.0 and torch-xla==2.9.0 (torch_xla has no build for the main
venv's torch); everywhere else each module skips itself (``pytest.importorskip``) with the reason.
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("torch_xla") is not None:
    os.environ.setdefault("PJRT_DEVICE", "CPU")
