"""A prepared dataset version in storage, and how to read it back.

Layout under the storage root:

    datasets/<name>/LATEST.json                     which version is current
    datasets/<name>/shards/<organ>/<split>-<sha256>.tfrecord
                                                    the shard pool, shared by the versions
    datasets/<name>/shards/<organ>/<split>-<sha256>.sig-<method>.parquet
                                                    its images' near-duplicate signatures
    datasets/<name>/<version>/dataset.json          the index: organs, classes, shards + sha256
    datasets/<name>/<version>/manifest.parquet      one row per image
    datasets/<name>/<version>/rejected.parquet      one row per file left out, with the reason

A shard in the pool is named by the sha256 of its bytes, so it never changes once written,
and a version lists the shards that make each organ's split (format 3): versions that share
images share shards instead of owning copies. Versions of formats 1 and 2 own their shards,
at datasets/<name>/<version>/shards/<organ>/<split>-NNNNN-of-MMMMM.tfrecord, and stay
readable. Shards are published before the dataset.json that lists them: dataset.json is
written last, a version without it is incomplete and never read, and a pool shard no
version lists is left over from a run that did not finish (`organtrain datasets gc`
removes it). The near-duplicate signatures (about 2 kB an image, a quarter of what a
64-px image takes in a shard) are kept beside each pool shard instead of in every
version's manifest, so a version's own tables stay small; read_manifest joins them back.
The version is a hash of the inputs and settings, so unchanged input maps to the same version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from organtrain.errors import ChecksumMismatchError, DataError, ObjectNotFoundError
from organtrain.storage import Storage, join_key

log = logging.getLogger(__name__)

INDEX = "dataset.json"
LATEST = "LATEST.json"
MANIFEST = "manifest.parquet"
REJECTED = "rejected.parquet"
FORMAT = 3  # bump when the layout or record format changes
# 1: split by each file's hash; 2: groups and near-duplicates share a split, leakage checked;
# 3: shards in the dataset's pool, keys relative to the dataset's folder. The records and
# the index fields training reads are the same, so all are readable.
READABLE_FORMATS = (1, 2, 3)
POOL_FORMAT = 3  # from this format on, a version's shards live in the pool
POOL = "shards"  # the pool's folder under datasets/<name>/


def dataset_prefix(name: str, version: str | None = None) -> str:
    return join_key("datasets", name, version or "")


@dataclass(frozen=True)
class ShardEntry:
    # Format 3: relative to the dataset's folder (shards/<organ>/<split>-<sha256>.tfrecord,
    # in the pool); formats 1 and 2: relative to the version's folder. shard_object_key
    # gives the storage key either way.
    key: str
    organ: str
    split: str
    images: int
    bytes: int
    sha256: str


@dataclass
class OrganIndex:
    diagnoses: list[str]  # label i is diagnoses[i]
    counts: dict[str, dict[str, int]]  # split -> diagnosis -> images in the shards
    # split -> diagnosis -> patient/slide groups (or, for ungrouped images, split units):
    # a test split with a handful of groups measures a handful of patients.
    groups: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class DatasetIndex:
    dataset: str
    version: str
    created_at: str
    source: str
    settings: dict
    organs: dict[str, OrganIndex]
    shards: list[ShardEntry]
    excluded: list[dict] = field(default_factory=list)  # organs/diagnoses left out, and why
    images: int = 0
    rejected: int = 0
    format: int = FORMAT
    leakage: dict | None = None  # the leakage check's figures (leakage.py), per organ
    split_changes: dict | None = None  # images that changed split since the previous version

    def diagnoses(self, organ: str) -> list[str]:
        """The organ's classes: label i is diagnoses(organ)[i]."""
        if organ not in self.organs:
            raise DataError(
                f"dataset {self.dataset} version {self.version} has no organ {organ!r}; "
                f"it has: {', '.join(sorted(self.organs))}"
            )
        return self.organs[organ].diagnoses

    def split_size(self, organ: str, split: str) -> int:
        """Images in the organ's shards for `split` (each distinct image once)."""
        return sum(s.images for s in self.shards_for(organ, split))

    def shards_for(self, organ: str, split: str) -> list[ShardEntry]:
        self.diagnoses(organ)  # a clear error for an unknown organ
        return [s for s in self.shards if s.organ == organ and s.split == split]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DatasetIndex:
        raw = json.loads(data)
        raw["organs"] = {k: OrganIndex(**v) for k, v in raw["organs"].items()}
        raw["shards"] = [ShardEntry(**s) for s in raw["shards"]]
        return cls(**raw)


def load_dataset(storage: Storage, name: str, version: str | None = None) -> DatasetIndex:
    """The index of dataset `name` (its latest version unless one is named)."""
    if version is None:
        try:
            version = json.loads(storage.get_bytes(join_key(dataset_prefix(name), LATEST)))[
                "version"
            ]
        except ObjectNotFoundError:
            raise DataError(
                f"no dataset {name!r} in {storage.uri}: run `organtrain prepare` first"
            ) from None
    key = join_key(dataset_prefix(name, version), INDEX)
    try:
        index = DatasetIndex.from_json(storage.get_bytes(key))
    except ObjectNotFoundError:
        raise DataError(
            f"{storage.url(key)} does not exist: version {version} of dataset {name!r} was "
            "never completed (or `organtrain datasets gc` removed it); run `organtrain "
            "prepare` again"
        ) from None
    if index.format not in READABLE_FORMATS:
        raise DataError(
            f"{storage.url(key)} has format {index.format}, this organtrain reads "
            f"{', '.join(map(str, READABLE_FORMATS))}; "
            "re-run `organtrain prepare` with this version"
        )
    return index


