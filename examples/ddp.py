"""DDP training that saves one checkpoint file (written by rank 0) and resumes it.

    torchrun --nproc-per-node 2 examples/ddp.py --dir /tmp/ddp-run --steps 5   # run it twice

Runs on CPUs with gloo, or GPUs with NCCL when CUDA is present.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightweight_ckpt import Fabric


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:  # NCCL's collectives (and the checkpoint's broadcasts) use the current device
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    model = DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}

    fabric = Fabric()  # "auto" in a process group of 2 ranks: DDPStrategy
    checkpoint = args.dir / "last.ckpt"
    if checkpoint.exists():
        fabric.load(checkpoint, state)
        expected = torch.load(checkpoint, weights_only=True)["model"]
        restored = model.module.state_dict()
        assert all(torch.equal(restored[k].cpu(), expected[k]) for k in expected)
        if rank == 0:
            print(f"resumed at step {state['step']}: weights match the file")

    torch.manual_seed(100 + rank)
    for _ in range(args.steps):
        optimizer.zero_grad()
        model(torch.randn(16, 32, device=device)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        state["step"] += 1

    fabric.save(checkpoint, state)  # every rank calls it; rank 0 writes one file
    if rank == 0:
        print(f"saved step {state['step']} to {checkpoint}")
    # Free the DDP model before the process group. Otherwise the group dies later, inside DDP's
    # reducer destructor, which holds the GIL while it joins gloo's worker threads; a worker that
    # still needs the GIL to release a tensor then deadlocks the exit (torch 2.13: about one
    # run in four hung, after all its work was done).
    del model, optimizer, scheduler, state
    dist.barrier()  # leave together: torch 2.4's gloo can hang destroying a group a peer left
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
