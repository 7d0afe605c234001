"""`organtrain prepare`: image tree → manifest, split and checksummed TFRecord shards.

Stages, each safe to interrupt:
1. list the source (and the groups table) into candidate images; when the listing (keys,
   sizes, modification times or ETags, groups) and the settings are those the latest
   version was prepared from, that version is the answer and no image is read
   (incremental.py);
2. read the previous version's splits, so no existing image changes split, and what it
   learnt from each file, so unchanged files are not read again (`--rehash` reads all);
3. decode every new or changed image once, with its near-duplicate signature (bad files go
   to rejected.parquet);
4. group and split (assign.py): groups, copies and near-duplicates share a split;
5. name the version by hashing inputs, splits and settings; if it exists, check that its
   shards are all there and rewrite any that are not (from the source), then stop;
6. plan the shards: the previous version's shards whose records are unchanged are listed
   again, the other images go into new shards (shards.plan_split); write the new ones into
   the dataset's pool, named by their sha256 (one already there is not uploaded again),
   with their images' signatures beside them, and the tables; check for leakage
   independently (leakage.py) and refuse to publish a leak, then write dataset.json — the
   step that makes the version visible — then LATEST.json. A failure before dataset.json
   (a full disk) deletes what this run wrote; a killed run leaves its shards for the next
   run to reuse (or `organtrain datasets gc` to remove).

The whole run holds the dataset's lock (`datasets/<name>/prepare.lock`): a second
`prepare` of the same dataset, on this machine or another, exits 3 naming the holder.
`repair` (`organtrain prepare --repair`) re-verifies a published version's shards and
rewrites the damaged ones from the source; shard bytes are deterministic, so a rewritten
shard must match the checksum recorded when the version was published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from organtrain.config import PrepareConfig
from organtrain.data import incremental, neardup, work
from organtrain.data.assign import Assigned, CheckedImage, PreviousSplits, assign
from organtrain.data.dataset import (
    FORMAT,
    INDEX,
    LATEST,
    MANIFEST,
    POOL,
    POOL_FORMAT,
    REJECTED,
    DatasetIndex,
    OrganIndex,
    ShardEntry,
    dataset_prefix,
    load_dataset,
    read_manifest,
    shard_object_key,
    shards_root,
    signatures_key,
)
from organtrain.data.executors import RayTasks, Reachable, Threads
from organtrain.data.groups import apply_group_table, load_group_table
from organtrain.data.images import normalise_image
from organtrain.data.incremental import KnownFiles
from organtrain.data.leakage import LeakageReport, check_leakage
from organtrain.data.manifest import (
    ImageRow,
    manifest_table,
    read_parquet,
    rejected_table,
)
from organtrain.data.scan import Candidate, Rejection, scan_tree
from organtrain.data.shards import (
    ExistingShard,
    ShardRecord,
    plan_split,
    write_shard,
)
from organtrain.errors import ChecksumMismatchError, DataError, ObjectNotFoundError
from organtrain.storage import LocalStorage, Storage, join_key, sha256_bytes, sha256_file
from organtrain.storage.lock import LockHeld, StorageLock

log = logging.getLogger(__name__)

SIGNATURES_SCHEMA = pa.schema([("sha256", pa.string()), ("signature", pa.binary())])
LOCK = "prepare.lock"  # under datasets/<name>/, beside LATEST.json
# A holder refreshes its lock every 30 s; one silent this long has died (another host).
LOCK_STALE_AFTER_S = 600


class DatasetLocked(LockHeld):
    """Another `prepare` of this dataset is running; exit code 3 ("not now")."""


def dataset_lock(dest: Storage, dataset: str) -> StorageLock:
    """One writer per dataset: `prepare`, `prepare --repair` and the nightly's prepare."""
    return StorageLock(
        dest,
        join_key(dataset_prefix(dataset), LOCK),
        what=f"dataset {dataset} in {dest.uri}",
        stale_after=LOCK_STALE_AFTER_S,
        error=DatasetLocked,
    )


@dataclass(frozen=True)
class PrepareResult:
    dataset: str
    version: str
    uri: str  # where the version lives
    created: bool  # False: this exact version already existed, nothing was written
    images: int
    rejected: int
    rejected_reasons: dict[str, int]  # reason code -> files
    organs: dict[str, list[str]]
    excluded: list[dict]
    split_changes: dict | None = None  # set when images changed split since the last version
    # Shards of an existing version that were missing (or of the wrong size) and were
    # rewritten from the source by this run.
    repaired: list[str] = field(default_factory=list)
    # With --address: the Ray tasks (checking a batch, writing a shard) each node ran, by
    # Ray node id; empty when the work ran in this process's threads.
    tasks_per_node: dict[str, int] = field(default_factory=dict)


Executor = Threads | RayTasks


@dataclass(frozen=True)
class RepairResult:
    dataset: str
    version: str
    uri: str
    shards: int  # verified
    rewritten: list[str]  # shard keys rewritten from the source


