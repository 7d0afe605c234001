"""The per-batch work of `prepare`: checking a batch of source files, writing one shard.

These functions are the only code that does that work. `prepare` hands them to an
executor (executors.py): threads on this machine, or Ray tasks on a cluster's nodes. They
take their storage and settings as arguments and return plain values, so they run the
same wherever they run, and the same input gives the same results and the same shard
bytes on both paths.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from organtrain.config import PrepareConfig
from organtrain.data import neardup
from organtrain.data.assign import CheckedImage
from organtrain.data.images import ImageRejected, normalise_image
from organtrain.data.scan import Candidate, Rejection
from organtrain.storage import Storage, sha256_bytes, sha256_file

if TYPE_CHECKING:
    from organtrain.data.shards import ShardRecord

# A batch is this many images at most: enough to make a Ray task's start-up (a few ms)
# small beside its work, few enough that the progress bar moves and the nodes share the
# last batches.
MAX_BATCH = 64
BATCHES_PER_WORKER = 4  # the listing in at least this many batches per thread or CPU


@dataclass(frozen=True)
class Checked:
    """A file that decoded cleanly, and its image as it goes into the shards."""

    image: CheckedImage
    encoded: bytes


def batches(items: list, workers: int) -> list[list]:
    """`items` in consecutive batches: BATCHES_PER_WORKER per worker, MAX_BATCH at most."""
    size = max(1, min(MAX_BATCH, -(-len(items) // (max(1, workers) * BATCHES_PER_WORKER))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_batch(
    source: Storage, cfg: PrepareConfig, candidates: list[Candidate]
) -> list[Checked | Rejection]:
    """Read, hash, decode and re-encode each candidate (with its near-duplicate signature
    when prepare.near_duplicates); a file that fails its check becomes a Rejection."""
    return [_check(source, cfg, c) for c in candidates]


def _check(source: Storage, cfg: PrepareConfig, candidate: Candidate) -> Checked | Rejection:
    data = source.get_bytes(candidate.key)
    sha = sha256_bytes(data)
    try:
        image = normalise_image(
            data, max_side=cfg.max_image_side, encoding=cfg.encoding, jpeg_quality=cfg.jpeg_quality
        )
    except ImageRejected as err:
        return Rejection(
            candidate.key, err.reason, err.detail, candidate.organ, candidate.diagnosis,
            len(data), candidate.tag,
        )  # fmt: skip
    checked = CheckedImage(
        candidate.key, candidate.organ, candidate.diagnosis, sha,
        image.width, image.height, image.mode, len(data),
        image.encoded_width, image.encoded_height, candidate.group,
        neardup.signature(np.asarray(image.rgb)) if cfg.near_duplicates else b"",
        candidate.metadata,
    )  # fmt: skip
    return Checked(checked, image.encoded)


@dataclass(frozen=True)
class SpoolImages:
    """Encoded images in a local folder, one file per sha256 (the driver's spool)."""

    folder: str

    def get(self, sha256: str) -> bytes:
        return (Path(self.folder) / sha256).read_bytes()


@dataclass(frozen=True)
class PackedImages:
    """Encoded images carried with the task, by sha256 (for a node without the spool)."""

    images: Mapping[str, bytes]

    def get(self, sha256: str) -> bytes:
        return self.images[sha256]


@dataclass(frozen=True)
class ShardToWrite:
    """One new shard: its records in order, each with `encoded` empty (taken from
    `images` as the shard is written, so no more than one image is held at a time)."""

    organ: str
    split: str
    records: list[ShardRecord]
    images: SpoolImages | PackedImages
    scratch: str | None  # the local folder for the shard's temporary file; None: the system's


@dataclass(frozen=True)
class WrittenShard:
    key: str  # in the pool: shards/<organ>/<split>-<sha256>.tfrecord
    images: int
    bytes: int
    sha256: str
    uploaded: bool  # False: an interrupted earlier run had put these very bytes there


def write_one_shard(pool: Storage, shard: ShardToWrite) -> WrittenShard:
    """Write `shard` into the dataset's pool (`pool`), named by its sha256; a shard already
    there (from an interrupted earlier run: the bytes are deterministic) is not uploaded."""
    # Here, not at the top: TensorFlow takes seconds to import, and a Ray worker that only
    # checks images never needs it.
    from organtrain.data.shards import pool_shard_key, write_shard

    with tempfile.NamedTemporaryFile(dir=shard.scratch, suffix=".tfrecord") as tmp:
        records = (
            dataclasses.replace(r, encoded=shard.images.get(r.sha256)) for r in shard.records
        )
        n = write_shard(tmp.name, records)
        digest = sha256_file(tmp.name)
        key = pool_shard_key(shard.organ, shard.split, digest)
        uploaded = pool.checksum(key) != digest
        if uploaded:
            pool.put_file(key, tmp.name)
        return WrittenShard(key, n, os.path.getsize(tmp.name), digest, uploaded)
