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


class ExtrasNet(TinyNet):
    """TinyNet with a bool mask buffer (never averaged) and an integer counter buffer that holds a
    different value on each rank (averaged in integer arithmetic: the floor of the mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(4, dtype=torch.bool))
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.counter += 1
        x = torch.relu(self.bn(self.conv(x))) * self.mask.view(1, 4, 1, 1)
        return self.fc(x.mean(dim=(2, 3)))


class TiedNet(TinyNet):
    """Two Parameters tied through ``.data`` (one storage): ``post.weight`` is ``pre.weight``'s storage."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.post = nn.Linear(4, 4)
        self.post.weight.data = self.pre.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.post(torch.relu(self.pre(x))))


class DeepNet(TinyNet):
    """Eight channels and convolutions on small maps: 6x6 -> 2x2 (stride 3), 1x1 on 2x2, 3x3 on the pooled 1x1
    map (whose centre tap alone touches the image). Stacked on CPU, these weights are held OHWI and run tap
    by tap (``StackedConv2d``'s "taps" path), which TinyNet's one 3-channel convolution never is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, stride=3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.top = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.point(self.down(x)))
        return self.fc(self.top(x.mean(dim=(2, 3), keepdim=True)).flatten(1))


VARIANTS = {"plain": TinyNet, "extras": ExtrasNet, "tied": TiedNet, "deep": DeepNet}


def make_model(seed: int = 0, variant: str = "plain", rank: int = 0) -> TinyNet:
    """A fresh model; with ``variant="extras"`` its counter starts at a value of ``rank``'s own."""
    torch.manual_seed(seed)
    model = VARIANTS[variant]()
    if variant == "extras":
        model.counter.fill_(5 * rank + 1)
    return model


def make_optimizer(model: nn.Module, group_lrs: tuple[float, float] | None = None) -> torch.optim.SGD:
    """SGD over one parameter group, or with ``group_lrs`` two: everything but the classifier, then ``fc``."""
    if group_lrs is None:
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    fc = {id(p) for p in model.fc.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in fc], "lr": group_lrs[0]},
        {"params": list(model.fc.parameters()), "lr": group_lrs[1]},
    ]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def lr_factor(step: int) -> float:
    """A learning-rate schedule that changes every step (LambdaLR's factor), for SlowMo's lr coupling."""
    return 1.0 / (1.0 + 0.4 * step)


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100_000 * rank + 100 * step + micro + 7)
    # Each rank sees its own distribution shift, so local models drift apart between syncs.
    x = torch.randn(BATCH, 3, 6, 6, generator=g) + 0.5 * rank
    y = torch.randint(0, 3, (BATCH,), generator=g)
    return x, y


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)
