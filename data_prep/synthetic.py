"""Small real image datasets in the ImageNet class-folder layout, built offline from images that ship
inside scikit-learn (no download at run time).

``make_digits_imagefolder`` turns ``sklearn.datasets.load_digits`` (1797 handwritten digits, 8x8) into
a 10-class colour JPEG dataset: each image is upscaled, placed with a random scale, shift and
rotation, painted dark ink on a light background (each of a random tint) with noise, and JPEG-encoded. The tints
carry no label information, so a model has to read the digit: a small but real learning problem.
Validation images come from digits never used for training. ``make_photo_imagefolder`` cuts
ImageNet-sized JPEGs (about 500x375, about 100 KB) from sklearn's two sample photos, for decode
benchmarks. ``write_edge_cases`` writes the awkward inputs ImageNet really contains (CMYK and
grayscale JPEGs, a PNG named .JPEG) and broken ones (truncated, garbage bytes).

Example::

    from data_prep.synthetic import make_digits_imagefolder
    root = make_digits_imagefolder("data/digits", image_size=64, train_per_class=100, val_per_class=20)
    # root/train/n00000003/n00000003_0042.JPEG ... ; python -m data_prep shard --src data/digits ...
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

NUM_DIGIT_CLASSES = 10


def wnid(label: int) -> str:
    """A WordNet-id-like folder name: sorted order equals label order, as with real wnids."""
    return f"n{label:08d}"


def _render_digit(digit: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (values 0..16) as a colour ``size`` x ``size`` image with random pose and colours."""
    ink = Image.fromarray((digit / 16.0 * 255).astype(np.uint8), mode="L")
    glyph = int(size * rng.uniform(0.6, 0.95))
    ink = ink.resize((glyph, glyph), Image.BICUBIC).rotate(rng.uniform(-15, 15), Image.BILINEAR)
    canvas = Image.new("L", (size, size), 0)
    x, y = rng.integers(0, size - glyph + 1, size=2)
    canvas.paste(ink, (int(x), int(y)))
    alpha = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0
    # Dark ink on a light background, each of a random tint: colour carries no label, and the digit keeps
    # a contrast a small network picks up within a few epochs (fully random colour pairs need dozens).
    fg, bg = rng.uniform(0, 110, size=3), rng.uniform(150, 255, size=3)
    # A smooth background gradient and pixel noise, so that images are not flat colour fields.
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gradient = ramp[None, :, None] * rng.uniform(-30, 30, 3) + ramp[:, None, None] * rng.uniform(-30, 30, 3)
    rgb = alpha * fg + (1 - alpha) * (bg + gradient) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def make_digits_imagefolder(
    root: str | Path,
    image_size: int = 64,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/n0000000K/*.JPEG`` for the 10 digit classes; returns ``root``.

    Validation images are drawn from digits held out from training (about 174 per class exist:
    ``val_per_class`` must stay below that); training reuses its digits with fresh random poses when
    ``train_per_class`` exceeds what is left. 1200 images at 64 px take about a second.
    """
    from sklearn.datasets import load_digits

    if image_size < 16:
        raise ValueError(f"image_size={image_size}: use at least 16 pixels")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError(
            f"train_per_class={train_per_class}, val_per_class={val_per_class}: need >= 1 and >= 0"
        )
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(NUM_DIGIT_CLASSES):
        pool = rng.permutation(np.flatnonzero(digits.target == label))
        if val_per_class >= len(pool):
            raise ValueError(f"val_per_class={val_per_class}: class {label} has only {len(pool)} digits")
        held_out, train_pool = pool[:val_per_class], pool[val_per_class:]
        for split, count, sources in (
            ("train", train_per_class, train_pool),
            ("val", val_per_class, held_out),
        ):
            folder = root / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _render_digit(digits.images[sources[i % len(sources)]], image_size, rng)
                image.save(folder / f"{wnid(label)}_{i:04d}.JPEG", "JPEG", quality=int(rng.integers(80, 96)))
    return root


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg and flower.jpg, 427x640 RGB


def make_photo_imagefolder(
    root: str | Path,
    num_classes: int = 10,
    train_per_class: int = 20,
    val_per_class: int = 5,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> Path:
    """ImageNet-sized JPEGs (``size`` = width, height; quality 90, about 100 KB) cut from real photos.

    Each image is a random crop of one of sklearn's sample photos, flipped and colour-shifted, with
    sensor-like noise so that the bytes per pixel resemble ImageNet's. Labels are arbitrary: this set
    is for decode and loader throughput, not for learning.
    """
    photos = _sample_photos()
    rng = np.random.default_rng(seed)
    root = Path(root)
    w, h = size
    # Sensor-like noise after resizing gives about 100 KB per 500x375 image at quality 90, like ImageNet.
    # Windows of one noise field keep generation fast (about 15 ms per image).
    noise = rng.normal(0, 16, (2 * h, 2 * w, 3)).astype(np.float32)
    for label in range(num_classes):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo = photos[int(rng.integers(len(photos)))]
                ph, pw = photo.shape[:2]
                cw = int(pw * rng.uniform(0.6, 1.0))
                ch = min(ph, int(cw * h / w))
                x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
                crop = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                nx, ny = int(rng.integers(0, w)), int(rng.integers(0, h))
                pixels = (
                    np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2, 3)
                    + noise[ny : ny + h, nx : nx + w]
                )
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{wnid(label)}_{i:04d}.JPEG", "JPEG", quality=90)
    return root


def write_edge_cases(folder: str | Path, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write awkward and broken inputs into ``folder``; returns {case: path}.

    Decodable (a sharder must keep them): ``cmyk`` and ``grayscale`` JPEGs, ``png_as_jpeg`` (PNG bytes
    named .JPEG, as one ImageNet training file is). Broken (a sharder must skip and report them):
    ``truncated`` (a JPEG cut in the middle of its scan data) and ``garbage`` (random bytes).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo = _sample_photos()[0]
    side = min(photo.shape[:2])
    base = Image.fromarray(photo[:side, :side]).resize((image_size, int(image_size * 0.75)), Image.BILINEAR)
    paths = {
        name: folder / f"edge_{name}.JPEG"
        for name in ("cmyk", "grayscale", "png_as_jpeg", "truncated", "garbage")
    }
    base.convert("CMYK").save(paths["cmyk"], "JPEG", quality=90)
    base.convert("L").save(paths["grayscale"], "JPEG", quality=90)
    base.save(paths["png_as_jpeg"], "PNG")
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90)
    paths["truncated"].write_bytes(buf.getvalue()[: math.ceil(len(buf.getvalue()) * 0.6)])
    paths["garbage"].write_bytes(rng.bytes(2048))
    return paths
