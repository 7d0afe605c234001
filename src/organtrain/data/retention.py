"""`organtrain datasets list | gc`: a dataset's versions, and removing the ones not kept.

A version is kept when it is one of the `keep` newest (by the time it was written), the one
LATEST.json names, the dataset version a registered model was trained on (its model card
and champion/challenger comparisons point at it), or the one a running `sweep` or `train`
reads (its run or organ lock is held by a live process, and its plan, sweep.json, or its
organ's checkpoint names the version). Everything else goes: a removed version's
dataset.json first (the version disappears in one step, as it appeared), then the rest of
its folder; a folder without dataset.json (a run that never finished) too; then every pool
object (shard, or a shard's signature table) no kept version lists. A crash part-way
leaves only objects no version lists, which the next gc removes.

gc holds the dataset's lock (`prepare.dataset_lock`) from listing to the last delete: a
`prepare` of the dataset (which publishes pool shards before the dataset.json listing
them) cannot run meanwhile, and a gc started during a `prepare` exits 3 naming it. So
gc never sees a half-written version as garbage.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

from organtrain import registry
from organtrain.data.dataset import (
    INDEX,
    LATEST,
    POOL,
    DatasetIndex,
    dataset_prefix,
    pool_objects,
)
from organtrain.errors import ConfigError, DataError, ObjectNotFoundError
from organtrain.runlocks import RUN_LOCK_STALE_S, RUN_LOCKS
from organtrain.storage import Storage, join_key
from organtrain.storage.lock import StorageLock

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3
# The files naming the dataset version a running `sweep` or `train` reads (search/sweep.py's
# plan, checkpoint.py's state); both import TensorFlow, hence the names here.
SWEEP_PLAN = "sweep.json"
CHECKPOINT_STATE = "checkpoint/state.json"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    index: DatasetIndex | None  # None: incomplete (no dataset.json)
    own_bytes: int  # the objects under its folder (old formats: its shards too)
    latest: bool  # LATEST.json names it
    models: list[str] = field(default_factory=list)  # "organ/model-version" trained on it
    runs: list[str] = field(default_factory=list)  # running sweeps and trains reading it

    @property
    def created_at(self) -> str:
        return self.index.created_at if self.index else ""

    def age_key(self) -> tuple:
        """Sorts oldest first: incomplete folders, then by the time dataset.json records
        (seconds before, milliseconds since the pool format)."""
        if self.index is None:
            return (0, datetime.min.replace(tzinfo=timezone.utc), self.version)
        return (1, datetime.fromisoformat(self.index.created_at), self.version)


@dataclass(frozen=True)
class GcResult:
    dataset: str
    kept: dict[str, str]  # version -> why it is kept
    removed: list[str]  # versions (and incomplete folders) removed
    shards_removed: list[str]  # pool keys
    bytes_freed: int
    dry_run: bool


def dataset_versions(storage: Storage, dataset: str) -> list[VersionInfo]:
    """Every version folder of `dataset`, newest first (incomplete ones last), with the
    registered models trained on each. One listing of the dataset's folder."""
    root = dataset_prefix(dataset)
    sizes: dict[str, int] = defaultdict(int)
    for info in storage.list(root):
        part = info.key.removeprefix(root + "/").split("/")
        if len(part) > 1 and part[0] != POOL:
            sizes[part[0]] += info.size
    if not sizes:
        raise DataError(f"no dataset {dataset!r} in {storage.uri}: nothing to list")
    latest = _latest(storage, dataset)
    models = _models_by_version(storage, dataset)
    running = _runs_by_version(storage)
    found = []
    for version, size in sizes.items():
        try:
            index = DatasetIndex.from_json(storage.get_bytes(join_key(root, version, INDEX)))
        except ObjectNotFoundError:
            index = None
        found.append(VersionInfo(version, index, size, version == latest, models[version],
                                 running[version]))  # fmt: skip
    return sorted(found, key=VersionInfo.age_key, reverse=True)


