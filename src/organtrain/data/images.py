"""Checking one image file and normalising it for the shards.

Every image is decoded completely once here, so a truncated or corrupt file is found
during `prepare` (and listed in rejected.parquet) rather than crashing a training job
hours later. What goes into the shards is always 8-bit RGB, optionally downscaled.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# 8-bit modes with one obvious RGB rendering. 16-bit and float images (I;16, I, F) need an
# intensity window chosen by someone who knows the microscope; CMYK needs a colour profile.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "YCbCr"})
ENCODING_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


class ImageRejected(Exception):
    """The file cannot go into the dataset; `reason` is a short code for rejected.parquet."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalisedImage:
    width: int  # of the original
    height: int
    mode: str  # of the original
    encoded: bytes  # RGB, in the dataset's encoding, at most max_side on its longer edge
    encoded_width: int
    encoded_height: int
    rgb: Image.Image  # the normalised pixels, for the near-duplicate signature


def normalise_image(
    data: bytes, *, max_side: int, encoding: str = "png", jpeg_quality: int = 95
) -> NormalisedImage:
    """Decode `data` fully, check it, and re-encode it as RGB; raises ImageRejected."""
    rgb, (width, height, mode) = decode_rgb(data, max_side=max_side)
    out = io.BytesIO()
    options = {"quality": jpeg_quality} if encoding == "jpeg" else {}
    rgb.save(out, format=ENCODING_FORMATS[encoding], **options)
    return NormalisedImage(width, height, mode, out.getvalue(), rgb.width, rgb.height, rgb)


def decode_rgb(data: bytes, *, max_side: int) -> tuple[Image.Image, tuple[int, int, str]]:
    """Decode `data` fully, check it, convert it to RGB and shrink it to at most `max_side`;
    returns (the RGB image, (original width, height, mode)); raises ImageRejected.

    `prepare` stores these pixels in the shards, and `organtrain predict` feeds the same
    ones to a model, so new images are seen exactly as the training images were.
    """
    if not data:
        raise ImageRejected("empty_file", "the file has zero bytes")
    image = _decode(data)
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageRejected(
            "unsupported_mode",
            f"pixel mode {image.mode!r} has no unambiguous 8-bit RGB rendering; "
            "convert the file to 8-bit RGB or greyscale",
        )
    original = (image.width, image.height, image.mode)
    rgb = _to_rgb(image)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb, original


def _decode(data: bytes) -> Image.Image:
    # Pillow pads truncated files with grey when this flag is on; we want the error.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes every pixel: this is what finds truncation
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "Pillow cannot identify this as an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports cut-off files as OSError ("image file is truncated", "broken data
        # stream") and some malformed headers as SyntaxError/ValueError.
        raise ImageRejected("truncated", f"cannot decode the image: {err}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent areas become white, the colour of an empty slide."""
    if image.mode in ("LA", "PA", "RGBA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
