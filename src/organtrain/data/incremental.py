"""Incremental prepare: what the previous version already knows about the source's files.

A file whose key, size and listing tag (local: modification time in ns; S3: ETag) are the
ones recorded when the previous version read it is not read again: its manifest row gives
its content hash, original size and mode, its size in the shard and its near-duplicate
signature, and its encoded image is copied from the previous version's shard when a new
version is written. A file that failed its check last time keeps its rejection. New and
changed files are read, hashed, checked and decoded as in a cold prepare, and so is every
file when the previous version cannot vouch for them (`--rehash`, another source folder,
other image settings, signatures of another method, a manifest written before these
columns existed). What comes out is the `CheckedImage` a cold prepare computes, so the
splits, the manifest and the shard bytes are the same as a cold prepare's.

An unchanged source is decided from the listing alone: LATEST.json records a digest of the
listing (keys, sizes, tags, groups) and of the settings that made its version. The same
digest means the same version, so nothing is read; a changed or added file changes the
digest. Limits, as for `make` or `rsync`: a file rewritten with the same size inside the
same modification-time tick (or with its mtime set back) is taken as unchanged; run
`organtrain prepare --rehash` after such an edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from organtrain.config import PrepareConfig
from organtrain.data import neardup
from organtrain.data.assign import CheckedImage
from organtrain.data.dataset import (
    FORMAT,
    REJECTED,
    DatasetIndex,
    ShardEntry,
    dataset_prefix,
    shards_root,
)
from organtrain.data.manifest import read_parquet
from organtrain.data.scan import Candidate, Rejection
from organtrain.data.shards import read_shard_images
from organtrain.errors import ChecksumMismatchError, ObjectNotFoundError
from organtrain.storage import Storage, join_key

log = logging.getLogger(__name__)

LISTING_SCHEME = 1  # bump when what the listing digest covers changes

# What a manifest row must hold to stand in for reading its file.
FACT_COLUMNS = ("key", "bytes", "source_tag", "sha256", "width", "height", "mode",
                "encoded_width", "encoded_height", "signature")  # fmt: skip
# Settings that change what reading a file yields (the shard image, hence the signature).
IMAGE_SETTINGS = ("max_image_side", "encoding", "jpeg_quality")


def listing_digest(
    source: Storage,
    candidates: list[Candidate],
    listed_rejections: Iterable[Rejection],
    settings: dict,
) -> str | None:
    """A digest of all a version depends on that the listing shows: each file's key, size,
    tag, group and groups-table metadata, the files the listing itself leaves out, the
    source and the settings. None when a file has no tag (nothing to compare it by)."""
    if any(c.tag is None for c in candidates):
        return None
    content = {
        "scheme": LISTING_SCHEME,
        "format": FORMAT,
        "source": source.uri,
        "settings": settings,
        "files": [(c.key, c.size, c.tag, c.group, c.metadata) for c in candidates],
        "left_out": [(r.key, r.reason, r.detail) for r in listed_rejections],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Facts:
    """What reading one file taught the previous version."""

    bytes: int
    tag: str
    sha256: str
    width: int
    height: int
    mode: str
    encoded_width: int
    encoded_height: int
    signature: bytes


@dataclass(frozen=True)
class KnownFiles:
    """The previous version's facts about the files it read, and where their images are."""

    version: str
    prefix: str  # the folder its shard keys are relative to (the pool, or its own)
    images: dict[str, _Facts]  # source key -> facts
    rejections: dict[str, Rejection]  # source key -> its failed check
    shard_of: dict[str, str]  # sha256 -> the previous shard holding its image
    shards: dict[str, ShardEntry]  # shard key -> its entry (sha256 to verify it by)

    def sort(
        self, candidates: list[Candidate], near_duplicates: bool
    ) -> tuple[list[CheckedImage], list[Rejection], list[Candidate]]:
        """(checked images and rejections known without reading, candidates to read)."""
        checked, rejected, to_read = [], [], []
        for c in candidates:
            facts, rejection = self.images.get(c.key), self.rejections.get(c.key)
            if c.tag is not None and facts and (facts.bytes, facts.tag) == (c.size, c.tag):
                checked.append(_checked(c, facts, near_duplicates))
            elif (
                c.tag is not None
                and rejection
                and (rejection.bytes, rejection.source_tag) == (c.size, c.tag)
            ):
                rejected.append(
                    Rejection(c.key, rejection.reason, rejection.detail, c.organ, c.diagnosis,
                              rejection.bytes, rejection.source_tag)
                )  # fmt: skip
            else:
                to_read.append(c)
        return checked, rejected, to_read

    def copy_images(
        self,
        dest: Storage,
        needed: set[str],
        spool: Path,
        write: Callable[[Path, bytes], None],
        workers: int = 4,
    ) -> set[str]:
        """Write the encoded image of each sha256 in `needed` to spool/<sha256>, from the
        previous version's shards (each verified against its recorded sha256 first); returns
        the ones it could not (not in those shards, or in a missing or damaged one)."""
        wanted: dict[str, set[str]] = defaultdict(set)
        for sha in needed:
            if sha in self.shard_of and self.shard_of[sha] in self.shards:
                wanted[self.shard_of[sha]].add(sha)

        def copy(item: tuple[str, set[str]]) -> set[str]:
            shard, shas = item
            entry = self.shards[shard]
            local = spool / f"previous-{entry.sha256}.tfrecord"
            try:
                dest.download(join_key(self.prefix, shard), local, sha256=entry.sha256)
            except (ChecksumMismatchError, ObjectNotFoundError) as err:
                log.warning("version %s: %s; its images are read from the source (%s)",
                            self.version, shard, err)  # fmt: skip
                return set()
            copied = set()
            try:
                for sha, encoded in read_shard_images(local):
                    if sha in shas and sha not in copied:
                        write(spool / sha, encoded)
                        copied.add(sha)
            finally:
                local.unlink(missing_ok=True)
            return copied

        with ThreadPoolExecutor(max(1, workers)) as pool:
            copied = set().union(*pool.map(copy, sorted(wanted.items())))
        log.info("copied %d image(s) from %d shard(s) of version %s", len(copied), len(wanted),
                 self.version)  # fmt: skip
        return needed - copied


