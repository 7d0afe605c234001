"""TFRecord shards: one tf.train.Example per image, written locally then published.

Records within a shard are in sha256 order: deterministic (re-running `prepare` writes
the same records in the same shards, so an interrupted run can skip shards it already
published) and unrelated to diagnosis, so a shard is already a mix of classes. Which
records make which shard follows the previous version's shards (plan_split): existing
shards keep their records, new images go into new shards. Each
Example is serialised deterministically (its feature map sorted by key: protobuf's
default order may differ between processes), so the same records give the same shard
bytes and checksum in any process.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

# The feature keys of every record; the training pipeline parses with FEATURE_SPEC.
IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
LABEL = "image/class/label"
DIAGNOSIS = "image/class/text"
SHA256 = "image/sha256"
SOURCE_KEY = "image/source_key"


@dataclass(frozen=True)
class ShardRecord:
    """What one tf.train.Example holds."""

    encoded: bytes
    image_format: str  # png or jpeg
    height: int
    width: int
    label: int
    diagnosis: str
    sha256: str  # of the original file
    source_key: str


def feature_spec():
    """tf.io.parse_single_example spec for a shard record."""
    return {
        IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        DIAGNOSIS: tf.io.FixedLenFeature([], tf.string),
        SHA256: tf.io.FixedLenFeature([], tf.string),
        SOURCE_KEY: tf.io.FixedLenFeature([], tf.string),
    }


# Each version that adds a few images to an organ's split adds a small shard (fewer than
# half of images_per_shard). The small shards of a split are merged into one as soon as
# together they fill half a shard, or when there are more than this many of them: a merge
# rewrites less than half a shard's images (plus the new ones), each image is rewritten at
# most about once on its way to a full-sized shard, and a split never has many small files.
MAX_SMALL_SHARDS = 16


def shard_key(organ: str, split: str, index: int, count: int) -> str:
    """The key of a shard a version owns (formats 1 and 2, under the version's folder)."""
    return f"shards/{organ}/{split}-{index:05d}-of-{count:05d}.tfrecord"


def pool_shard_key(organ: str, split: str, sha256: str) -> str:
    """The key of a shard in the dataset's pool (format 3): named by its bytes' sha256, so
    the same records always land on the same object and no object is ever rewritten."""
    return f"shards/{organ}/{split}-{sha256}.tfrecord"


def plan_shards(n_images: int, images_per_shard: int) -> list[tuple[int, int]]:
    """(start, stop) ranges splitting n_images into equal-ish shards of at most the size."""
    count = max(1, -(-n_images // images_per_shard))
    bounds = [round(i * n_images / count) for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class ExistingShard:
    """A shard the previous version lists for this organ's split, and what it holds."""

    key: str
    records: dict[str, tuple]  # sha256 -> what its record says (label, diagnosis, key, size)


@dataclass(frozen=True)
class PlannedShard:
    members: list[str]  # sha256 of each record, in the order written (sha256 order)
    reuse: str | None  # the key of an existing shard holding exactly these records


def plan_split(
    records: dict[str, tuple], existing: list[ExistingShard], images_per_shard: int
) -> list[PlannedShard]:
    """Which records make the shards of one organ's split, given the shards the previous
    version made it of. Stable as images arrive: an existing shard whose records are all
    still here, unchanged, is kept as it is; the other records (new ones, and those of a
    shard that lost or changed one) go into new shards, in sha256 order. A fresh plan (no
    existing shard) splits the records in sha256 order into equal shards. Small shards are
    merged by the rule at MAX_SMALL_SHARDS.
    """
    kept, taken = [], set()
    for shard in existing:
        held = set(shard.records)
        unchanged = all(records.get(sha) == record for sha, record in shard.records.items())
        if held and unchanged and not held & taken:
            kept.append(PlannedShard(sorted(held), shard.key))
            taken |= held
    planned = kept + _packed(sorted(set(records) - taken), images_per_shard)
    small_below = max(1, images_per_shard // 2)
    small = [p for p in planned if len(p.members) < small_below]
    in_small = sum(len(p.members) for p in small)
    if len(small) < 2 or (in_small < small_below and len(small) <= MAX_SMALL_SHARDS):
        return planned
    merged = sorted(sha for p in small for sha in p.members)
    return [p for p in planned if len(p.members) >= small_below] + _packed(merged, images_per_shard)


def _packed(members: list[str], images_per_shard: int) -> list[PlannedShard]:
    if not members:
        return []
    return [
        PlannedShard(members[a:b], None) for a, b in plan_shards(len(members), images_per_shard)
    ]


def write_shard(path: str | Path, records: Iterable[ShardRecord]) -> int:
    """Write records to a local TFRecord file; returns how many were written."""

    def b(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    n = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            features = {
                IMAGE_ENCODED: b(r.encoded),
                IMAGE_FORMAT: b(r.image_format.encode()),
                IMAGE_HEIGHT: i(r.height),
                IMAGE_WIDTH: i(r.width),
                LABEL: i(r.label),
                DIAGNOSIS: b(r.diagnosis.encode()),
                SHA256: b(r.sha256.encode()),
                SOURCE_KEY: b(r.source_key.encode()),
            }
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString(deterministic=True))
            n += 1
    return n


def read_shard(path: str | Path) -> Iterator[ShardRecord]:
    """Records of a local TFRecord file, eagerly (for inspection and tests)."""
    spec = feature_spec()
    for raw in tf.data.TFRecordDataset(str(path)):
        ex = tf.io.parse_single_example(raw, spec)
        yield ShardRecord(
            encoded=ex[IMAGE_ENCODED].numpy(),
            image_format=ex[IMAGE_FORMAT].numpy().decode(),
            height=int(ex[IMAGE_HEIGHT]),
            width=int(ex[IMAGE_WIDTH]),
            label=int(ex[LABEL]),
            diagnosis=ex[DIAGNOSIS].numpy().decode(),
            sha256=ex[SHA256].numpy().decode(),
            source_key=ex[SOURCE_KEY].numpy().decode(),
        )


def read_shard_images(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(sha256, encoded image) of each record of a local TFRecord file, without TensorFlow's
    per-record parsing: an incremental prepare copies the images of unchanged files from the
    previous version's shards this way. The caller verifies the file's sha256 first, so the
    per-record CRCs are not checked again."""
    with open(path, "rb") as f:
        while header := f.read(12):  # uint64 length, uint32 CRC of the length
            (length,) = struct.unpack("<Q", header[:8])
            record = f.read(length)
            f.read(4)  # uint32 CRC of the data
            features = tf.train.Example.FromString(record).features.feature
            yield (
                features[SHA256].bytes_list.value[0].decode(),
                features[IMAGE_ENCODED].bytes_list.value[0],
            )
