"""Quickstart: train, save, resume, load someone else's weights, filter, partial load.

    python examples/quickstart.py [--dir DIR]

Runs in a few seconds on a CPU. Every step checks its result, so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightweight_ckpt import Fabric, StateMismatchError


def make_model(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 4, bias=bias))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(8, 16)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def main(workdir: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="  [%(name)s] %(message)s")
    torch.manual_seed(0)
    fabric = Fabric()

    # 1. Train a few steps and save everything: model, optimizer, scheduler, plain metadata.
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    step, loss = 0, 0.0
    while step < 3:
        loss = train(model, optimizer, steps=5)
        scheduler.step()
        step += 1
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": step}
    fabric.save(workdir / "last.ckpt", state)
    print(f"1. trained to step {step} (loss {loss:.4f}) and saved {workdir / 'last.ckpt'}")

    # 2. Resume in a "new process": fresh objects, restored in place.
    model2 = make_model()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=2, gamma=0.5)
    resumed = {"model": model2, "optimizer": optimizer2, "scheduler": scheduler2, "step": 0}
    remainder = fabric.load(workdir / "last.ckpt", resumed)
    assert resumed["step"] == step
    assert not remainder
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    print(f"2. resumed at step {resumed['step']}, lr {scheduler2.get_last_lr()}: weights identical")

    # 3. Load a plain state-dict file written without this library.
    torch.save(model.state_dict(), workdir / "friend.pt")
    model3 = make_model()
    fabric.load_raw(workdir / "friend.pt", model3)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters(), strict=True)
    )
    print("3. load_raw of a plain torch.save file: weights identical")

    # 4. A filtered save: only the weights of the model, everything else as usual.
    fabric.save(
        workdir / "weights.ckpt", state, filter={"model": lambda name, value: "weight" in name}
    )
    saved = fabric.load(workdir / "weights.ckpt")
    print(f"4. filtered save keeps model keys {sorted(saved['model'])}")
    assert all("weight" in name for name in saved["model"])

    # 5. A partial load: a model without biases takes the weights; the report says what's left.
    no_bias = make_model(bias=False)
    try:
        fabric.load(workdir / "last.ckpt", {"model": no_bias})
    except StateMismatchError as err:
        print(f"5. strict load refused: {err}")
    fabric.load(workdir / "last.ckpt", {"model": no_bias}, strict=False)
    report = fabric.last_load_report
    assert report is not None
    assert report.entries["model"].unexpected_keys == ("0.bias", "2.bias")
    print(f"   non-strict load done; {report}")
    print("quickstart: all steps passed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="where to write checkpoints")
    args = parser.parse_args()
    if args.dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        main(args.dir)
