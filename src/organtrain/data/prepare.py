"""`organtrain prepare`: image tree → manifest, split and checksummed TFRecord shards.

Stages, each safe to interrupt:
1. list the source (and the groups table) into candidate images;
2. read the previous version's splits, so no existing image changes split;
3. decode every image once, with its near-duplicate signature (bad files go to
   rejected.parquet);
4. group and split (assign.py): groups, copies and near-duplicates share a split;
5. name the version by hashing inputs, splits and settings; if it exists, stop;
6. write shards (skipping any already published with the same sha256) and the tables,
   check for leakage independently (leakage.py) and refuse to publish a leak, then write
   dataset.json — the step that makes the version visible — then LATEST.json.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from organtrain.config import PrepareConfig
from organtrain.data import neardup
from organtrain.data.assign import Assigned, CheckedImage, PreviousSplits, assign
from organtrain.data.dataset import (
    FORMAT,
    INDEX,
    LATEST,
    MANIFEST,
    REJECTED,
    DatasetIndex,
    OrganIndex,
    ShardEntry,
    dataset_prefix,
    load_dataset,
)
from organtrain.data.groups import apply_group_table, load_group_table
from organtrain.data.images import ImageRejected, normalise_image
from organtrain.data.leakage import LeakageReport, check_leakage
from organtrain.data.manifest import (
    ImageRow,
    manifest_table,
    parquet_bytes,
    read_parquet,
    rejected_table,
)
from organtrain.data.scan import Candidate, Rejection, scan_tree
from organtrain.data.shards import ShardRecord, plan_shards, shard_key, write_shard
from organtrain.errors import DataError, ObjectNotFoundError
from organtrain.storage import Storage, join_key, sha256_bytes, sha256_file

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Previous:
    """The version this one follows: its splits, and whether they may be inherited."""

    version: str
    splits: PreviousSplits
    same_rule: bool  # split by the same rule: inherit its splits
    rule: dict | None


def prepare(
    source: Storage, dest: Storage, cfg: PrepareConfig, *, progress: bool = True
) -> PrepareResult:
    # Touch the destination first: a missing bucket or bad credentials should fail now,
    # not after every image has been decoded.
    next(iter(dest.list(dataset_prefix(cfg.dataset))), None)
    candidates, rejected = _list_source(source, cfg)
    previous = _previous_splits(dest, cfg)
    with tempfile.TemporaryDirectory(prefix="organtrain-prepare-") as spool:
        checked, bad = _check_images(source, candidates, cfg, Path(spool), progress)
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
            _publish(
                dest.sub(prefix),
                assignment,
                rejected,
                cfg,
                version,
                source,
                Path(spool),
                progress,
                changes,
            )
        else:
            log.info(
                "dataset %s version %s is already prepared; nothing new written",
                cfg.dataset,
                version,
            )
    _point_latest(dest, cfg.dataset, result)
    return result


def _list_source(source: Storage, cfg: PrepareConfig):
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
    return candidates, rejected


def split_rule(cfg: PrepareConfig) -> dict:
    """What decides an image's split; a version split by another rule is not inherited."""
    return {
        "test_fraction": cfg.test_fraction,
        "val_fraction": cfg.val_fraction,
        "units": "groups+near-duplicates" if cfg.near_duplicates else "groups",
        "signature": neardup.SIGNATURE_METHOD if cfg.near_duplicates else None,
    }


def _previous_splits(dest: Storage, cfg: PrepareConfig) -> Previous | None:
    try:
        index = load_dataset(dest, cfg.dataset)
    except DataError:
        return None  # no version yet (or the last one never completed: nothing to keep)
    prefix = dataset_prefix(cfg.dataset, index.version)
    try:
        manifest = read_parquet(dest.get_bytes(join_key(prefix, MANIFEST)))
    except ObjectNotFoundError:
        return None
    columns = manifest.select(["organ", "sha256", "split"]).to_pydict()
    splits = dict(
        zip(zip(columns["organ"], columns["sha256"], strict=True), columns["split"], strict=True)
    )
    rule = index.settings.get("split_rule")
    return Previous(index.version, splits, rule == split_rule(cfg), rule)


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


