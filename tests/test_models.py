"""The networks: torchvision ResNet-50/101 without downloads, zero-init of the last BN gamma, ResNet-8."""

from __future__ import annotations

import pytest
import torch

from localsgd_ds.config import ConfigError
from localsgd_ds.models import build_model, last_bn_gammas


@pytest.mark.parametrize(
    ("name", "blocks", "params"), [("resnet50", 16, 25_557_032), ("resnet101", 33, 44_549_160)]
)
def test_torchvision_resnets_have_the_published_size(name, blocks, params):
    model = build_model(name, num_classes=1000, zero_init_residual=True)
    assert sum(p.numel() for p in model.parameters()) == params
    gammas = last_bn_gammas(model)
    assert len(gammas) == blocks
    assert all(torch.count_nonzero(g) == 0 for g in gammas)


def test_zero_init_is_an_option():
    model = build_model("resnet50", num_classes=10, zero_init_residual=False)
    assert all(torch.all(g == 1) for g in last_bn_gammas(model))


def test_resnet8_trains_on_small_images():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, zero_init_residual=True)
    assert len(last_bn_gammas(model)) == 3
    assert all(torch.count_nonzero(g) == 0 for g in last_bn_gammas(model))
    assert sum(p.numel() for p in model.parameters()) < 100_000
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("resnet8", num_classes=5)
    torch.manual_seed(3)
    b = build_model("resnet8", num_classes=5)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_unknown_model_names_the_key():
    with pytest.raises(ConfigError, match="train.model"):
        build_model("vgg16", num_classes=10)