@dataclass(frozen=True)
class Previous:
    """The version this one follows: its splits, and whether they may be inherited."""

    version: str
    splits: PreviousSplits
    same_rule: bool  # split by the same rule: inherit its splits
    rule: dict | None
    index: DatasetIndex
    manifest: pa.Table


@dataclass(frozen=True)
class Listing:
    """The source as listed: candidate images, files left out, and the listing's digest."""

    candidates: list[Candidate]
    rejected: list[Rejection]
    digest: str | None  # incremental.listing_digest


def prepare(
    source: Storage,
    dest: Storage,
    cfg: PrepareConfig,
    *,
    progress: bool = True,
    executor: Executor | None = None,
) -> PrepareResult:
    """`executor`: where checking images and writing shards run (executors.py): this
    process's prepare.workers threads by default, or RayTasks on the cluster this process
    is connected to. This process lists, splits, checks for leakage and publishes either
    way, under the dataset's lock; the result is the same."""
    executor = executor or Threads(cfg.workers)
    # Touch the destination first: a missing bucket or bad credentials should fail now,
    # not after every image has been decoded.
    next(iter(dest.list(dataset_prefix(cfg.dataset))), None)
    with dataset_lock(dest, cfg.dataset):
        result = _prepare_locked(source, dest, cfg, progress, executor)
    return dataclasses.replace(result, tasks_per_node=dict(executor.nodes))


def _prepare_locked(source: Storage, dest: Storage, cfg: PrepareConfig, progress: bool,
                    executor: Executor):  # fmt: skip
    listing = _list_source(source, cfg)
    unchanged = None if cfg.rehash else _unchanged_version(dest, cfg, listing.digest)
    if unchanged is not None:
        result = _confirm_unchanged(source, dest, cfg, unchanged)
        _point_latest(dest, cfg.dataset, result, listing.digest)
        return result
    rejected = listing.rejected
    previous = _previous(dest, cfg)
    known = (
        incremental.known_files(dest, previous.index, previous.manifest, source, cfg,
                                _settings(cfg))
        if previous else None
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="organtrain-prepare-") as spool:
        checked, bad = _checked_images(source, listing.candidates, known, cfg, Path(spool),
                                       progress, executor)  # fmt: skip
        assignment = assign(
            checked,
            test_fraction=cfg.test_fraction,
            val_fraction=cfg.val_fraction,
            min_images_per_diagnosis=cfg.min_images_per_diagnosis,
            find_pairs=neardup.near_duplicate_pairs if cfg.near_duplicates else None,
            previous=previous.splits if previous and previous.same_rule else None,
        )
        rejected = sorted(rejected + bad + assignment.rejected, key=lambda r: r.key)
        for item in assignment.excluded:
            log.warning("left out: %s", item["reason"])
        if not assignment.organs:
            raise DataError(
                f"no organ under {source.uri} has two diagnoses with enough images; "
                "see the messages above"
            )
        changes = _split_changes(previous, assignment, cfg)
        version = _version(assignment.rows, rejected, cfg)
        prefix = dataset_prefix(cfg.dataset, version)
        result = PrepareResult(
            dataset=cfg.dataset,
            version=version,
            uri=dest.url(prefix),
            created=not dest.exists(join_key(prefix, INDEX)),
            images=len(assignment.rows),
            rejected=len(rejected),
            rejected_reasons=dict(Counter(r.reason for r in rejected)),
            organs=assignment.organs,
            excluded=assignment.excluded,
            split_changes=changes,
        )
        if result.created:
            job = _Publishing(source, dest, cfg, version, Path(spool), progress, known,
                              {c.key: c.tag for c in listing.candidates}, executor)  # fmt: skip
            _publish(job, assignment, rejected, changes, previous)
        else:
            repaired = _repair_missing_shards(source, dest, cfg.dataset, version, Path(spool))
            result = dataclasses.replace(result, repaired=repaired)
            if not repaired:
                log.info(
                    "dataset %s version %s is already prepared; nothing new written",
                    cfg.dataset,
                    version,
                )
    _point_latest(dest, cfg.dataset, result, listing.digest)
    return result


def _unchanged_version(dest: Storage, cfg: PrepareConfig, digest: str | None):
    """The latest version and its rejected table, when the source's listing and the
    settings are the ones it was prepared from; else None. Reads no image."""
    if digest is None:
        return None
    pointer = _latest_pointer(dest, cfg.dataset)
    if pointer is None or pointer.get("listing") != digest:
        return None
    try:
        index = load_dataset(dest, cfg.dataset, pointer["version"])
        prefix = dataset_prefix(cfg.dataset, index.version)
        rejected = read_parquet(dest.get_bytes(join_key(prefix, REJECTED)))
    except (DataError, ObjectNotFoundError):
        return None  # an incomplete version: prepare it the long way
    return index, rejected