def gc(storage: Storage, dataset: str, *, keep: int = DEFAULT_KEEP, dry_run: bool = False):
    """Remove the versions of `dataset` that are not kept, and the pool shards no kept
    version lists (see the module's docstring); `dry_run` says what would go."""
    from organtrain.data.prepare import dataset_lock

    if keep < 1:
        raise ConfigError(f"--keep {keep}: keep at least the newest version (--keep 1)")
    next(iter(storage.list(dataset_prefix(dataset))), None)  # bad credentials fail here
    with dataset_lock(storage, dataset):
        versions = dataset_versions(storage, dataset)
        kept = kept_versions(versions, keep)
        gone = [v for v in versions if v.version not in kept]
        listed = set().union(
            *(pool_objects(v.index) for v in versions if v.version in kept and v.index)
        )
        pool = [i for i in storage.list(join_key(dataset_prefix(dataset), POOL))
                if i.key not in listed]  # fmt: skip
        result = GcResult(
            dataset, kept, [v.version for v in gone], [i.key for i in pool],
            sum(v.own_bytes for v in gone) + sum(i.size for i in pool), dry_run,
        )  # fmt: skip
        if not dry_run:
            for version in gone:
                _remove_version(storage, dataset, version.version)
            for info in pool:
                storage.delete(info.key)
            log.info("dataset %s: removed %d version(s) and %d pool shard(s), %d bytes",
                     dataset, len(gone), len(pool), result.bytes_freed)  # fmt: skip
    return result


def kept_versions(versions: list[VersionInfo], keep: int) -> dict[str, str]:
    """version -> why it stays."""
    why: dict[str, list[str]] = defaultdict(list)
    complete = [v for v in versions if v.index is not None]  # newest first
    for v in complete[:keep]:
        why[v.version].append(f"one of the {keep} newest")
    for v in versions:
        if v.latest:
            why[v.version].append("LATEST.json names it")
        if v.models:
            why[v.version].append("models trained on it: " + ", ".join(v.models))
        if v.runs:
            why[v.version].append("read by running " + ", ".join(v.runs))
    return {version: "; ".join(reasons) for version, reasons in why.items()}


def _remove_version(storage: Storage, dataset: str, version: str) -> None:
    """dataset.json first: from then on the version is incomplete, never read, and a crash
    leaves a folder the next gc removes."""
    prefix = dataset_prefix(dataset, version)
    storage.delete(join_key(prefix, INDEX))
    for info in list(storage.list(prefix)):
        storage.delete(info.key)


def _latest(storage: Storage, dataset: str) -> str | None:
    try:
        return json.loads(storage.get_bytes(join_key(dataset_prefix(dataset), LATEST)))["version"]
    except ObjectNotFoundError:
        return None


def _models_by_version(storage: Storage, dataset: str) -> dict[str, list[str]]:
    """dataset version -> the registered model versions trained on it."""
    found: dict[str, list[str]] = defaultdict(list)
    for organ in registry.organs(storage):
        for model in registry.versions(storage, organ):
            if model.dataset == dataset:
                found[model.dataset_version].append(f"{organ}/{model.version}")
    return found


def _runs_by_version(storage: Storage) -> dict[str, list[str]]:
    """dataset version -> the runs reading it now: each run or organ lock a live process
    holds, with the version its sweep plan or its organ's checkpoint names. (A `train`
    that has not written its first checkpoint reads the version LATEST.json named when it
    started, which gc keeps while it is the newest.)"""
    found: dict[str, list[str]] = defaultdict(list)
    for info in storage.list(RUN_LOCKS):
        held = info.key.removeprefix(RUN_LOCKS + "/").removesuffix(".json")
        run_id, _, organ = held.partition("/")
        lock = StorageLock(storage, info.key, what=held, stale_after=RUN_LOCK_STALE_S)
        if lock.live_holder() is None:
            continue
        named = join_key("runs", run_id, organ, CHECKPOINT_STATE) if organ else None
        for key in filter(None, [join_key("runs", run_id, SWEEP_PLAN), named]):
            try:
                version = json.loads(storage.get_bytes(key)).get("dataset_version")
            except (ObjectNotFoundError, ValueError):
                continue
            if version and f"run {run_id}" not in found[version]:
                found[version].append(f"run {run_id}")
    return found
