"""The train/validation/test split: a pure function of an image's content hash.

Each image's sha256 is read as a number u in [0, 1): u < test_fraction is test, then the
next val_fraction is validation, the rest is training. So:
- an image's split never changes when other images are added or removed (nightly runs
  compare champion and challenger on the same test images);
- identical files share a hash, hence a split: no leak of a duplicate from train to test;
- hashes are uniform, so every diagnosis gets test_fraction of its images in expectation
  (stratified per diagnosis without any state); `prepare` checks each diagnosis ends up
  with images in every split and leaves it out, with a message, when it does not;
- changing val_fraction moves images only between validation and training.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
_SCALE = float(1 << 64)


def hash_position(sha256_hex: str) -> float:
    """The image's place in [0, 1), from the first 64 bits of its sha256."""
    return int(sha256_hex[:16], 16) / _SCALE


def split_of(sha256_hex: str, *, test_fraction: float, val_fraction: float) -> str:
    u = hash_position(sha256_hex)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
