"""The train/validation/test split: a pure function of a split unit's key.

A *split unit* is what must never straddle two splits: the images of one patient/slide
group, the copies in one near-duplicate cluster, and everything they connect (see
grouping.py). Its key is
- its smallest group key (`group:<organ>/<group>`) when it has a group;
- else, for a near-duplicate cluster, `near:` + the smallest content hash of its images;
- else the content hash (sha256) itself, so an ungrouped image with no near-duplicate
  keeps the split it has always had.

The key is read as a number u in [0, 1) (a prefixed key is hashed first: the smallest of
several hashes is not uniform, and would send large clusters to the test split far more
often than small ones). u < test_fraction is test, then the next val_fraction is
validation, the rest is training. So:
- hashes are uniform, so every diagnosis gets about test_fraction of its units in
  expectation (stratified without state); `prepare` checks that each diagnosis has images
  in every split and leaves it out, with a message, when it does not;
- changing val_fraction moves images only between validation and training.

A unit's key can change when new images join it, so the split of images that a dataset
version already holds is inherited from that version instead (assign.py): the split of
an existing image never moves when images are added.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
_SCALE = float(1 << 64)
GROUP_PREFIX = "group:"
CLUSTER_PREFIX = "near:"


def hash_position(sha256_hex: str) -> float:
    """The place in [0, 1) of a sha256 hex digest, from its first 64 bits."""
    return int(sha256_hex[:16], 16) / _SCALE


def group_key(organ: str, group: str) -> str:
    """The unit key of a patient/slide group: one namespace per organ (a patient's lung
    and colon tiles train different models, so they need not share a split)."""
    return f"{GROUP_PREFIX}{organ}/{group}"


def cluster_key(smallest_sha256: str) -> str:
    return f"{CLUSTER_PREFIX}{smallest_sha256}"


def unit_position(key: str) -> float:
    """Where a unit key falls in [0, 1): a bare content hash is its own position; a
    prefixed key is hashed first."""
    if key.startswith((GROUP_PREFIX, CLUSTER_PREFIX)):
        return hash_position(hashlib.sha256(key.encode()).hexdigest())
    return hash_position(key)


def split_at(u: float, *, test_fraction: float, val_fraction: float) -> str:
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_of(key: str, *, test_fraction: float, val_fraction: float) -> str:
    """The split of a unit key (a bare sha256 for an image of its own)."""
    return split_at(unit_position(key), test_fraction=test_fraction, val_fraction=val_fraction)
