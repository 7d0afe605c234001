"""Thumbnails of dataset images, read from the dataset's shards by content hash.

The shards hold the very bytes the model was trained and tested on (already downscaled
to the dataset's max_image_side), so the report shows what the model saw, without
needing access to the original image tree.
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


def thumbnails_from_split(
    storage: Storage,
    index: DatasetIndex,
    organ: str,
    split: str,
    sha256s: set[str],
    *,
    shard_keys: set[str] | None = None,
) -> dict[str, bytes]:
    """sha256 -> JPEG thumbnail for the wanted images of `organ`'s `split` (those found).

    `shard_keys`: the shards holding them (the manifest's `shard` column) when known, so
    only those are fetched; else the split's shards are read in turn. Each shard comes
    through the node's verified cache, as training's do, and reading stops as soon as
    every wanted image has been seen: a few thumbnails never pull a whole training split.
    """
    if not sha256s:
        return {}
    # Imported here: TensorFlow loads slowly and only this part of the report needs it.
    from organtrain.data.cache import local_shard
    from organtrain.data.shards import read_shard

    shards = index.shards_for(organ, split)
    if shard_keys is not None:
        shards = [s for s in shards if s.key in shard_keys]
    found: dict[str, bytes] = {}
    for shard in shards:
        for record in read_shard(local_shard(storage, index, shard).path):
            if record.sha256 in sha256s and record.sha256 not in found:
                found[record.sha256] = thumbnail_jpeg(record.encoded)
        if len(found) == len(sha256s):
            break
    return found
