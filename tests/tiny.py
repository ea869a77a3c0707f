"""A tiny CNN with BatchNorm and its deterministic per-(rank, step, micro-batch) data, shared by the hook
workers (real DeepSpeed, several processes) and the single-process reference they are compared with."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 4
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_optimizer(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_000 * rank + 100 * step + micro + 7)
    # Each rank sees its own distribution shift, so local models drift apart between syncs.
    x = torch.randn(BATCH, 3, 6, 6, generator=g) + 0.5 * rank
    y = torch.randint(0, 3, (BATCH,), generator=g)
    return x, y


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)
