"""The manifest and rejected tables: their schemas and Parquet encoding."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from organtrain.data.scan import Rejection


@dataclass(frozen=True)
class ImageRow:
    """One row of manifest.parquet: one source image that is part of the dataset."""

    key: str  # relative to the source root
    organ: str
    diagnosis: str
    label: int  # index into the organ's sorted diagnoses
    sha256: str  # of the source file's bytes
    width: int  # of the source image
    height: int
    mode: str  # Pillow mode of the source image
    bytes: int  # size of the source file
    split: str  # train | val | test
    duplicate_of: str | None  # key of the identical image whose record is in the shards
    shard: str  # the shard key holding this image's record
    group: str | None  # patient/slide/specimen (group folder or groups table)
    unit: str  # key of the split unit (group, near-duplicate cluster, image) it shares a split with
    neardup_cluster: str | None  # its near-duplicate cluster; None when it has no near copy
    signature: bytes  # near-duplicate signature (neardup.py), compared without the image
    metadata: str | None  # the groups table's other columns for this image, JSON
    # What an incremental prepare (incremental.py) needs to reuse this row without reading
    # the file: the size of the image in the shard, and the listing's tag (local mtime in ns,
    # S3 ETag) when the file was read. Manifests written before these existed lack them:
    # their files are read again once.
    encoded_width: int
    encoded_height: int
    source_tag: str | None


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("organ", pa.string()),
        ("diagnosis", pa.string()),
        ("label", pa.int32()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("bytes", pa.int64()),
        ("split", pa.string()),
        ("duplicate_of", pa.string()),
        ("shard", pa.string()),
        ("group", pa.string()),
        ("unit", pa.string()),
        ("neardup_cluster", pa.string()),
        ("signature", pa.binary()),
        ("metadata", pa.string()),
        ("encoded_width", pa.int32()),
        ("encoded_height", pa.int32()),
        ("source_tag", pa.string()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("organ", pa.string()),
        ("diagnosis", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("bytes", pa.int64()),  # with source_tag: set for files that failed their check
        ("source_tag", pa.string()),
    ]
)


def manifest_table(rows: Sequence[ImageRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=MANIFEST_SCHEMA)


def rejected_table(rows: Sequence[Rejection]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=REJECTED_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_parquet(data: bytes) -> pa.Table:
    # Decode from an Arrow-owned copy, not from the Python bytes: pyarrow's thread-pool
    # tasks can drop their last reference to the input after read_table has returned, and
    # releasing a Python buffer needs the GIL; at interpreter exit that killed the process
    # ("terminate called without an active exception", exit 134; tests/test_status.py).
    copy = pa.BufferOutputStream()
    copy.write(data)
    return pq.read_table(pa.BufferReader(copy.getvalue()))
