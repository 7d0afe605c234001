"""The node-local shard cache: each shard is downloaded once per node and verified.

Several trials on one node (separate Ray worker processes) often start at the same time
and ask for the same shards. A file lock per shard makes one of them download while the
others wait; the download is verified against the sha256 in the dataset index and then
renamed into place, so no process ever reads a partial or corrupt shard. A cached copy is
verified again on every use: a bad disk or a stray edit is caught, dropped and fetched
anew, and a shard that is corrupt in storage itself is an error that names it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from organtrain.data.dataset import DatasetIndex, ShardEntry, dataset_prefix, repair_advice
from organtrain.errors import ChecksumMismatchError
from organtrain.storage import LocalStorage, Storage, join_key, sha256_file, verify_checksum

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/organtrain/shards"


@dataclass(frozen=True)
class CachedShard:
    path: Path  # a local, verified TFRecord file
    downloaded: bool  # False: it was already on this node (or storage is a local folder)


def cache_root(cache_dir: str | None = None) -> Path:
    """ORGANTRAIN_CACHE_DIR, else `cache_dir`, else ~/.cache/organtrain/shards."""
    chosen = os.environ.get("ORGANTRAIN_CACHE_DIR") or cache_dir or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def local_shard(
    storage: Storage, index: DatasetIndex, shard: ShardEntry, cache_dir: str | None = None
) -> CachedShard:
    """A verified local copy of `shard`, downloading it at most once per node."""
    with repair_advice(storage, index):  # a damaged shard's error says what to run
        return _local_shard(storage, index, shard, cache_dir)


def _local_shard(storage, index, shard, cache_dir) -> CachedShard:
    key = join_key(dataset_prefix(index.dataset, index.version), shard.key)
    if isinstance(storage, LocalStorage):
        # Already a local file: verify it where it is instead of copying it.
        path = storage.path(key)
        verify_checksum(str(path), shard.sha256, sha256_file(path))
        return CachedShard(path, downloaded=False)
    path = cache_root(cache_dir) / index.dataset / index.version / shard.key
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists():
            try:
                verify_checksum(str(path), shard.sha256, sha256_file(path))
                return CachedShard(path, downloaded=False)
            except ChecksumMismatchError:
                log.warning("cached shard %s is corrupt; fetching it again", path)
                path.unlink()
        storage.download(key, path, sha256=shard.sha256)
        return CachedShard(path, downloaded=True)
