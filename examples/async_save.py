"""Async checkpointing: the loop waits only for a host copy, and the file holds save-time values.

    python examples/async_save.py [--dir DIR_OR_URL] [--steps 30] [--every 10]

``DIR_OR_URL`` may be a local folder or any fsspec URL (``memory://run``, ``s3://bucket/run``
with s3fs installed). Every save returns once the state is copied into reused host buffers; a
background thread writes it. Training then changes every parameter and optimizer tensor right
away, and the example checks that each checkpoint still holds the values of its own step.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.io import AsyncCheckpointIO


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies of every model and optimizer tensor (what a checkpoint of this step must hold)."""
    values = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        values.update({f"opt.{index}.{k}": v.clone() for k, v in per_param.items()})
    return values


def main(root: str, steps: int, every: int) -> None:
    torch.manual_seed(0)
    io = AsyncCheckpointIO()  # wraps TorchCheckpointIO; one save in flight at a time
    fabric = Fabric(checkpoint_io=io)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    expected: dict[str, dict[str, torch.Tensor]] = {}

    for step in range(1, steps + 1):
        optimizer.zero_grad()
        x = torch.randn(32, 64)
        model(x).pow(2).mean().backward()
        optimizer.step()  # mutates the tensors a pending save is writing from: safe
        state["step"] = step
        if step % every == 0:
            path = f"{root}/step-{step:04d}.ckpt"
            fabric.save(path, state)  # returns after the host copy
            expected[path] = snapshot(model, optimizer)
            print(f"step {step}: saved {path} in the background (durable: {io.is_durable})")

    fabric.wait()  # every save is written and committed; a background failure would raise here
    print(f"all {len(expected)} saves durable: {io.is_durable}")

    for path, values in expected.items():
        fresh_model = make_model()
        fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
        restored = {"model": fresh_model, "optimizer": fresh_optimizer, "step": 0}
        before = snapshot(fresh_model, fresh_optimizer)
        assert any(not torch.equal(before[k], values[k]) for k in before), "nothing to restore"
        fabric.load(path, restored)
        after = snapshot(fresh_model, fresh_optimizer)
        assert after.keys() == values.keys(), f"{path}: keys differ"
        assert all(torch.equal(after[k], values[k]) for k in values), f"{path}: values differ"
        print(f"{path}: step {restored['step']}, every tensor equals its save-time value")
    fabric.teardown()
    print("async_save: all steps passed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None, help="folder or fsspec URL (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    if args.dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp, args.steps, args.every)
    else:
        main(args.dir.rstrip("/"), args.steps, args.every)
