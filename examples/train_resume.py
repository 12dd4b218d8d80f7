"""Preemptible training: killed at any moment, rerun the same command and it goes on.

    python examples/train_resume.py --dir runs/demo --steps 60 --die-at-step 37   # SIGKILLed
    python examples/train_resume.py --dir runs/demo --steps 60                     # resumes
    python examples/train_resume.py --dir runs/ref --steps 60                      # uninterrupted

``manager.resume(state)`` is the whole autoresume: it restores the model, the optimizer
(momentum), the LR scheduler and the step from the newest good checkpoint in ``--dir``, or does
nothing on a fresh run. The resumed run ends with the same weights as the uninterrupted one,
bitwise, because nothing depends on when the process started:

- every batch comes from a generator seeded by its step (not by a position in a data stream);
- the global RNG (dropout here) is re-seeded from the step before each step;
- one CPU thread, so reductions run in the same order.

``--weights-out`` writes the final parameters as raw bytes, for a bitwise comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import torch
from torch import nn

from lightweight_ckpt import Fabric
from lightweight_ckpt.io import AsyncCheckpointIO
from lightweight_ckpt.manager import CheckpointManager

SEED = 20240607
WIDTH = 16


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch_for(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: the same in every run, however often the run restarted."""
    generator = torch.Generator().manual_seed(SEED * 100_003 + step)
    x = torch.randn(32, WIDTH, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(32, 1, generator=generator)
    return x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    torch.manual_seed(SEED + step)  # dropout masks depend on the step only
    x, y = batch_for(step)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def weights_bytes(model: nn.Module) -> bytes:
    """The parameters and buffers, in state-dict order, as raw bytes."""
    return b"".join(t.detach().contiguous().numpy().tobytes() for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (path or URL)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--die-at-step", type=int, default=None, help="SIGKILL this process")
    parser.add_argument("--async-save", action="store_true", help="use AsyncCheckpointIO")
    parser.add_argument("--weights-out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    torch.set_num_threads(1)

    torch.manual_seed(SEED)  # the initial weights (replaced on resume)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}

    fabric = Fabric(checkpoint_io=AsyncCheckpointIO() if args.async_save else None)
    with CheckpointManager(
        fabric,
        args.dir,
        filename="{step:05d}-{loss:.4f}",
        every_n_steps=args.every,
        monitor="loss",
        save_top_k=1,
        keep_last_k=2,
        hparams={"lr": 0.05, "momentum": 0.9, "width": WIDTH, "seed": SEED},
    ) as manager:
        resumed = manager.resume(state)
        if resumed is None:
            print("fresh run", flush=True)
        else:
            print(f"resumed from {resumed.path} at step {resumed.step}", flush=True)
        for step in range(state["step"] + 1, args.steps + 1):
            loss = train_step(model, optimizer, step)
            scheduler.step()
            state["step"] = step
            if step == args.die_at_step:
                print(f"dying at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: like a preempted node
            manager.maybe_save(state, step=step, metrics={"loss": loss})
        print(f"done at step {state['step']}; best {manager.best_path}", flush=True)
    fabric.teardown()
    if args.weights_out is not None:
        args.weights_out.write_bytes(weights_bytes(model))


if __name__ == "__main__":
    main()
