"""Quickstart: train, save, resume, load someone else's weights, filter, partial load.

    python examples/quickstart.py [--dir DIR]

Runs in a few seconds on a CPU. Every step checks its result (with real checks, not ``assert``,
so ``python -O`` checks too) and exits with a message if one fails, so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightweight_ckpt import Fabric, StateMismatchError


def check(ok: bool, what: str) -> None:
    """Stop with a message if a step did not do what it says (``assert`` vanishes under -O)."""
    if not ok:
        raise SystemExit(f"quickstart: FAILED: {what}")


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested state: tensors bitwise, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


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


def train_and_save(fabric: Fabric, workdir: Path) -> dict[str, Any]:
    """1. Train a few steps and save everything: model, optimizer, scheduler, plain metadata."""
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
    return state


def resume(fabric: Fabric, workdir: Path, state: dict[str, Any]) -> None:
    """2. Resume in a "new process": fresh objects, restored in place."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    resumed = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}
    check(not same(model.state_dict(), state["model"].state_dict()), "fresh model = trained one")
    remainder = fabric.load(workdir / "last.ckpt", resumed)
    check(resumed["step"] == state["step"], f"step is {resumed['step']}, not {state['step']}")
    check(not remainder, f"unexpected remainder {sorted(remainder)}")
    for key in ("model", "optimizer", "scheduler"):
        check(same(resumed[key].state_dict(), state[key].state_dict()), f"resumed {key} differs")
    print(f"2. resumed at step {resumed['step']}, lr {scheduler.get_last_lr()}: weights identical")


def load_plain_file(fabric: Fabric, workdir: Path, trained: nn.Module) -> None:
    """3. Load a plain state-dict file written without this library."""
    torch.save(trained.state_dict(), workdir / "friend.pt")
    model = make_model()
    check(not same(model.state_dict(), trained.state_dict()), "fresh model = friend's")
    fabric.load_raw(workdir / "friend.pt", model)
    check(same(model.state_dict(), trained.state_dict()), "load_raw weights differ from the file")
    print("3. load_raw of a plain torch.save file: weights identical")


def filtered_save(fabric: Fabric, workdir: Path, state: dict[str, Any]) -> None:
    """4. A filtered save: only the weights of the model, everything else as usual."""
    fabric.save(
        workdir / "weights.ckpt", state, filter={"model": lambda name, value: "weight" in name}
    )
    saved = fabric.load(workdir / "weights.ckpt")
    print(f"4. filtered save keeps model keys {sorted(saved['model'])}")
    wanted = sorted(name for name in state["model"].state_dict() if "weight" in name)
    check(sorted(saved["model"]) == wanted, f"filtered keys {sorted(saved['model'])} != {wanted}")
    check(saved["step"] == state["step"], "the filtered save lost the other entries")


def partial_load(fabric: Fabric, workdir: Path, trained: nn.Module) -> None:
    """5. A partial load: a model without biases takes the weights; the report says what's left."""
    no_bias = make_model(bias=False)
    before = {name: tensor.clone() for name, tensor in no_bias.state_dict().items()}
    expected = {name: trained.state_dict()[name] for name in before}
    check(not same(before, expected), "the model without biases already had the weights")
    try:
        fabric.load(workdir / "last.ckpt", {"model": no_bias})
    except StateMismatchError as err:
        print(f"5. strict load refused: {err}")
    else:
        check(False, "the strict load of a model without biases did not raise")
    check(same(dict(no_bias.state_dict()), before), "the refused strict load changed the model")
    fabric.load(workdir / "last.ckpt", {"model": no_bias}, strict=False)
    report = fabric.last_load_report
    unexpected = report.entries["model"].unexpected_keys if report is not None else None
    check(unexpected == ("0.bias", "2.bias"), f"report lists unexpected keys {unexpected}")
    check(same(dict(no_bias.state_dict()), expected), "the non-strict load missed the weights")
    print(f"   non-strict load done; {report}")


def main(workdir: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="  [%(name)s] %(message)s")
    torch.manual_seed(0)
    fabric = Fabric()
    state = train_and_save(fabric, workdir)
    resume(fabric, workdir, state)
    load_plain_file(fabric, workdir, state["model"])
    filtered_save(fabric, workdir, state)
    partial_load(fabric, workdir, state["model"])
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
