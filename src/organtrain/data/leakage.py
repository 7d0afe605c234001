"""The leakage check: does any patient/slide group, identical file or near-duplicate pair
straddle two splits?

Independent of the code that made the split (grouping.py, assign.py): it reads only the
manifest's columns (organ, group, sha256, split, signature) and compares every image of
each split with every image of the other splits by brute force (neardup.cross_pairs), so
a near-duplicate the grouping's index missed is still found. `prepare` runs it before a
version is published and refuses to publish a leak; `organtrain leakage` runs it on any
version, and its figures go to dataset.json and the report.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from organtrain.data import neardup
from organtrain.data.split import SPLITS

CLOSEST_PAIRS = 6  # train/test pairs shown per organ, so a person can judge the threshold
LISTED = 20  # leaking groups/pairs named per organ (the counts are complete)


@dataclass
class OrganLeakage:
    organ: str
    images: int  # distinct images (identical copies once)
    groups: dict[str, int]  # split -> patient/slide groups with images there
    clusters: dict[str, int]  # split -> near-duplicate clusters with images there
    cross_split_groups: int = 0  # groups with images in two or more splits
    cross_split_copies: int = 0  # identical files in two or more splits
    cross_split_pairs: int = 0  # near-duplicate pairs across two splits
    leaks: list[dict] = field(default_factory=list)  # the first LISTED of the above, named
    closest: list[dict] = field(default_factory=list)  # closest train/test pairs

    @property
    def clean(self) -> bool:
        return not (self.cross_split_groups or self.cross_split_copies or self.cross_split_pairs)


@dataclass
class LeakageReport:
    method: str  # the signature method the pairs were compared with
    organs: dict[str, OrganLeakage]

    @property
    def clean(self) -> bool:
        return all(o.clean for o in self.organs.values())

    def problems(self) -> list[str]:
        """One sentence per leaking organ, naming examples."""
        out = []
        for organ in self.organs.values():
            if organ.clean:
                continue
            named = "; ".join(leak["what"] for leak in organ.leaks[:3])
            out.append(
                f"{organ.organ}: {organ.cross_split_groups} group(s), "
                f"{organ.cross_split_copies} identical file(s) and {organ.cross_split_pairs} "
                f"near-duplicate pair(s) straddle two splits (e.g. {named})"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "threshold": neardup.THRESHOLD,  # of the distances below: ≤ it is a pair
            "clean": self.clean,
            "organs": {name: asdict(o) for name, o in sorted(self.organs.items())},
        }


def check_leakage(rows: Iterable[dict], *, closest: int = CLOSEST_PAIRS) -> LeakageReport:
    """Check manifest rows (dicts with organ, key, group, sha256, split, signature)."""
    by_organ: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_organ[row["organ"]].append(row)
    # With the near-duplicate guard off (prepare.near_duplicates: false) rows carry no
    # signature: groups and identical files are still checked, near-duplicates cannot be.
    signed = any(r.get("signature") for members in by_organ.values() for r in members)
    return LeakageReport(
        neardup.SIGNATURE_METHOD if signed else "groups",
        {organ: _check_organ(organ, members, closest if signed else 0, signed)
         for organ, members in by_organ.items()},
    )  # fmt: skip


def _check_organ(organ: str, rows: list[dict], closest: int, signed: bool) -> OrganLeakage:
    distinct = _distinct_images(rows)
    result = OrganLeakage(
        organ=organ,
        images=len(distinct),
        groups=_count_per_split(rows, "group"),
        clusters=_count_per_split(rows, "neardup_cluster"),
    )
    leaks: list[dict] = []
    for group, splits in _straddling(rows, "group").items():
        result.cross_split_groups += 1
        leaks.append({"kind": "group", "what": f"group {group!r} in {' and '.join(splits)}"})
    for sha, splits in _straddling(rows, "sha256").items():
        result.cross_split_copies += 1
        leaks.append({"kind": "copy", "what": f"file {sha[:12]}… in {' and '.join(splits)}"})
    per_split = {s: [r for r in distinct if r["split"] == s] for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        left, right = per_split[a], per_split[b]
        if not signed or not left or not right:
            continue
        pairs = neardup.cross_pairs([r["signature"] for r in left], [r["signature"] for r in right])
        result.cross_split_pairs += len(pairs)
        leaks += [
            {
                "kind": "near_duplicate",
                "what": f"{left[i]['key']} ({a}) ≈ {right[j]['key']} ({b})",
            }
            for i, j in pairs[:LISTED]
        ]
    result.leaks = leaks[:LISTED]
    result.closest = _closest(per_split["train"], per_split["test"], closest)
    return result


def _distinct_images(rows: list[dict]) -> list[dict]:
    """One row per content hash and split: identical copies compare as one image."""
    seen: dict[tuple[str, str], dict] = {}
    for row in sorted(rows, key=lambda r: r["key"]):
        seen.setdefault((row["sha256"], row["split"]), row)
    return list(seen.values())


def _count_per_split(rows: list[dict], column: str) -> dict[str, int]:
    members: dict[str, set] = {s: set() for s in SPLITS}
    for row in rows:
        if row.get(column) is not None:
            members[row["split"]].add(row[column])
    return {s: len(v) for s, v in members.items()}


def _straddling(rows: list[dict], column: str) -> dict[str, list[str]]:
    splits: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.get(column) is not None:
            splits[row[column]].add(row["split"])
    return {k: sorted(v) for k, v in sorted(splits.items()) if len(v) > 1}


def _closest(train: list[dict], test: list[dict], k: int) -> list[dict]:
    if not train or not test or k <= 0:
        return []
    found = neardup.closest_cross_pairs(
        [r["signature"] for r in train], [r["signature"] for r in test], k
    )
    return [
        {
            "train_key": train[i]["key"],
            "train_sha256": train[i]["sha256"],
            "test_key": test[j]["key"],
            "test_sha256": test[j]["sha256"],
            "distance": float(d),
        }
        for i, j, d in found
    ]


def check_version(storage, index, *, progress: bool = False) -> LeakageReport:
    """Check a published version from its manifest. A version prepared before signatures
    were kept (format 1) has its signatures computed from its shards' images."""
    from organtrain.data.dataset import read_manifest

    manifest = read_manifest(storage, index)  # signatures from the shard pool (format 3)
    rows = manifest.to_pylist()
    if "signature" not in manifest.column_names:
        signatures = _signatures_from_shards(storage, index, progress)
        for row in rows:
            row["signature"] = signatures[(row["organ"], row["sha256"])]
    return check_leakage(rows)


def _signatures_from_shards(storage, index, progress: bool) -> dict[tuple[str, str], bytes]:
    import io
    import tempfile

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from organtrain.data.dataset import fetch_shard
    from organtrain.data.shards import read_shard

    signatures = {}
    with tempfile.TemporaryDirectory(prefix="organtrain-leakage-") as tmp:
        for shard in tqdm(index.shards, desc="signatures from shards", disable=not progress):
            path = fetch_shard(storage, index, shard, f"{tmp}/shard.tfrecord")
            for record in read_shard(path):
                pixels = np.asarray(Image.open(io.BytesIO(record.encoded)).convert("RGB"))
                signatures[(shard.organ, record.sha256)] = neardup.signature(pixels)
    return signatures
