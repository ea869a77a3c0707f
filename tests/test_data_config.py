"""localsgd_ds.data.DataConfig (the loaders' options, the ``train.data`` block): validation that names
the key and the value, the loaders taking it in place of keywords, and webdataset's s3:// reader being
registered without importing webdataset."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from data_prep.shard import shard_dataset
from data_prep.synthetic import make_digits_imagefolder
from localsgd_ds.config import ConfigError
from localsgd_ds.data import KEYWORD_DEFAULTS, DataConfig, train_loader, val_loader


def test_defaults_are_imagenets_and_round_trip():
    config = DataConfig()
    assert (config.num_workers, config.image_size, config.crop_scale, config.hflip) == (
        8,
        224,
        (0.08, 1.0),
        True,
    )
    assert (config.val_resize, config.val_crop, config.eval_batch_size) == (256, 224, None)
    assert DataConfig.from_dict({}) == config
    assert DataConfig.from_dict(config.to_dict()) == config
    small = DataConfig.from_dict(
        {"image_size": 56, "crop_scale": [0.35, 1], "hflip": False, "eval_batch_size": 64}
    )
    assert small.crop_scale == (0.35, 1.0) and isinstance(small.crop_scale, tuple)
    assert small.to_dict()["crop_scale"] == [0.35, 1.0] and small.eval_batch_size == 64
    assert KEYWORD_DEFAULTS == DataConfig(num_workers=2)  # what the keyword-only loaders always used


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("num_workers", -1, "an integer >= 0"),
        ("num_workers", 2.0, "an integer >= 0"),
        ("image_size", 4, "an integer >= 8"),
        ("image_size", True, "an integer >= 8"),
        ("crop_scale", [0.5, 0.2], "[low, high] with 0 < low <= high <= 1"),
        ("crop_scale", [0, 1], "[low, high] with 0 < low <= high <= 1"),
        ("crop_scale", 0.5, "[low, high] with 0 < low <= high <= 1"),
        ("hflip", "yes", "true or false"),
        ("val_resize", "256", "an integer >= 8"),
        ("val_crop", 0, "an integer >= 8"),
        ("eval_batch_size", 0, "null or an integer >= 1"),
    ],
)
def test_a_bad_value_names_the_key_and_the_value(key, value, expected):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict({key: value})
    assert str(err.value) == f"train.data.{key} must be {expected}, got {value!r}"
    with pytest.raises(ConfigError, match=rf"^DataConfig\.{key} must be"):
        DataConfig(**{key: value})


def test_block_shape_unknown_keys_and_crop_larger_than_resize():
    with pytest.raises(ConfigError, match=r"train\.data: unknown key\(s\) \['workers'\]; known keys are"):
        DataConfig.from_dict({"workers": 4})
    with pytest.raises(ConfigError, match=r"my\.block must be an object with keys \['num_workers'"):
        DataConfig.from_dict([8], where="my.block")
    with pytest.raises(
        ConfigError, match="train.data.val_crop = 300 is larger than train.data.val_resize = 256"
    ):
        DataConfig.from_dict({"val_crop": 300})
    assert issubclass(ConfigError, ValueError)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("config")
    src = make_digits_imagefolder(root / "src", image_size=40, train_per_class=8, val_per_class=3)
    shard_dataset(src, root / "shards", samples_per_shard=20, progress=False)
    return str(root / "shards")


def test_loaders_take_the_config_or_keywords_alike(digit_shards):
    config = DataConfig(
        num_workers=0, image_size=24, crop_scale=(0.3, 1.0), hflip=False, val_resize=32, val_crop=24
    )
    call = dict(batch_size=8, rank=0, world_size=1, epoch=1, with_keys=True)
    by_config = list(train_loader(digit_shards, config=config, **call))
    by_keywords = list(
        train_loader(digit_shards, image_size=24, num_workers=0, crop_scale=(0.3, 1.0), hflip=False, **call)
    )
    assert len(by_config) == len(by_keywords) == 10
    for a, b in zip(by_config, by_keywords, strict=True):
        assert torch.equal(a[0], b[0]) and a[2] == b[2] and a[0].shape == (8, 3, 24, 24)
    # A keyword given beside the config replaces that field only.
    larger = next(iter(train_loader(digit_shards, config=config, image_size=32, **call)))
    assert larger[0].shape == (8, 3, 32, 32)
    val = val_loader(digit_shards, batch_size=8, rank=0, world_size=1, config=config)
    assert [b[0].shape[-1] for b in val] == [24] * 4 and sum(len(b[1]) for b in val) == 30
    with pytest.raises(ConfigError, match="val_crop = 40 is larger than DataConfig.val_resize = 32"):
        val_loader(digit_shards, batch_size=8, rank=0, world_size=1, config=config, crop=40)


def test_importing_the_loaders_registers_s3_for_webdataset_without_importing_it():
    script = (
        "import importlib, sys\n"
        "import localsgd_ds.data\n"
        "assert not [m for m in sys.modules if m.startswith('webdataset')], 'webdataset imported'\n"
        "import webdataset\n"
        "schemes = importlib.import_module('webdataset.gopen').gopen_schemes\n"
        "from localsgd_ds.data.webdataset_s3 import gopen_s3\n"
        "assert schemes['s3'] is gopen_s3\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


class _HangingStream(torch.utils.data.IterableDataset):
    """One batch, then a worker that hangs without dying (as a worker deadlocked after fork would)."""

    options = DataConfig(num_workers=1)
    with_keys = False
    skip_batches = 0

    def __iter__(self):
        yield 0, torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), (), []
        time.sleep(120)


def test_a_hanging_loader_worker_fails_in_time(monkeypatch):
    from localsgd_ds.data.loaders import ShardLoader

    monkeypatch.setenv("LOCALSGD_LOADER_TIMEOUT", "2")
    loader = ShardLoader(_HangingStream(), length=2, exact=True, pin_memory=False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        list(loader)
    assert time.monotonic() - start < 60