def _check_images(source, candidates, cfg, spool: Path, progress: bool):
    """Read, hash, decode and re-encode every candidate, in parallel threads.

    The re-encoded image is kept in the local spool (named by content hash) so the
    source is read only once even when it is in object storage.
    """

    def check(candidate: Candidate) -> CheckedImage | Rejection:
        data = source.get_bytes(candidate.key)
        sha = sha256_bytes(data)
        try:
            image = normalise_image(
                data,
                max_side=cfg.max_image_side,
                encoding=cfg.encoding,
                jpeg_quality=cfg.jpeg_quality,
            )
        except ImageRejected as err:
            return Rejection(
                candidate.key, err.reason, err.detail, candidate.organ, candidate.diagnosis
            )
        _spool_write(spool / sha, image.encoded)
        return CheckedImage(
            candidate.key, candidate.organ, candidate.diagnosis, sha,
            image.width, image.height, image.mode, len(data),
            image.encoded_width, image.encoded_height, candidate.group,
            neardup.signature(np.asarray(image.rgb)) if cfg.near_duplicates else b"",
            candidate.metadata,
        )  # fmt: skip

    checked, rejected = [], []
    with ThreadPoolExecutor(cfg.workers) as pool:
        results = pool.map(check, candidates)
        for outcome in tqdm(
            results, total=len(candidates), desc="checking images", unit="img", disable=not progress
        ):
            (checked if isinstance(outcome, CheckedImage) else rejected).append(outcome)
    log.info("%d images decoded cleanly, %d rejected", len(checked), len(rejected))
    return checked, rejected


def _spool_write(path: Path, data: bytes) -> None:
    if path.exists():  # an identical file was seen already
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(data)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def _publish(
    out: Storage, assignment, rejected, cfg, version, source, spool, progress, changes
) -> None:
    shard_of, shards = _write_shards(out, assignment, cfg, spool, progress)
    rows = [_manifest_row(r, shard_of) for r in assignment.rows]
    leakage = _check_before_publishing(rows, cfg, out)
    out.put_bytes(MANIFEST, parquet_bytes(manifest_table(rows)))
    out.put_bytes(REJECTED, parquet_bytes(rejected_table(rejected)))
    index = DatasetIndex(
        dataset=cfg.dataset,
        version=version,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=source.uri,
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
    log.info(
        "wrote dataset %s version %s: %d images in %d shards",
        cfg.dataset,
        version,
        len(rows),
        len(shards),
    )


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


def _write_shards(out: Storage, assignment, cfg, spool: Path, progress: bool):
    """One group of shards per organ and split, holding each distinct image once."""
    groups: dict[tuple[str, str], list[Assigned]] = defaultdict(list)
    for row in assignment.rows:
        if row.duplicate_of is None:
            groups[(row.image.organ, row.split)].append(row)
    jobs = []
    for (organ, split), members in sorted(groups.items()):
        members.sort(key=lambda r: r.image.sha256)
        ranges = plan_shards(len(members), cfg.images_per_shard)
        jobs += [
            (shard_key(organ, split, i, len(ranges)), organ, split, members[a:b])
            for i, (a, b) in enumerate(ranges)
        ]

    def write(job) -> ShardEntry:
        key, organ, split, members = job
        with tempfile.NamedTemporaryFile(dir=spool, suffix=".tfrecord") as tmp:
            n = write_shard(tmp.name, (_shard_record(r, spool, cfg.encoding) for r in members))
            digest = sha256_file(tmp.name)
            if out.checksum(key) != digest:  # else published by an interrupted earlier run
                out.put_file(key, tmp.name)
            return ShardEntry(key, organ, split, n, os.path.getsize(tmp.name), digest)

    with ThreadPoolExecutor(min(cfg.workers, 4)) as pool:
        shards = list(
            tqdm(
                pool.map(write, jobs),
                total=len(jobs),
                desc="writing shards",
                unit="shard",
                disable=not progress,
            )
        )
    shard_of = {
        (r.image.organ, r.image.sha256): key for key, _, _, members in jobs for r in members
    }
    return shard_of, shards


def _shard_record(row: Assigned, spool: Path, encoding: str) -> ShardRecord:
    return ShardRecord(
        encoded=(spool / row.image.sha256).read_bytes(),
        image_format=encoding,
        height=row.image.encoded_height,
        width=row.image.encoded_width,
        label=row.label,
        diagnosis=row.image.diagnosis,
        sha256=row.image.sha256,
        source_key=row.image.key,
    )


def _manifest_row(row: Assigned, shard_of: dict) -> ImageRow:
    i = row.image
    return ImageRow(
        key=i.key, organ=i.organ, diagnosis=i.diagnosis, label=row.label, sha256=i.sha256,
        width=i.width, height=i.height, mode=i.mode, bytes=i.bytes, split=row.split,
        duplicate_of=row.duplicate_of, shard=shard_of[(i.organ, i.sha256)], group=i.group,
        unit=row.unit, neardup_cluster=row.cluster, signature=i.signature, metadata=i.metadata,
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


def _point_latest(dest: Storage, dataset: str, result: PrepareResult) -> None:
    key = join_key(dataset_prefix(dataset), LATEST)
    pointer = {"version": result.version, "images": result.images, "organs": sorted(result.organs)}
    current = dest.get_bytes(key) if dest.exists(key) else None
    if current is None or json.loads(current).get("version") != result.version:
        dest.put_bytes(key, json.dumps(pointer, indent=2).encode())
        log.info("%s now points at version %s", dest.url(key), result.version)
