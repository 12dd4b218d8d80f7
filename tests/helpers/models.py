"""Tiny real models, optimizers and training state for tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Tiny(nn.Module):
    """Two linear layers, a norm with buffers, and a non-persistent buffer."""

    def __init__(self, width: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.norm = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2, bias=bias)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    """Run real optimizer steps so optimizer state exists and weights moved."""
    width = next(model.parameters()).shape[1]
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, width)).pow(2).sum().backward()
        optimizer.step()


def make_state(width: int = 8, steps: int = 2) -> dict[str, Any]:
    """Model + AdamW + StepLR + GradScaler (CPU) + metadata, after real steps."""
    model = Tiny(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_steps(model, optimizer, steps)
    scheduler.step()
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "step": steps,
        "hparams": {"lr": 1e-2, "name": "tiny", "layers": [8, 2]},
    }


def fresh_like(state: dict[str, Any], width: int = 8) -> dict[str, Any]:
    """A new, differently-initialized state of the same structure (seeded differently)."""
    torch.manual_seed(1234)
    other = make_state(width, steps=1)
    other["step"] = 0
    other["hparams"] = {}
    return other


def add_load_pre_hook(module: nn.Module, hook: Any) -> None:
    """``module.register_load_state_dict_pre_hook(hook)``; torch < 2.5 has it only privately."""
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        public(hook)
    else:  # the same call: hook(module, state_dict, prefix, ...)
        module._register_load_state_dict_pre_hook(hook, with_module=True)
