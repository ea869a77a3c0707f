"""The study's networks: torchvision ResNet-50 / ResNet-101 (He et al. 2016), and ResNet-8 for CPU runs.

Weights are always freshly initialized (``weights=None``; nothing is downloaded). ``zero_init_residual``
sets the gamma of the last BatchNorm in each residual block to zero, so every block starts as the
identity (Goyal et al. 2017, section 5.1)::

    model = build_model("resnet50", num_classes=1000, zero_init_residual=True)
    model = build_model("resnet8", num_classes=10)    # 3 basic blocks, 16-32-64 channels, for 32-64 px images
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock

from localsgd_ds.config import ConfigError


class ResNet8(nn.Module):
    """A CIFAR-style ResNet (6n+2 layers, n = 1): a 3x3 stem, three basic blocks, global pooling, a classifier.

    Small enough to train a few epochs on two CPU cores; it keeps what local SGD interacts with (BatchNorm
    statistics, momentum, residual blocks), nothing else of ResNet-50.
    """

    def __init__(self, num_classes: int, width: int = 16, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
            downsample = None
            if stride != 1 or channels != out:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
                )
            blocks.append(BasicBlock(channels, out, stride=stride, downsample=downsample))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        # The same initialization as torchvision's ResNet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": lambda num_classes, zero_init_residual: resnet.resnet50(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    ),
    "resnet101": lambda num_classes, zero_init_residual: resnet.resnet101(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    ),
    "resnet8": lambda num_classes, zero_init_residual: ResNet8(
        num_classes, zero_init_residual=zero_init_residual
    ),
}


def build_model(name: str, *, num_classes: int, zero_init_residual: bool = True) -> nn.Module:
    """A freshly initialized network by name (one of ``MODELS``)."""
    if name not in MODELS:
        raise ConfigError(f"train.model must be one of {sorted(MODELS)}, got {name!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes!r}")
    return MODELS[name](num_classes, zero_init_residual)


def last_bn_gammas(model: nn.Module) -> list[torch.Tensor]:
    """The gamma of the last BatchNorm of every residual block (the ones ``zero_init_residual`` zeroes)."""
    gammas = []
    for module in model.modules():
        if isinstance(module, resnet.Bottleneck):
            gammas.append(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            gammas.append(module.bn2.weight)
    return gammas