def shards_root(index: DatasetIndex) -> str:
    """The folder a version's shard keys are relative to: the dataset's (its pool) from
    format 3 on, the version's own before."""
    if index.format >= POOL_FORMAT:
        return dataset_prefix(index.dataset)
    return dataset_prefix(index.dataset, index.version)


def shard_object_key(index: DatasetIndex, shard: ShardEntry) -> str:
    """The storage key of one of a version's shards."""
    return join_key(shards_root(index), shard.key)


def signature_method(index: DatasetIndex) -> str | None:
    """The near-duplicate signature method of a version's images; None: not computed."""
    return (index.settings.get("split_rule") or {}).get("signature")


def signatures_key(shard_key: str, method: str) -> str:
    """The pool key of the signatures of a pool shard's images: named by the shard (its
    images) and the method (a hash: method names hold characters keys had better not)."""
    tag = hashlib.sha256(method.encode()).hexdigest()[:12]
    return f"{shard_key.removesuffix('.tfrecord')}.sig-{tag}.parquet"


def pool_objects(index: DatasetIndex) -> set[str]:
    """The storage keys of the pool objects a version needs: its shards and, where it kept
    signatures, their signature tables. Empty for a version that owns its shards."""
    if index.format < POOL_FORMAT:
        return set()
    method = signature_method(index)
    keys = {shard_object_key(index, s) for s in index.shards}
    if method:
        keys |= {join_key(shards_root(index), signatures_key(s.key, method)) for s in index.shards}
    return keys


def read_manifest(storage: Storage, index: DatasetIndex):
    """A version's manifest table, with its `signature` column. From format 3 on the
    signatures are read from the pool, one small table per shard; when one is missing or
    unreadable the table comes without the column (readers then compute or re-read the
    signatures, as for a version of format 1), and a warning names it."""
    from organtrain.data.manifest import MANIFEST_SCHEMA, read_parquet

    key = join_key(dataset_prefix(index.dataset, index.version), MANIFEST)
    table = read_parquet(storage.get_bytes(key))
    if "signature" in table.column_names or index.format < POOL_FORMAT:
        return table
    method = signature_method(index)

    def shard_signatures(shard: ShardEntry) -> dict[tuple[str, str], bytes] | None:
        sidecar = join_key(shards_root(index), signatures_key(shard.key, method))
        try:
            held = read_parquet(storage.get_bytes(sidecar)).to_pydict()
        except (ObjectNotFoundError, ChecksumMismatchError, OSError, ValueError) as err:
            log.warning("the signatures of %s cannot be read (%s): version %s is read "
                        "without signatures", shard.key, err, index.version)  # fmt: skip
            return None
        return {(shard.organ, sha): sig
                for sha, sig in zip(held["sha256"], held["signature"], strict=True)}  # fmt: skip

    signatures: dict[tuple[str, str], bytes] = {}
    with ThreadPoolExecutor(8) as threads:  # one small GET per shard: latency-bound on S3
        for held in threads.map(shard_signatures, index.shards if method else []):
            if held is None:
                return table
            signatures.update(held)
    column = [
        signatures.get((organ, sha), b"")
        for organ, sha in zip(
            table.column("organ").to_pylist(), table.column("sha256").to_pylist(), strict=True
        )
    ]
    position = MANIFEST_SCHEMA.get_field_index("signature")
    return table.add_column(min(position, table.num_columns), MANIFEST_SCHEMA.field(position),
                            [column])  # fmt: skip


def fetch_shard(storage: Storage, index: DatasetIndex, shard: ShardEntry, path: str | Path) -> Path:
    """Download one shard to `path`, verified against the sha256 recorded in the index."""
    key = shard_object_key(index, shard)
    with repair_advice(storage, index):
        storage.download(key, path, sha256=shard.sha256)
    return Path(path)


def repair_command(storage: Storage, index: DatasetIndex) -> str:
    """The command that rewrites a version's missing or damaged shards from its source."""
    return (
        f"organtrain prepare {index.source} --dest {storage.uri} --dataset {index.dataset} "
        f"--version {index.version} --repair"
    )


@contextlib.contextmanager
def repair_advice(storage: Storage, index: DatasetIndex) -> Iterator[None]:
    """Re-raise a shard's checksum mismatch with the command that repairs it: deleting the
    shard and re-running plain `prepare` would not, since the version exists already."""
    try:
        yield
    except ChecksumMismatchError as err:
        if not hasattr(err, "expected"):
            raise
        raise ChecksumMismatchError(
            f"checksum mismatch for {err.url}: expected sha256 {err.expected[:16]}…, got "
            f"{err.actual[:16]}…. The shard of dataset {index.dataset} version {index.version} "
            "was damaged or changed after it was written; rewrite it from the source images "
            f"with `{repair_command(storage, index)}` (plus the original prepare's --config, "
            "for its storage settings)"
        ) from None
