"""Save and resume on an XLA device (TPU, or torch_xla's CPU runtime).

    PJRT_DEVICE=CPU .venv-xla/bin/python examples/xla.py [--dir DIR]

Needs torch_xla (``pip install 'lightweight-ckpt[xla]'``, with the torch release torch_xla was
built for; ``bash scripts/xla-tests`` builds such a venv in ``.venv-xla``). The master ordinal
writes one file from CPU copies, readable by plain ``torch.load`` without torch_xla; loading
restores onto the XLA device. Every step checks its result, so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

os.environ.setdefault("PJRT_DEVICE", "CPU")
import torch_xla

from lightweight_ckpt import Fabric


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 16, device=torch_xla.device())).pow(2).mean().backward()
        optimizer.step()
        torch_xla.sync()


def main(directory: str) -> None:
    device = torch_xla.device()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, steps=3)

    fabric = Fabric()  # "auto" picks the XLA strategy once torch_xla is imported
    path = os.path.join(directory, "xla.ckpt")
    state = {"model": model, "optimizer": optimizer, "step": 3}
    fabric.save(path, state)
    saved = {k: v.cpu() for k, v in model.state_dict().items()}
    print(f"saved {path} with {type(fabric.strategy).__name__}")

    train(model, optimizer, steps=2)  # the run goes on, then "crashes"; resume:
    state["step"] = 5
    fabric.load(path, state)
    assert state["step"] == 3
    assert all(torch.equal(saved[k], v.cpu()) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "xla"
    train(model, optimizer, steps=1)  # and training continues on the device
    plain = torch.load(path, weights_only=True)  # the file needs no torch_xla to read
    assert all(t.device.type == "cpu" for t in plain["model"].values())
    print("xla example: all steps passed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if args.dir:
        main(args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
