"""FSDP2 training that saves a sharded checkpoint and resumes it, at any world size.

    torchrun --nproc-per-node 2 examples/fsdp.py --dir /tmp/fsdp-run --steps 5
    torchrun --nproc-per-node 4 examples/fsdp.py --dir /tmp/fsdp-run  # resumes, resharded

Across nodes it is the same script (we add no launcher): e.g. two launches joined by a c10d
rendezvous, `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`.
Runs on CPUs with gloo, or GPUs with NCCL when CUDA is present.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightweight_ckpt import Fabric

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 kept FSDP2 under torch.distributed._composable
    from torch.distributed._composable.fsdp import fully_shard


def build_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    ).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": optimizer, "step": 0, "world_size": world}
    fabric = Fabric()  # "auto" sees the sharded model and uses FSDPStrategy
    checkpoint = args.dir / "sharded"
    if (checkpoint / ".metadata").exists():
        remainder = fabric.load(checkpoint, state)
        if rank == 0:
            print(
                f"resumed step {state['step']} (saved at world size {state['world_size']}) "
                f"at world size {world}; remainder {sorted(remainder)}"
            )
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        expected = torch.load(args.dir / "expected.pt", weights_only=True)
        assert all(torch.equal(full[k].cpu(), expected[k]) for k in expected), "weights differ"
        if rank == 0:
            print("resumed weights match the saved ones")

    torch.manual_seed(100 + rank)
    for _ in range(args.steps):
        optimizer.zero_grad()
        x = torch.randn(16, 32, device=device)
        model(x).pow(2).mean().backward()
        optimizer.step()
        state["step"] += 1
    state["world_size"] = world

    fabric.save(checkpoint, state)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save({k: v.cpu() for k, v in full.items()}, args.dir / "expected.pt")
        print(f"saved step {state['step']} at world size {world} to {checkpoint}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
