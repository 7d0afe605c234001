"""One storage interface over a local folder (the default) and s3:// (boto3)."""

from __future__ import annotations

from pathlib import Path

from organtrain.errors import StorageError
from organtrain.storage.base import (
    ObjectInfo,
    Storage,
    sha256_bytes,
    sha256_file,
    verify_checksum,
)
from organtrain.storage.keys import join_key, key_part_problem, validate_key
from organtrain.storage.local import LocalStorage
from organtrain.storage.s3 import S3Storage, parse_s3_uri

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "S3Storage",
    "Storage",
    "join_key",
    "key_part_problem",
    "open_storage",
    "reopen_args",
    "sha256_bytes",
    "sha256_file",
    "validate_key",
    "verify_checksum",
]


def open_storage(
    uri: str | Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    setting: str = "storage.uri",
) -> Storage:
    """Storage for `uri`: `s3://bucket/prefix`, `file:///path` or a plain local path.
    `setting` is the config field `uri` came from, named when its bucket is missing."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_uri(text)
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url, region=region, setting=setting)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise StorageError(
            f"{text!r}: unsupported storage scheme; use a local path or s3://bucket/prefix"
        )
    return LocalStorage(text)


def reopen_args(storage: Storage) -> dict:
    """The arguments of open_storage that open `storage` again on another node (a Ray
    task): a boto3 client does not pickle, and credentials must come from each node's own
    chain, never travel with the task."""
    client = getattr(storage, "client", None)
    if client is None:
        return {"uri": storage.uri}
    return {
        "uri": storage.uri,
        "endpoint_url": client.meta.endpoint_url,
        "region": client.meta.region_name,
    }
