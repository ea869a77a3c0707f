"""``--virtual K`` against the real thing: the same JSON on the same shards, run as K workers in one
process and as ``deepspeed --num_gpus K``: the same syncs, bytes and gradient all-reduces in every epoch,
the first epoch's loss within 0.5 % (2 % at K = 4, batches of 8), and, where the run has trained (top-1 > 80 %), the final top-1 within
the rounding floor.

The floor: the stacked replicas compute what K separate models compute up to rounding (1e-7, checked in
test_virtual.py), and this training regime (ResNet-8, lr 0.4, batch 16 per worker) amplifies rounding
chaotically: changing ONE initial weight by one ulp in the virtual run itself moved the final top-1 of
the 8-epoch mSGD run from 93.33 % to 91.39 % (1.9 points, 7 of 360 images) and its weights by 77 %; the
virtual and real post-local runs ended 2.8 points apart (90.3 vs 93.1 %). So no implementation can
promise the 1 point that was asked; the test allows 5 points (18 images). A run still mid-way up its
learning curve (SlowMo at this lr ended at 56 %) swings by much more between epochs, so its final top-1
is not compared; its syncs, bytes and first-epoch loss are."""

from __future__ import annotations

import pytest
from recipe_runs import cpu_config, digits_shards, metrics, run_recipe

pytestmark = pytest.mark.slow

# lr 0.4 for 6 epochs, 0.04 for the last 2: about 92 % top-1, so that predictions are not coin flips
EPOCHS = 8
LR = {"base_lr": 0.4, "reference_batch": 32, "warmup_epochs": 0.5, "decay": "step", "milestones": [6.0]}
TOP1_FLOOR = 5.0
CASES = {  # name: (K, epochs, local_sgd entries); global batch 32
    "msgd": (2, EPOCHS, {"T": None}),
    "local": (2, EPOCHS, {"H": 2, "T": 0}),
    "postlocal": (2, EPOCHS, {"H": 2, "T": 3}),
    "slowmo": (2, EPOCHS, {"H": 2, "T": 3, "slowmo": {"beta": 0.5, "alpha": 1.0}}),
    # short (4 processes on 2 cores), at lr 0.1; batches of 8 scatter more: the first epoch's loss of one
    # epoch measured 2.3491 (virtual), 2.3503 (virtual, one ulp moved) and 2.3316 (real), 0.75 % apart
    "local_k4": (4, 2, {"H": 2, "T": 0}),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    # 1440 training and 360 validation digits of 20 px (the quickstart's size): 45 steps per epoch
    return digits_shards(
        tmp_path_factory.mktemp("data"), train_per_class=144, val_per_class=36, image_size=20
    )


@pytest.mark.parametrize("name", list(CASES))
def test_virtual_run_equals_the_multi_process_run(name, shards, tmp_path):
    K, epochs, block = CASES[name]
    lr = LR if epochs == EPOCHS else {**LR, "base_lr": 0.1, "milestones": [epochs - 0.5]}
    cfg = cpu_config(tmp_path, name, batch=32 // K, epochs=epochs, lr_schedule=lr, **block)
    run_recipe(cfg, shards, tmp_path / "virtual", virtual=K)
    run_recipe(cfg, shards, tmp_path / "real", per_node=K)
    virtual, real = metrics(tmp_path / "virtual"), metrics(tmp_path / "real")
    assert len(virtual) == len(real) == epochs
    for v, r in zip(virtual, real):
        for key in ("step", "phase", "syncs", "bytes_sent", "grad_allreduces"):
            assert v[key] == r[key], (key, v, r)
    loss_tolerance = 0.005 if K == 2 else 0.02
    assert abs(virtual[0]["train_loss"] - real[0]["train_loss"]) <= loss_tolerance * real[0]["train_loss"]
    if real[-1]["top1"] > 80:  # trained: the comparison is not between coin flips
        assert abs(virtual[-1]["top1"] - real[-1]["top1"]) <= TOP1_FLOOR, (virtual[-1], real[-1])
