"""The LR schedule: linear scaling rule, warmup, step and cosine decay, as pure functions of the epoch."""

from __future__ import annotations

import math

import pytest
import torch

from localsgd_ds.config import ConfigError
from localsgd_ds.schedules import EpochLRScheduler, LRScheduleConfig, lr_at

GOYAL = LRScheduleConfig()  # 0.1 per 256, 5 warmup epochs, x0.1 at 30, 60, 80


def test_linear_scaling_rule_sets_the_peak():
    # 32 per worker x 64 workers = 2048 images: 0.1 x 2048 / 256 = 0.8
    assert GOYAL.peak_lr(2048) == pytest.approx(0.8)
    assert lr_at(GOYAL, 5.0, global_batch=2048) == pytest.approx(0.8)
    assert lr_at(GOYAL, 29.99, global_batch=2048) == pytest.approx(0.8)


def test_warmup_is_linear_from_base_lr_to_the_peak():
    assert lr_at(GOYAL, 0.0, global_batch=2048) == pytest.approx(0.1)
    assert lr_at(GOYAL, 2.5, global_batch=2048) == pytest.approx(0.1 + 0.7 * 0.5)
    start_zero = LRScheduleConfig(warmup_start_lr=0.0)
    assert lr_at(start_zero, 1.0, global_batch=512) == pytest.approx(0.2 / 5)


def test_step_decay_at_each_milestone():
    values = [lr_at(GOYAL, e, global_batch=256) for e in (29.9, 30.0, 59.9, 60.0, 80.0, 89.9)]
    assert values == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])


def test_cosine_goes_from_peak_to_final_lr():
    cos = LRScheduleConfig(decay="cosine", warmup_epochs=5, final_lr=0.0)
    assert lr_at(cos, 5.0, global_batch=512, epochs=90) == pytest.approx(0.2)
    assert lr_at(cos, 47.5, global_batch=512, epochs=90) == pytest.approx(0.1)
    assert lr_at(cos, 90.0, global_batch=512, epochs=90) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="epochs"):
        lr_at(cos, 10.0, global_batch=512)


def test_no_warmup():
    flat = LRScheduleConfig(warmup_epochs=0, milestones=(2,))
    assert lr_at(flat, 0.0, global_batch=512) == pytest.approx(0.2)
    assert lr_at(flat, 2.0, global_batch=512) == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"base_lr": -1}, "base_lr"),
        ({"reference_batch": 0}, "reference_batch"),
        ({"warmup_epochs": "5"}, "warmup_epochs"),
        ({"decay": "linear"}, "decay"),
        ({"milestones": [60, 30]}, "milestones"),
        ({"gamma": 0}, "gamma"),
        ({"warmup_start_lr": -0.1}, "warmup_start_lr"),
        ({"lr": 0.1}, "unknown key"),
    ],
)
def test_bad_blocks_name_the_key(block, key):
    with pytest.raises(ConfigError, match=key):
        LRScheduleConfig.from_dict(block)


def test_from_dict_fills_defaults_and_round_trips():
    parsed = LRScheduleConfig.from_dict({"base_lr": 0.2, "milestones": [10, 20]})
    assert parsed.base_lr == 0.2 and parsed.milestones == (10.0, 20.0) and parsed.warmup_epochs == 5.0
    assert LRScheduleConfig.from_dict(parsed.to_dict()) == parsed


def test_scheduler_turns_steps_into_epochs_and_sets_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=123.0)
    sched = EpochLRScheduler(opt, GOYAL, global_batch=1024, steps_per_epoch=10, epochs=90)
    assert sched.get_last_lr() == pytest.approx([0.1, 0.1])  # step 0: epoch 0, the warmup start
    for _ in range(25):
        sched.step()
    # step 25 = epoch 2.5: 0.1 + (0.4 - 0.1) x 2.5 / 5
    assert sched.get_last_lr() == pytest.approx([0.25, 0.25])
    state = sched.state_dict()

    fresh = EpochLRScheduler(opt, GOYAL, global_batch=1024, steps_per_epoch=10, epochs=90)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    fresh.load_state_dict(state)
    assert fresh.last_step == 25 and opt.param_groups[1]["lr"] == pytest.approx(0.25)
    for _ in range(300 - 25):
        fresh.step()
    assert fresh.get_last_lr()[0] == pytest.approx(0.04)  # epoch 30: 0.4 x 0.1
    assert math.isclose(fresh.lr(299), 0.4)
