"""Validation crops against torchvision, through the real shard + loader path, at sizes above 512 px.

The README promises that a validation image matches torchvision's ``Resize(256) + CenterCrop(224)``
(on the PIL image, then ``ToTensor``) within 1/255 at any size. Large images are where a shortcut
(libjpeg's reduced-size DCT decoding) would show: these are real photographs (scikit-learn's china.jpg
and flower.jpg) upscaled and composed to 1000x750, 2000x1500 and odd sizes, with sensor-like noise so
that they carry the fine detail a camera image of that size has, encoded as JPEG, sharded with
data_prep and read back with ``val_loader``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.shard import shard_dataset
from data_prep.synthetic import _sample_photos
from localsgd_ds.data import IMAGENET_MEAN, IMAGENET_STD, val_loader

# (width, height, mode): the sizes of the issue, portrait and odd sizes, the smallest size that draft
# decoding touched (short side 512), small images, and grayscale / CMYK JPEGs (ImageNet has both).
CASES = [
    (1000, 750, "RGB"),
    (2000, 1500, "RGB"),
    (750, 1000, "RGB"),
    (1237, 521, "RGB"),
    (513, 769, "RGB"),
    (640, 512, "RGB"),
    (3001, 2000, "RGB"),
    (500, 375, "RGB"),
    (257, 999, "RGB"),
    (1000, 750, "L"),
    (1000, 750, "CMYK"),
]


def photo_jpeg(width: int, height: int, mode: str, seed: int) -> bytes:
    """The two sample photos side by side, upscaled to ``width`` x ``height``, plus noise; as JPEG."""
    rng = np.random.default_rng(seed)
    left, right = (Image.fromarray(p) for p in _sample_photos())
    if seed % 2:
        left, right = right, left
    canvas = Image.new("RGB", (width, height))
    canvas.paste(left.resize((width // 2, height), Image.BICUBIC), (0, 0))
    canvas.paste(right.resize((width - width // 2, height), Image.BICUBIC), (width // 2, 0))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def torchvision_val(jpeg: bytes) -> np.ndarray:
    """torchvision's ImageNet validation transform: CHW float in [0, 1]."""
    from torchvision import transforms as T

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(image).numpy()


@pytest.fixture(scope="module")
def large_photo_shards(tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """One val split holding every case (key -> its JPEG bytes), sharded by data_prep."""
    root = tmp_path_factory.mktemp("valcrops")
    folder = root / "src" / "val" / "n00000000"
    folder.mkdir(parents=True)
    jpegs = {}
    for i, (width, height, mode) in enumerate(CASES):
        name = f"photo_{width}x{height}_{mode}"
        jpegs[f"n00000000/{name}"] = photo_jpeg(width, height, mode, seed=i)
        (folder / f"{name}.JPEG").write_bytes(jpegs[f"n00000000/{name}"])
    shard_dataset(root / "src", root / "shards", samples_per_shard=4, splits=("val",), progress=False)
    return str(root / "shards"), jpegs


def test_val_loader_matches_torchvision_within_one_level(large_photo_shards):
    location, jpegs = large_photo_shards
    loader = val_loader(location, batch_size=3, rank=0, world_size=1, num_workers=1, with_keys=True)
    mean = np.array(IMAGENET_MEAN, dtype=np.float64).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float64).reshape(3, 1, 1)
    worst = {}
    for images, _labels, keys in loader:
        for image, key in zip(images.numpy().astype(np.float64), keys, strict=True):
            ours = image * std + mean  # back to ToTensor's [0, 1] scale
            worst[key] = float(np.abs(ours - torchvision_val(jpegs[key])).max()) * 255
    assert sorted(worst) == sorted(jpegs) and loader.skipped_samples == 0
    off = {Path(k).name: round(v, 2) for k, v in worst.items() if v > 1 + 1e-3}
    assert not off, f"max difference from torchvision, in 1/255 steps (limit 1): {off}"
