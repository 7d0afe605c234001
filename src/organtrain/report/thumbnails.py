"""Thumbnails of test images, read from the dataset's test shards by content hash.

The shards hold the very bytes the model was tested on (already downscaled to the
dataset's max_image_side), so the report shows what the model saw, without needing
access to the original image tree.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from PIL import Image

from organtrain.data.dataset import DatasetIndex
from organtrain.storage import Storage

SIDE = 128  # pixels: large enough to see tissue structure, small enough for 24 per organ


def misclassified(predictions: Iterable[dict], cap: int) -> list[dict]:
    """The wrong predictions, most confident first (the ones most worth a look)."""
    wrong = [p for p in predictions if p["true_class"] != p["predicted_class"]]
    return sorted(wrong, key=lambda p: (-p["confidence"], p["source_key"]))[:cap]


def thumbnail_jpeg(encoded: bytes, side: int = SIDE) -> bytes:
    """A JPEG no larger than side × side, aspect kept (photographic content: JPEG is
    several times smaller than PNG, and the report carries many)."""
    with Image.open(io.BytesIO(encoded)) as img:
        rgb = img.convert("RGB")
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumbnails_from_test_split(
    storage: Storage, index: DatasetIndex, organ: str, sha256s: set[str]
) -> dict[str, bytes]:
    """sha256 -> JPEG thumbnail for the wanted test images of `organ` (those found).

    Shards are fetched through the node's verified cache, as training does; reading stops
    as soon as every wanted image has been seen.
    """
    if not sha256s:
        return {}
    # Imported here: TensorFlow loads slowly and only this part of the report needs it.
    from organtrain.data.pipeline import shard_files
    from organtrain.data.shards import read_shard

    found: dict[str, bytes] = {}
    for path in shard_files(storage, index, organ, "test"):
        for record in read_shard(path):
            if record.sha256 in sha256s and record.sha256 not in found:
                found[record.sha256] = thumbnail_jpeg(record.encoded)
        if len(found) == len(sha256s):
            break
    return found
