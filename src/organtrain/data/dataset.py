"""A prepared dataset version in storage, and how to read it back.

Layout under the storage root:

    datasets/<name>/LATEST.json                     which version is current
    datasets/<name>/<version>/dataset.json          the index: organs, classes, shards + sha256
    datasets/<name>/<version>/manifest.parquet      one row per image
    datasets/<name>/<version>/rejected.parquet      one row per file left out, with the reason
    datasets/<name>/<version>/shards/<organ>/<split>-NNNNN-of-MMMMM.tfrecord

dataset.json is written last: a version without it is incomplete and never read. The
version is a hash of the inputs and settings, so unchanged input maps to the same version.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from organtrain.errors import ChecksumMismatchError, DataError, ObjectNotFoundError
from organtrain.storage import Storage, join_key

INDEX = "dataset.json"
LATEST = "LATEST.json"
MANIFEST = "manifest.parquet"
REJECTED = "rejected.parquet"
FORMAT = 2  # bump when the layout or record format changes
# 1: split by each file's hash; 2: groups and near-duplicates share a split, leakage checked.
# The shards and the index fields training reads are the same, so both are readable.
READABLE_FORMATS = (1, 2)


def dataset_prefix(name: str, version: str | None = None) -> str:
    return join_key("datasets", name, version or "")


@dataclass(frozen=True)
class ShardEntry:
    key: str  # relative to the version folder
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
            "never completed; run `organtrain prepare` again"
        ) from None
    if index.format not in READABLE_FORMATS:
        raise DataError(
            f"{storage.url(key)} has format {index.format}, this organtrain reads "
            f"{', '.join(map(str, READABLE_FORMATS))}; "
            "re-run `organtrain prepare` with this version"
        )
    return index


def fetch_shard(storage: Storage, index: DatasetIndex, shard: ShardEntry, path: str | Path) -> Path:
    """Download one shard to `path`, verified against the sha256 recorded in the index."""
    key = join_key(dataset_prefix(index.dataset, index.version), shard.key)
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