def _confirm_unchanged(source: Storage, dest: Storage, cfg: PrepareConfig, unchanged):
    """The result of a prepare whose listing is the latest version's: that version, with any
    missing shard rewritten (as when a full prepare finds its version already there)."""
    index, rejected = unchanged
    for item in index.excluded:
        log.warning("left out: %s", item["reason"])
    with tempfile.TemporaryDirectory(prefix="organtrain-prepare-") as spool:
        repaired = _repair_missing_shards(source, dest, cfg.dataset, index.version, Path(spool))
    if not repaired:
        log.info("dataset %s version %s: the source is listed as it was prepared (same files, "
                 "sizes and modification times/ETags); nothing read or written",
                 cfg.dataset, index.version)  # fmt: skip
    return PrepareResult(
        dataset=cfg.dataset,
        version=index.version,
        uri=dest.url(dataset_prefix(cfg.dataset, index.version)),
        created=False,
        images=index.images,
        rejected=rejected.num_rows,
        rejected_reasons=dict(Counter(rejected.column("reason").to_pylist())),
        organs={organ: o.diagnoses for organ, o in sorted(index.organs.items())},
        excluded=index.excluded,
        repaired=repaired,
    )


def _list_source(source: Storage, cfg: PrepareConfig) -> Listing:
    if isinstance(source, LocalStorage) and not source.root.is_dir():
        what = "is not a folder" if source.root.exists() else "does not exist"
        raise DataError(
            f"the source folder {source.uri} {what}: set prepare.source (or the SOURCE "
            "argument of `organtrain prepare`) to the folder that holds "
            "<organ>/<diagnosis>/<image>"
        )
    candidates, rejected = scan_tree(source)
    if not candidates:
        raise DataError(
            f"no images found under {source.uri}: expected <organ>/<diagnosis>/<image> or "
            "<organ>/<diagnosis>/<group>/<image> with extensions png, jpg, jpeg, tif, tiff or "
            f"bmp ({len(rejected)} other file(s) seen)"
        )
    log.info("found %d candidate images under %s", len(candidates), source.uri)
    if cfg.groups_table:
        table = load_group_table(cfg.groups_table)
        candidates, unmatched = apply_group_table(candidates, table)
        grouped = sum(c.key in table.groups for c in candidates)
        log.info("groups table %s: %d image(s) grouped", cfg.groups_table, grouped)
        if unmatched:
            log.warning(
                "groups table %s names %d key(s) that match no image, e.g. %s",
                cfg.groups_table,
                len(unmatched),
                ", ".join(unmatched[:3]),
            )
    digest = incremental.listing_digest(source, candidates, rejected, _settings(cfg))
    return Listing(candidates, rejected, digest)


def split_rule(cfg: PrepareConfig) -> dict:
    """What decides an image's split; a version split by another rule is not inherited."""
    return {
        "test_fraction": cfg.test_fraction,
        "val_fraction": cfg.val_fraction,
        "units": "groups+near-duplicates" if cfg.near_duplicates else "groups",
        "signature": neardup.SIGNATURE_METHOD if cfg.near_duplicates else None,
    }


def _previous(dest: Storage, cfg: PrepareConfig) -> Previous | None:
    try:
        index = load_dataset(dest, cfg.dataset)
    except DataError:
        return None  # no version yet (or the last one never completed: nothing to keep)
    try:
        manifest = read_manifest(dest, index)  # with the signatures, from the pool
    except ObjectNotFoundError:
        return None
    columns = manifest.select(["organ", "sha256", "split"]).to_pydict()
    splits = dict(
        zip(zip(columns["organ"], columns["sha256"], strict=True), columns["split"], strict=True)
    )
    rule = index.settings.get("split_rule")
    return Previous(index.version, splits, rule == split_rule(cfg), rule, index, manifest)


def _split_changes(previous: Previous | None, assignment, cfg: PrepareConfig) -> dict | None:
    """How many of the previous version's images change split in this one, and why: a new
    split rule, or groups that now join images it had in different splits. Said once: the
    next version inherits this one's splits."""
    if previous is None:
        return None
    both = [r for r in assignment.rows if (r.image.organ, r.image.sha256) in previous.splits]
    moved = [r for r in both if previous.splits[(r.image.organ, r.image.sha256)] != r.split]
    if previous.same_rule and not moved:
        return None
    if previous.same_rule:
        reason = "groups changed: they now join images that were in different splits"
    else:
        reason = "the split rule changed: " + _rule_change(previous.rule, split_rule(cfg))
    log.warning(
        "%d of the %d image(s) of version %s change split in this version (%s), e.g. %s. "
        "Test metrics of models trained on %s are not comparable with this version's.",
        len(moved),
        len(both),
        previous.version,
        reason,
        ", ".join(r.image.key for r in moved[:3]),
        previous.version,
    )
    return {"from_version": previous.version, "images": len(moved), "of": len(both),
            "reason": reason}  # fmt: skip


