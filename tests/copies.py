"""The copies an augmenting tool makes of one image (Augmentor-style), for the
near-duplicate tests: right-angle turns and flips, rotation with crop, JPEG, resizing."""

from __future__ import annotations

import io
import math

from PIL import Image

from organtrain.data.neardup import _largest_rotated_rect

D4 = [
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
]


def thumbnail(image: Image.Image, max_side: int = 256) -> Image.Image:
    """prepare's rule: the longer side at most max_side."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def rotate_crop(image: Image.Image, degrees: float) -> Image.Image:
    """Augmentor's rotation: rotate, crop the largest inner rectangle, resize back."""
    w, h = image.size
    inner_w, inner_h = _largest_rotated_rect(w, h, math.radians(degrees))
    rotated = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    cw, ch = rotated.size
    box = [round((cw - inner_w) / 2), round((ch - inner_h) / 2)]
    box += [round((cw + inner_w) / 2), round((ch + inner_h) / 2)]
    return rotated.crop(tuple(box)).resize((w, h), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def resize(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)
