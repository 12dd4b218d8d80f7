"""Test-session hygiene: no leaked env vars, threads or process groups; tmp_path only."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch.distributed as dist

from tests.helpers.distributed import FSDP2_NEEDS_CUDA


@pytest.fixture(autouse=True)
def _hygiene() -> Iterator[None]:
    env_before = dict(os.environ)
    threads_before = {t.ident for t in threading.enumerate()}
    torch.manual_seed(0)
    yield
    leaked_env = sorted(set(os.environ) ^ set(env_before))
    os.environ.clear()
    os.environ.update(env_before)
    assert not leaked_env, f"test leaked environment variables {leaked_env}"
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a process group initialized")
    live = [
        t.name
        for t in threading.enumerate()
        if t.ident not in threads_before and t.is_alive() and not t.daemon
    ]
    assert not live, f"test left threads running: {live}"


@pytest.fixture(autouse=True)
def _clean_memory_fs() -> Iterator[None]:
    yield
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    MemoryFileSystem.pseudo_dirs.append("")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a torch whose FSDP2 cannot run on the CPU, the FSDP2 cases skip with that reason."""
    del config
    if not FSDP2_NEEDS_CUDA:
        return
    skip = pytest.mark.skip(reason=FSDP2_NEEDS_CUDA)
    for item in items:
        if "fsdp2" in item.nodeid:
            item.add_marker(skip)