def _rule_change(old: dict | None, new: dict) -> str:
    if old is None:
        return (
            "it split each file by its own content hash; this version keeps patient/slide "
            "groups and near-duplicate clusters in one split"
        )
    changed = [f"{k} {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(changed)


def _checked_images(source, candidates, known: KnownFiles | None, cfg, spool, progress,
                    executor):  # fmt: skip
    """Every candidate checked, in key order: from what the previous version learnt about
    its file when the file is unchanged, else by reading it (_check_images)."""
    if known is None:
        return _check_images(source, candidates, cfg, spool, progress, executor)
    reused, reused_bad, to_read = known.sort(candidates, cfg.near_duplicates)
    log.info(
        "%d of %d file(s) unchanged since version %s: not read again; reading %d",
        len(reused) + len(reused_bad), len(candidates), known.version, len(to_read),
    )  # fmt: skip
    checked, bad = _check_images(source, to_read, cfg, spool, progress, executor)
    # Key order, as a cold prepare lists them, so what follows cannot tell the difference.
    checked = sorted(checked + reused, key=lambda c: c.key)
    return checked, sorted(bad + reused_bad, key=lambda r: r.key)


def _check_images(source, candidates, cfg, spool: Path, progress: bool, executor: Executor):
    """Read, hash, decode and re-encode every candidate, in batches (work.check_batch) on
    the executor: threads here, or Ray tasks on a cluster's nodes.

    The re-encoded image is kept in the local spool (named by content hash) so the
    source is read only once even when it is in object storage.
    """
    batches = work.batches(candidates, executor.cpus())
    outcomes: list[list] = [[] for _ in batches]
    with tqdm(total=len(candidates), desc="checking images", unit="img",
              disable=not progress) as bar:  # fmt: skip

        def collect(i: int, results: list) -> None:
            for outcome in results:
                if isinstance(outcome, work.Checked):
                    _spool_write(spool / outcome.image.sha256, outcome.encoded)
            outcomes[i] = [o.image if isinstance(o, work.Checked) else o for o in results]
            bar.update(len(results))

        executor.run(work.check_batch, (Reachable(source, "source"), cfg), batches, collect)
    checked, rejected = [], []
    for outcome in (o for batch in outcomes for o in batch):  # in the candidates' order
        (checked if isinstance(outcome, CheckedImage) else rejected).append(outcome)
    log.info("%d images decoded cleanly, %d rejected", len(checked), len(rejected))
    return checked, rejected


def _spool_write(path: Path, data: bytes) -> None:
    if path.exists():  # an identical file was seen already
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(data)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _spool_images(job: _Publishing, rows: list[Assigned]) -> None:
    """The shard image of each of `rows` that was not read (unchanged since the previous
    version), into the spool: copied from the previous version's shards, else (a shard
    missing or damaged) read from the source. Only the images of shards to be written are
    asked for: a shard kept from the previous version needs none."""
    spool = job.spool
    unread = {r.image.sha256: r.image for r in rows if not (spool / r.image.sha256).exists()}
    if not unread:
        return
    missing = set(unread)
    if job.known is not None:
        missing = job.known.copy_images(job.dest, missing, spool, _spool_write,
                                        min(job.cfg.workers, 4))  # fmt: skip
    for sha in sorted(missing):
        _spool_from_source(job.source, unread[sha], job.cfg, spool, job.known)


def _spool_from_source(source, image: CheckedImage, cfg, spool: Path, known) -> None:
    data = source.get_bytes(image.key)
    if sha256_bytes(data) != image.sha256:
        since = f"version {known.version} read it" if known else "it was listed"
        raise DataError(
            f"{source.url(image.key)} has changed since {since}, although its size and "
            "modification time (S3: ETag) have not; run `organtrain prepare --rehash` to read "
            "every file again"
        )
    encoded = normalise_image(
        data, max_side=cfg.max_image_side, encoding=cfg.encoding, jpeg_quality=cfg.jpeg_quality
    ).encoded
    _spool_write(spool / image.sha256, encoded)


def _version(rows: list[Assigned], rejected: list[Rejection], cfg: PrepareConfig) -> str:
    """A hash of everything the version's content depends on, and nothing else."""
    settings = _settings(cfg)
    content = {
        "format": FORMAT,
        "settings": settings,
        "images": [
            (r.image.key, r.image.sha256, r.image.organ, r.image.diagnosis, r.split, r.image.group)
            for r in rows
        ],
        "metadata": [r.image.metadata for r in rows if r.image.metadata],
        "rejected": [(r.key, r.reason) for r in rejected],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def _settings(cfg: PrepareConfig) -> dict:
    keep = ("test_fraction", "val_fraction", "min_images_per_diagnosis", "max_image_side",
            "images_per_shard", "encoding")  # fmt: skip
    settings = {k: getattr(cfg, k) for k in keep}
    if cfg.encoding == "jpeg":
        settings["jpeg_quality"] = cfg.jpeg_quality
    settings["split_rule"] = split_rule(cfg)
    return settings


@dataclass(frozen=True)
class _Publishing:
    """What writing one new version works with."""

    source: Storage
    dest: Storage
    cfg: PrepareConfig
    version: str
    spool: Path  # local folder of encoded images, named by sha256
    progress: bool
    known: KnownFiles | None  # what the previous version knows of unchanged files
    tags: dict[str, str | None]  # source key -> listing tag
    executor: Executor  # where the new shards are written


@dataclass(frozen=True)
class _Shard:
    """One shard of the new version: kept from the previous version, or to be written."""

    organ: str
    split: str
    members: list[Assigned]  # in record order (sha256)
    reuse: ShardEntry | None  # the previous version's shard holding exactly these records


def _publish(job: _Publishing, assignment, rejected, changes, previous) -> None:
    written: list[str] = []  # keys this run wrote (from the storage root), none published
    try:
        _write_version(job, assignment, rejected, changes, previous, written)
    except Exception:
        # A full disk, a refused upload, a leak: what this run wrote belongs to no
        # published version (dataset.json comes last), so it goes, and frees its space.
        # Not on KeyboardInterrupt or a kill: the next run reuses the shards (same bytes),
        # and `organtrain datasets gc` removes pool shards no version came to list.
        _remove_unpublished(job.dest, written)
        raise


def _remove_unpublished(out: Storage, written: list[str]) -> None:
    for key in written:
        with contextlib.suppress(Exception):  # clean-up must not hide the first error
            out.delete(key)
    if written:
        log.warning("removed the %d unpublished object(s) this run wrote under %s",
                    len(written), out.uri)  # fmt: skip


def _write_version(job: _Publishing, assignment, rejected, changes, previous, written) -> None:
    cfg, version = job.cfg, job.version
    prefix = dataset_prefix(cfg.dataset, version)
    out = job.dest.sub(prefix)
    pool = _pool_listing(job.dest, cfg.dataset)
    plan = _plan_shards(assignment, cfg, previous, pool)
    _spool_images(job, [row for shard in plan if shard.reuse is None for row in shard.members])
    shard_of, shards = _write_shards(job, plan, written)
    if cfg.near_duplicates:
        _write_signatures(job, plan, shards, pool, written)
    rows = [_manifest_row(r, shard_of, job.tags) for r in assignment.rows]
    leakage = _check_before_publishing(rows, cfg, out)
    written.append(join_key(prefix, MANIFEST))
    # The signatures are in the pool, beside the shards (dataset.read_manifest).
    manifest = manifest_table(rows).drop_columns(["signature"])
    out.put_bytes(MANIFEST, _compact_parquet(manifest))
    written.append(join_key(prefix, REJECTED))
    out.put_bytes(REJECTED, _compact_parquet(rejected_table(rejected)))
    index = DatasetIndex(
        dataset=cfg.dataset,
        version=version,
        # Milliseconds: `datasets gc` keeps the newest versions, and two can share a second.
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        source=job.source.uri,
        settings=_settings(cfg),
        organs=_organ_counts(assignment),
        shards=shards,
        excluded=assignment.excluded,
        images=len(rows),
        rejected=len(rejected),
        leakage=leakage.to_dict() if leakage else None,
        split_changes=changes,
    )
    out.put_bytes(INDEX, index.to_json())  # the version becomes visible here
    kept = sum(shard.reuse is not None for shard in plan)
    log.info(
        "wrote dataset %s version %s: %d images in %d shards (%d written, %d kept from "
        "version %s)",
        cfg.dataset, version, len(rows), len(shards), len(shards) - kept, kept,
        previous.version if previous else "-",
    )  # fmt: skip


def _check_before_publishing(rows: list[ImageRow], cfg, out: Storage) -> LeakageReport | None:
    """The independent leakage check; a leaking version is never published."""
    if not cfg.near_duplicates:
        log.info("near-duplicate guard off (prepare.near_duplicates): groups checked only")
    report = check_leakage(
        {"organ": r.organ, "key": r.key, "group": r.group, "sha256": r.sha256,
         "split": r.split, "signature": r.signature if cfg.near_duplicates else None,
         "neardup_cluster": r.neardup_cluster}
        for r in rows
    )  # fmt: skip
    if not report.clean:
        raise DataError(
            f"the leakage check failed for {out.uri}, so the version is not published: "
            + " | ".join(report.problems())
            + ". This is a bug in organtrain's grouping; please report it with this message."
        )
    for organ in report.organs.values():
        log.info(
            "leakage check %s: 0 groups, 0 identical files and 0 near-duplicate pairs across "
            "splits (%d images; test holds %d group(s), %d near-duplicate cluster(s))",
            organ.organ,
            organ.images,
            organ.groups["test"],
            organ.clusters["test"],
        )
    return report


def _pool_listing(dest: Storage, dataset: str) -> dict[str, int]:
    """Key (from the dataset's folder) -> size of every object in the dataset's pool."""
    root = dataset_prefix(dataset)
    return {info.key.removeprefix(root + "/"): info.size
            for info in dest.list(join_key(root, POOL))}  # fmt: skip


def _plan_shards(assignment, cfg: PrepareConfig, previous, pool: dict) -> list[_Shard]:
    """The shards of every organ's split, each distinct image once: the previous version's
    shards whose records are unchanged are kept, the rest planned anew (shards.plan_split)."""
    groups: dict[tuple[str, str], dict[str, Assigned]] = defaultdict(dict)
    for row in assignment.rows:
        if row.duplicate_of is None:
            groups[(row.image.organ, row.split)][row.image.sha256] = row
    existing, entries = _shareable_shards(cfg, previous, pool)
    plan = []
    for (organ, split), members in sorted(groups.items()):
        records = {sha: _record_of(row) for sha, row in members.items()}
        for planned in plan_split(records, existing.get((organ, split), []),
                                  cfg.images_per_shard):  # fmt: skip
            reuse = entries[planned.reuse] if planned.reuse else None
            plan.append(_Shard(organ, split, [members[sha] for sha in planned.members], reuse))
    return plan


def _record_of(row: Assigned) -> tuple:
    """What a shard record holds besides its image, which its sha256 and the image settings
    decide (and is not compared)."""
    i = row.image
    return (row.label, i.diagnosis, i.key, i.encoded_width, i.encoded_height)


def _shareable_shards(cfg: PrepareConfig, previous, pool: dict[str, int]):
    """The previous version's pool shards a new version may list again, by organ and split,
    each with what its records say; and their entries by key. None when that version owns
    its shards (format 1 or 2), made its images with other settings, or sized its shards
    otherwise; nor a shard missing from the pool or of the wrong size (`pool`: a listing)."""
    if previous is None or previous.index.format < POOL_FORMAT:
        return {}, {}
    settings = _settings(cfg)
    for name in (*incremental.IMAGE_SETTINGS, "images_per_shard"):
        if previous.index.settings.get(name) != settings.get(name):
            log.info("no shard of version %s is kept: prepare.%s changed", previous.version, name)
            return {}, {}
    index = previous.index
    held: dict[str, dict[str, tuple]] = defaultdict(dict)
    columns = ["key", "label", "diagnosis", "sha256", "shard", "duplicate_of",
               "encoded_width", "encoded_height"]  # fmt: skip
    for row in previous.manifest.select(columns).to_pylist():
        if row["duplicate_of"] is None:
            record = (row["label"], row["diagnosis"], row["key"], row["encoded_width"],
                      row["encoded_height"])  # fmt: skip
            held[row["shard"]][row["sha256"]] = record
    entries = {
        s.key: s
        for s in index.shards
        if pool.get(s.key) == s.bytes and len(held[s.key]) == s.images
    }
    existing: dict[tuple[str, str], list[ExistingShard]] = defaultdict(list)
    for s in index.shards:
        if s.key in entries:
            existing[(s.organ, s.split)].append(ExistingShard(s.key, held[s.key]))
    return existing, entries


def _write_shards(job: _Publishing, plan: list[_Shard], written: list):
    """Write the planned shards that are new into the pool, named by their sha256
    (work.write_one_shard, one shard a batch, on the executor; one already there from an
    interrupted run is not uploaded again); the keys it uploads are added to `written`.
    Returns (organ, sha256) -> shard key, and the version's entries."""
    pool_prefix = dataset_prefix(job.cfg.dataset)
    pool = job.dest.sub(pool_prefix)
    new = [i for i, shard in enumerate(plan) if shard.reuse is None]
    shards = [shard.reuse for shard in plan]
    with tqdm(total=len(new), desc=f"writing {len(new)} shards", unit="shard",
              disable=not job.progress) as bar:  # fmt: skip

        def collect(i: int, out: work.WrittenShard) -> None:
            shard = plan[new[i]]
            if out.uploaded:
                written.append(join_key(pool_prefix, out.key))
            shards[new[i]] = ShardEntry(out.key, shard.organ, shard.split, out.images, out.bytes,
                                        out.sha256)  # fmt: skip
            bar.update()

        # The lock proves that a node's folder is the one this prepare writes to.
        target = Reachable(pool, "destination", holds=LOCK)
        batches = _LazyList([plan[i] for i in new], lambda shard: _shard_to_write(job, shard))
        job.executor.run(work.write_one_shard, (target,), batches, collect, at_most=4)
    shard_of = {
        (r.image.organ, r.image.sha256): entry.key
        for shard, entry in zip(plan, shards, strict=True)
        for r in shard.members
    }
    return shard_of, shards


class _LazyList(Sequence):
    """`make(item)` for each of `items`, made when asked for (executors.RayTasks asks for a
    batch when it sends it)."""

    def __init__(self, items: list, make):
        self.items, self.make = items, make

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.make(self.items[i])


def _shard_to_write(job: _Publishing, shard: _Shard) -> work.ShardToWrite:
    """A new shard's batch: its images from the spool, or carried with it to a node that
    does not share this machine's disk."""
    records = [_shard_record(r, job.cfg.encoding) for r in shard.members]
    if job.executor.shares_disk:
        images, scratch = work.SpoolImages(str(job.spool)), str(job.spool)
    else:
        images = work.PackedImages({r.sha256: (job.spool / r.sha256).read_bytes()
                                    for r in records})  # fmt: skip
        scratch = None
    return work.ShardToWrite(shard.organ, shard.split, records, images, scratch)


def _write_signatures(job: _Publishing, plan, shards, pool: dict[str, int], written) -> None:
    """The near-duplicate signatures of each shard's images, beside it in the pool, where
    not there yet: a shard kept from the previous version has its table already."""
    root = dataset_prefix(job.cfg.dataset)
    for shard, entry in zip(plan, shards, strict=True):
        key = signatures_key(entry.key, neardup.SIGNATURE_METHOD)
        if key in pool:
            continue
        table = pa.table({"sha256": [r.image.sha256 for r in shard.members],
                          "signature": [r.image.signature for r in shard.members]},
                         schema=SIGNATURES_SCHEMA)  # fmt: skip
        written.append(join_key(root, key))
        job.dest.put_bytes(join_key(root, key), _compact_parquet(table))


def _compact_parquet(table: pa.Table) -> bytes:
    """Parquet with zstd: every version writes its own manifest, and at 64 px snappy's 160
    bytes a row were 2 % of the version's size; zstd halves it (bench/prepare_pool.py)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _shard_record(row: Assigned, encoding: str) -> ShardRecord:
    """The record of `row`, without its image (work.ShardToWrite adds it when writing)."""
    return ShardRecord(
        encoded=b"",
        image_format=encoding,
        height=row.image.encoded_height,
        width=row.image.encoded_width,
        label=row.label,
        diagnosis=row.image.diagnosis,
        sha256=row.image.sha256,
        source_key=row.image.key,
    )


def _manifest_row(row: Assigned, shard_of: dict, tags: dict[str, str | None]) -> ImageRow:
    i = row.image
    return ImageRow(
        key=i.key, organ=i.organ, diagnosis=i.diagnosis, label=row.label, sha256=i.sha256,
        width=i.width, height=i.height, mode=i.mode, bytes=i.bytes, split=row.split,
        duplicate_of=row.duplicate_of, shard=shard_of[(i.organ, i.sha256)], group=i.group,
        unit=row.unit, neardup_cluster=row.cluster, signature=i.signature, metadata=i.metadata,
        encoded_width=i.encoded_width, encoded_height=i.encoded_height, source_tag=tags[i.key],
    )  # fmt: skip


def _organ_counts(assignment) -> dict[str, OrganIndex]:
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    units: dict[str, dict[str, dict[str, set]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(set))
    )
    for row in assignment.rows:
        units[row.image.organ][row.split][row.image.diagnosis].add(row.unit)
        if row.duplicate_of is None:
            counts[row.image.organ][row.split][row.image.diagnosis] += 1
    splits = ("train", "val", "test")
    return {
        organ: OrganIndex(
            diagnoses=diagnoses,
            counts={s: {d: counts[organ][s][d] for d in diagnoses} for s in splits},
            groups={s: {d: len(units[organ][s][d]) for d in diagnoses} for s in splits},
        )
        for organ, diagnoses in assignment.organs.items()
    }


def _latest_pointer(dest: Storage, dataset: str) -> dict | None:
    try:
        return json.loads(dest.get_bytes(join_key(dataset_prefix(dataset), LATEST)))
    except ObjectNotFoundError:
        return None


def _point_latest(dest: Storage, dataset: str, result: PrepareResult, listing: str | None):
    """LATEST.json names the version, and the digest of the listing it stands for: the next
    prepare with the same digest reads nothing (incremental.py). Rewritten only when one of
    them changes (a file touched without a change in content: same version, new digest)."""
    key = join_key(dataset_prefix(dataset), LATEST)
    pointer = {"version": result.version, "images": result.images, "organs": sorted(result.organs),
               "listing": listing}  # fmt: skip
    current = _latest_pointer(dest, dataset)
    if current != pointer:
        dest.put_bytes(key, json.dumps(pointer, indent=2).encode())
        if current is None or current.get("version") != result.version:
            log.info("%s now points at version %s", dest.url(key), result.version)


def _repair_missing_shards(
    source: Storage, dest: Storage, dataset: str, version: str, spool: Path
) -> list[str]:
    """An existing version's shards that are missing or of the wrong size (one listing,
    no download), rewritten from the source. A flipped byte needs `--repair`, which reads
    every shard."""
    index = load_dataset(dest, dataset, version)
    sizes = {info.key: info.size for info in dest.list(join_key(shards_root(index), POOL))}
    damaged = [s for s in index.shards if sizes.get(shard_object_key(index, s)) != s.bytes]
    if not damaged:
        return []
    log.warning(
        "dataset %s version %s is published but %d of its shards are missing or of the wrong "
        "size (e.g. %s); rewriting them from the source",
        dataset, version, len(damaged), damaged[0].key,
    )  # fmt: skip
    return _rebuild_shards(source, dest, index, damaged, spool)


def repair(
    source: Storage,
    dest: Storage,
    cfg: PrepareConfig,
    *,
    version: str | None = None,
    progress: bool = True,
) -> RepairResult:
    """`organtrain prepare --repair`: verify every shard of a published version (the latest
    unless named) against the checksum in its index, and rewrite each missing or damaged
    one from the source images recorded in its manifest, with the version's own settings."""
    next(iter(dest.list(dataset_prefix(cfg.dataset))), None)
    with dataset_lock(dest, cfg.dataset):
        index = load_dataset(dest, cfg.dataset, version)
        with tempfile.TemporaryDirectory(prefix="organtrain-repair-") as spool:
            damaged = _damaged_shards(dest, index, Path(spool), progress)
            rewritten = _rebuild_shards(source, dest, index, damaged, Path(spool))
    prefix = dataset_prefix(index.dataset, index.version)
    return RepairResult(index.dataset, index.version, dest.url(prefix), len(index.shards),
                        rewritten)  # fmt: skip


def _damaged_shards(dest: Storage, index: DatasetIndex, spool: Path, progress: bool):
    """The shards that are missing or whose bytes do not match the index (each read once)."""
    damaged = []
    for shard in tqdm(index.shards, desc="verifying shards", unit="shard", disable=not progress):
        copy = spool / "verify.tfrecord"
        try:
            dest.download(shard_object_key(index, shard), copy, sha256=shard.sha256)
        except (ChecksumMismatchError, ObjectNotFoundError) as err:
            log.warning("shard %s: %s", shard.key, err)
            damaged.append(shard)
        finally:
            copy.unlink(missing_ok=True)
    return damaged


class _Unrebuildable(Exception):
    """A shard's images cannot be read from the source as they were."""


def _rebuild_shards(
    source: Storage, dest: Storage, index: DatasetIndex, damaged: list[ShardEntry], spool: Path
) -> list[str]:
    """Rewrite `damaged` shards from the source, each checked against its recorded sha256
    before it is published; DataError naming what could not be rebuilt."""
    if not damaged:
        return []
    prefix = dataset_prefix(index.dataset, index.version)
    try:
        manifest = read_parquet(dest.get_bytes(join_key(prefix, MANIFEST))).to_pylist()
    except ObjectNotFoundError:
        raise DataError(
            f"{dest.url(join_key(prefix, MANIFEST))} is missing, so the shards of version "
            f"{index.version} cannot be rebuilt; delete {dest.url(join_key(prefix, INDEX))} "
            "and run `organtrain prepare` again to rewrite the whole version"
        ) from None
    # Identical files share a record: any of them can stand in for the one recorded.
    copies: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in sorted(manifest, key=lambda r: r["duplicate_of"] is not None):
        copies[(row["organ"], row["sha256"])].append(row["key"])
    rewritten, problems = [], []
    for shard in damaged:
        members = sorted(
            (r for r in manifest if r["shard"] == shard.key and r["duplicate_of"] is None),
            key=lambda r: r["sha256"],
        )
        rebuilt = spool / "rebuilt.tfrecord"
        try:
            write_shard(rebuilt, (_source_record(source, r, copies, index) for r in members))
        except _Unrebuildable as err:
            problems.append(f"{shard.key}: {err}")
            continue
        if sha256_file(rebuilt) != shard.sha256:
            problems.append(
                f"{shard.key}: rebuilt from the unchanged source files, its bytes still differ "
                "from the recorded ones (another organtrain, Pillow or TensorFlow version?)"
            )
            continue
        dest.put_file(shard_object_key(index, shard), rebuilt)
        rewritten.append(shard.key)
        log.info("rewrote %s from the source", dest.url(shard_object_key(index, shard)))
    if problems:
        raise DataError(
            f"cannot repair dataset {index.dataset} version {index.version} "
            f"({len(rewritten)} shard(s) rewritten, {len(problems)} not): "
            + "; ".join(problems)
            + ". The version cannot be rebuilt byte for byte; run `organtrain prepare` "
            "without --repair to prepare a new version from the source as it is now"
        )
    return rewritten


def _source_record(source: Storage, row: dict, copies: dict, index: DatasetIndex):
    """The shard record of a manifest row, re-made from its source file."""
    for key in copies[(row["organ"], row["sha256"])]:
        try:
            data = source.get_bytes(key)
        except ObjectNotFoundError:
            continue
        if sha256_bytes(data) == row["sha256"]:
            break
    else:
        raise _Unrebuildable(
            f"the source file {row['key']} under {source.uri} is missing or has changed since "
            f"version {index.version} was prepared"
        )
    settings = index.settings
    image = normalise_image(
        data,
        max_side=settings["max_image_side"],
        encoding=settings["encoding"],
        jpeg_quality=settings.get("jpeg_quality", 95),
    )
    return ShardRecord(
        encoded=image.encoded,
        image_format=settings["encoding"],
        height=image.encoded_height,
        width=image.encoded_width,
        label=row["label"],
        diagnosis=row["diagnosis"],
        sha256=row["sha256"],
        source_key=row["key"],
    )
