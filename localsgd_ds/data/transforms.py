"""Decoding and augmentation of one JPEG, and the normalization of a batch: torchvision's ImageNet
transforms, done with PIL and numpy in as few passes as possible.

Train: RandomResizedCrop (torchvision's sampler, drawn from a given numpy Generator so that every
crop is a pure function of a seed) + horizontal flip, done as one crop-and-resize with PIL's
antialiased bilinear filter, decoding large JPEGs at a reduced DCT scale (``draft``; see
:func:`_crop_resize` for why only training does). Validation: Resize(short side) + CenterCrop as one
box resize of the full-size image, within 1/255 of torchvision's. Batches are normalized with the
ImageNet mean and std in numpy (:func:`normalize`).

Example::

    image = decode_train(jpeg_bytes, np.random.default_rng([seed, position]), size=224)   # HWC uint8
    center = decode_val(jpeg_bytes, resize=256, crop=224)
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
):
    """torchvision's RandomResizedCrop parameters as (left, top, crop_width, crop_height), from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _crop_resize(
    im: Image.Image, box: tuple[float, float, float, float], size: int, draft: bool
) -> Image.Image:
    """Resize ``box`` of ``im`` to size x size (antialiased bilinear, as torchvision on a PIL image).

    ``draft``: when the crop is at least twice the output, let libjpeg scale by 1/2, 1/4 or 1/8 in the
    DCT while the crop still keeps >= ``size`` pixels. That is not torchvision's resize (a center crop of
    a 1000x750 photo came out up to 19/255 off), so validation never drafts. Training does, because it
    pays on large images: in ``benchmarks/bench_loader.py --draft-ab`` the loader needed 1.31x (1000x750)
    and 1.57x (2000x1500) the CPU per image without it (medians of 7 interleaved rounds; at 500x375,
    where no crop is large enough to draft, 0.92x: noise). See data_prep/README.md, "Loader benchmark".
    """
    width, height = im.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if draft and im.format == "JPEG" and min(crop_w, crop_h) >= 2 * size:
        drafted = im.draft(None, (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)))
        if drafted is not None:
            s = width / drafted[1][2]
            box = (box[0] / s, box[1] / s, box[2] / s, box[3] / s)
    if im.mode in ("RGB", "L", "CMYK"):
        out = im.resize((size, size), Image.BILINEAR, box=box)
        return out if out.mode == "RGB" else out.convert("RGB")  # grayscale/CMYK: convert the small image
    return im.convert("RGB").resize((size, size), Image.BILINEAR, box=box)


def decode_train(
    jpeg: bytes,
    rng: np.random.Generator,
    size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    draft: bool = True,
) -> np.ndarray:
    """RandomResizedCrop(size, scale=crop_scale) + horizontal flip (unless ``hflip`` is False) of one
    encoded image; returns HWC uint8 RGB. The flip coin is tossed either way, so the crops do not move.
    ``draft``: decode large JPEGs at a reduced DCT scale when the crop is at least twice ``size``."""
    im = Image.open(io.BytesIO(jpeg))
    left, top, w, h = random_resized_crop(im.width, im.height, rng, scale=crop_scale)
    flip = rng.random() < 0.5 and hflip
    out = _crop_resize(im, (left, top, left + w, top + h), size, draft)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def decode_val(jpeg: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize(short side to ``resize``) + CenterCrop(``crop``) done as one box resize; HWC uint8 RGB.

    Always decoded at full size: within 1/255 of torchvision's Resize + CenterCrop at any image size."""
    im = Image.open(io.BytesIO(jpeg))
    width, height = im.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return np.asarray(
        _crop_resize(im, (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy), crop, False)
    )


# (x - mean) / std == x * _SCALE + _SHIFT, per channel, for x in 0..255
_SCALE = (1.0 / (np.array(IMAGENET_STD, dtype=np.float64) * 255)).astype(np.float32).reshape(1, 3, 1, 1)
_SHIFT = (
    (-np.array(IMAGENET_MEAN, dtype=np.float64) / np.array(IMAGENET_STD))
    .astype(np.float32)
    .reshape(1, 3, 1, 1)
)


def normalize(batch: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W], normalized with ImageNet mean/std.

    numpy, not torch: single-threaded and free of the GIL. torch would use the process's intra-op
    threads, whose OpenMP spinning cost 8x the arithmetic here while DataLoader workers held the cores.
    The output comes from numpy's allocator too (reused memory), unless pinned (CUDA's caching host
    allocator): torch's CPU allocator handed out fresh pages for every batch, 4x the cost in page faults.
    """
    if pin_memory:
        out = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
        pixels = out.numpy()
    else:
        pixels = np.empty(batch.shape, dtype=np.float32)
        out = torch.from_numpy(pixels)
    np.multiply(batch.numpy(), _SCALE, out=pixels)
    np.add(pixels, _SHIFT, out=pixels)
    return out
