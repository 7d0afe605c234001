"""`organtrain prepare`: image tree → manifest, split and checksummed TFRecord shards.

Steps, each safe to interrupt:
1. scan the source and decode every image once (bad files go to rejected.parquet);
2. assign labels and splits (see split.py), leave out diagnoses/organs that cannot train;
3. name the version by hashing inputs and settings; if it exists, stop: nothing to do;
4. write shards (skipping any already published with the same sha256), the tables,
   then dataset.json — the step that makes the version visible — then LATEST.json.
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

from tqdm import tqdm

from organtrain.config import PrepareConfig
from organtrain.data.assign import Assigned, CheckedImage, assign
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
)
from organtrain.data.images import ImageRejected, normalise_image
from organtrain.data.manifest import ImageRow, manifest_table, parquet_bytes, rejected_table
from organtrain.data.scan import Candidate, Rejection, scan_tree
from organtrain.data.shards import ShardRecord, plan_shards, shard_key, write_shard
from organtrain.errors import DataError
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


def prepare(
    source: Storage, dest: Storage, cfg: PrepareConfig, *, progress: bool = True
) -> PrepareResult:
    # Touch the destination first: a missing bucket or bad credentials should fail now,
    # not after every image has been decoded.
    next(iter(dest.list(dataset_prefix(cfg.dataset))), None)
    candidates, rejected = scan_tree(source)
    if not candidates:
        raise DataError(
            f"no images found under {source.uri}: expected <organ>/<diagnosis>/<image> with "
            f"extensions png, jpg, jpeg, tif, tiff or bmp ({len(rejected)} other file(s) seen)"
        )
    log.info("found %d candidate images under %s", len(candidates), source.uri)
    with tempfile.TemporaryDirectory(prefix="organtrain-prepare-") as spool:
        checked, bad = _check_images(source, candidates, cfg, Path(spool), progress)
        assignment = assign(
            checked,
            test_fraction=cfg.test_fraction,
            val_fraction=cfg.val_fraction,
            min_images_per_diagnosis=cfg.min_images_per_diagnosis,
        )
        rejected = sorted(rejected + bad + assignment.rejected, key=lambda r: r.key)
        for item in assignment.excluded:
            log.warning("left out: %s", item["reason"])
        if not assignment.organs:
            raise DataError(
                f"no organ under {source.uri} has two diagnoses with enough images; "
                "see the messages above"
            )
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
        )
        if result.created:
            _publish(
                dest.sub(prefix), assignment, rejected, cfg, version, source, Path(spool), progress
            )
        else:
            log.info(
                "dataset %s version %s is already prepared; nothing new written",
                cfg.dataset,
                version,
            )
    _point_latest(dest, cfg.dataset, result)
    return result


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
            image.encoded_width, image.encoded_height,
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
        "images": [(r.image.key, r.image.sha256, r.image.organ, r.image.diagnosis) for r in rows],
        "rejected": [(r.key, r.reason) for r in rejected],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def _settings(cfg: PrepareConfig) -> dict:
    keep = ("test_fraction", "val_fraction", "min_images_per_diagnosis", "max_image_side",
            "images_per_shard", "encoding")  # fmt: skip
    settings = {k: getattr(cfg, k) for k in keep}
    if cfg.encoding == "jpeg":
        settings["jpeg_quality"] = cfg.jpeg_quality
    return settings


def _publish(out: Storage, assignment, rejected, cfg, version, source, spool, progress) -> None:
    shard_of, shards = _write_shards(out, assignment, cfg, spool, progress)
    rows = [_manifest_row(r, shard_of) for r in assignment.rows]
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
    )
    out.put_bytes(INDEX, index.to_json())  # the version becomes visible here
    log.info(
        "wrote dataset %s version %s: %d images in %d shards",
        cfg.dataset,
        version,
        len(rows),
        len(shards),
    )


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
        duplicate_of=row.duplicate_of, shard=shard_of[(i.organ, i.sha256)],
    )  # fmt: skip


def _organ_counts(assignment) -> dict[str, OrganIndex]:
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for row in assignment.rows:
        if row.duplicate_of is None:
            counts[row.image.organ][row.split][row.image.diagnosis] += 1
    return {
        organ: OrganIndex(
            diagnoses=diagnoses,
            counts={
                s: {d: counts[organ][s][d] for d in diagnoses} for s in ("train", "val", "test")
            },
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
