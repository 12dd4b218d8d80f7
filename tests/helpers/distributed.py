"""Run a test body on several real processes: gloo on CPU, a file:// rendezvous, a timeout.

    run_distributed(body, world_size=2, tmp_path=tmp_path, args=(...))

``body(rank, world_size, *args)`` is a module-level function (picklable for spawn). Each process
initializes the default process group, runs the body and destroys the group. ``backend="nccl"``
(tests marked ``gpu``) gives rank ``r`` the CUDA device ``r``. The first failing
rank's traceback is re-raised in the test, naming the rank. Nothing is mocked.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from lightweight_ckpt.formats import dcp_versions

TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT_S = 60  # a hang in a collective fails the test instead of waiting 30 min

LEAVE_TOGETHER = TorchVersion(torch.__version__) < (2, 5)
"""Torch 2.4's gloo can hang a rank destroying a group its peer already left: ranks that ran
their body to the end meet in a barrier first there (not on newer torch, where a test whose peer
died on purpose would then wait for the collective timeout)."""

FSDP2_NEEDS_CUDA = (
    "fully_shard (FSDP2) needs CUDA on torch < 2.6 (2.4 makes CUDA streams unconditionally)"
    if TorchVersion(torch.__version__) < (2, 6)
    else ""
)
"""Why FSDP2 cannot run on the CPU here, or empty where it can (``scripts/oldest-torch-tests``)."""


def _entry(  # noqa: PLR0917 - a Process target takes positional arguments
    body: Callable[..., None],
    rank: int,
    world_size: int,
    store_file: str,
    args: tuple[Any, ...],
    errors: Any,
    backend: str,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            body(rank, world_size, *args)
            dcp_versions.at_exit()  # as at a normal exit, which os._exit skips
            if LEAVE_TOGETHER:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes to the parent, then we exit
        errors.put((rank, traceback.format_exc()))
        os._exit(1)
    # Leave without interpreter teardown: torch's static destructors occasionally abort a
    # process after a clean run ("terminate called without an active exception").
    os._exit(0)


def run_distributed(
    body: Callable[..., None],
    world_size: int,
    tmp_path: Path,
    args: tuple[Any, ...] = (),
    timeout_s: float = TIMEOUT_S,
    *,
    backend: str = "gloo",
) -> None:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` spawned processes; fail on any."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    store_file = str(tmp_path / f"pg-store-{os.getpid()}-{id(body)}")
    procs = [
        ctx.Process(target=_entry, args=(body, rank, world_size, store_file, args, errors, backend))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        # every failing rank, in rank order: the root cause is often not on rank 0
        report = "\n".join(
            f"--- rank {rank} of {world_size}:\n{trace}" for rank, trace in sorted(failures)
        )
        raise AssertionError(f"{len(failures)} rank(s) failed:\n{report}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} hung past {timeout_s} s")
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise AssertionError(f"ranks exited with codes {codes}")
