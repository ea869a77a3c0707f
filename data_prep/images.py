"""What data_prep stores for one source image: the original JPEG bytes when they decode, else a JPEG.

JPEGs are decoded (at 1/8 scale: libjpeg still parses every coefficient, so truncation and bad Huffman
data are found) and stored unchanged, CMYK and grayscale ones included (the loaders convert them).
Other formats (ImageNet has a PNG named .JPEG) and, with ``resize_short_side``, images whose short side
is larger are re-encoded as JPEG. An image PIL cannot read raises :class:`BadImageError`.

Example::

    payload, reencoded = prepare_image(Path("n01440764_10026.JPEG").read_bytes())
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An input image that cannot be decoded."""


def prepare_image(
    data: bytes, resize_short_side: int | None = None, jpeg_quality: int = 90
) -> tuple[bytes, bool]:
    """The bytes to store for one source image and whether they were re-encoded."""
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        shrink = resize_short_side is not None and min(width, height) > resize_short_side
        if im.format == "JPEG" and not shrink:
            im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
            return data, False
        if shrink:
            scale = resize_short_side / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if im.format == "JPEG":
                im.draft(None, size)  # decode at a reduced DCT scale that still keeps >= size
            im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
        else:
            im.load()
    except UnidentifiedImageError:
        raise BadImageError("not an image PIL can read (unrecognized format)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")  # CMYK, palette, alpha: JPEG output as plain RGB
    out = io.BytesIO()
    im.save(out, "JPEG", quality=jpeg_quality)
    return out.getvalue(), True