def _checked(c: Candidate, facts: _Facts, near_duplicates: bool) -> CheckedImage:
    return CheckedImage(
        c.key, c.organ, c.diagnosis, facts.sha256, facts.width, facts.height, facts.mode,
        facts.bytes, facts.encoded_width, facts.encoded_height, c.group,
        facts.signature if near_duplicates else b"", c.metadata,
    )  # fmt: skip


def known_files(
    dest: Storage,
    index: DatasetIndex,
    manifest: pa.Table,
    source: Storage,
    cfg: PrepareConfig,
    settings: dict,
) -> KnownFiles | None:
    """What the previous version (`index`, its `manifest`) can vouch for; None, and a log
    line saying why, when every file must be read."""
    why = _why_not_reused(index, manifest, source, cfg, settings)
    if why:
        log.info("reading every file under %s: %s", source.uri, why)
        return None
    columns = manifest.select(FACT_COLUMNS).to_pydict()
    images = {
        key: _Facts(*facts)
        for key, *facts in zip(*(columns[c] for c in FACT_COLUMNS), strict=True)
        if facts[1] is not None  # a row read without a listing tag cannot be matched
    }
    shard_of = dict(zip(manifest.column("sha256").to_pylist(),
                        manifest.column("shard").to_pylist(), strict=True))  # fmt: skip
    return KnownFiles(
        version=index.version,
        prefix=shards_root(index),
        images=images,
        rejections=_failed_checks(dest, dataset_prefix(index.dataset, index.version)),
        shard_of=shard_of,
        shards={s.key: s for s in index.shards},
    )


def _why_not_reused(index, manifest, source, cfg, settings) -> str | None:
    if cfg.rehash:
        return "prepare.rehash (--rehash) is set"
    if index.source != source.uri:
        return f"version {index.version} was prepared from {index.source}"
    for name in IMAGE_SETTINGS:
        if index.settings.get(name) != settings.get(name):
            return (
                f"prepare.{name} is {settings.get(name)!r}, version {index.version} was "
                f"prepared with {index.settings.get(name)!r}"
            )
    method = (index.settings.get("split_rule") or {}).get("signature")
    if cfg.near_duplicates and method != neardup.SIGNATURE_METHOD:
        return (
            f"version {index.version} holds no near-duplicate signatures of the current "
            f"method {neardup.SIGNATURE_METHOD}"
        )
    missing = [c for c in FACT_COLUMNS if c not in manifest.column_names]
    if missing:
        return (
            f"the manifest of version {index.version} has no {', '.join(missing)} column(s) "
            "(written by an earlier organtrain); the next version will have them"
        )
    return None


def _failed_checks(dest: Storage, prefix: str) -> dict[str, Rejection]:
    """The previous version's files that were read and failed their check, by key."""
    try:
        table = read_parquet(dest.get_bytes(join_key(prefix, REJECTED)))
    except ObjectNotFoundError:
        return {}
    if "source_tag" not in table.column_names:
        return {}
    return {
        row["key"]: Rejection(**row)
        for row in table.to_pylist()
        if row["source_tag"] is not None and row["bytes"] is not None
    }
