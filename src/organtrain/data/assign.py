"""From checked images to dataset rows: labels, splits, duplicates, and what is left out.

Pure functions of the checked images, the settings and the previous version's splits, so
the whole decision can be tested without touching storage.

Splits, per organ: images that share a patient/slide group, identical files and
near-duplicates form split units (grouping.py). A unit with no image from the previous
version takes the split of its key (split.py); a unit whose images were all in one split
keeps it; a unit that new images would stretch across two existing splits cannot be
placed without moving an image, so those new images are left out (`bridges_splits`). When
the previous version's images are themselves joined across splits (their groups changed),
the unit is split by its key again and the move is counted and reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from organtrain.data.grouping import Node, split_units
from organtrain.data.scan import Rejection
from organtrain.data.split import SPLITS, split_of


@dataclass(frozen=True)
class CheckedImage:
    """A candidate that decoded cleanly, with what `prepare` learnt about it."""

    key: str
    organ: str
    diagnosis: str
    sha256: str
    width: int
    height: int
    mode: str
    bytes: int
    encoded_width: int  # of the normalised image that goes into the shard
    encoded_height: int
    group: str | None = None  # patient/slide/specimen (folder or groups table)
    signature: bytes = b""  # near-duplicate signature (neardup.py)
    metadata: str | None = None  # the groups table's other columns, JSON


@dataclass(frozen=True)
class Assigned:
    """A checked image with its split and label (label -1 until the organ is settled)."""

    image: CheckedImage
    split: str
    label: int
    duplicate_of: str | None
    unit: str = ""  # the key of its split unit (split.py)
    cluster: str | None = None  # its near-duplicate cluster, None when it has no copy


@dataclass
class Assignment:
    rows: list[Assigned]  # every image in the dataset, sorted by key
    rejected: list[Rejection]  # images left out here, with reasons
    organs: dict[str, list[str]]  # organ -> its diagnoses, in label order
    excluded: list[dict]  # one entry per organ or diagnosis left out
    near_duplicate_pairs: dict[str, int] = field(default_factory=dict)  # organ -> pairs


# (organ, sha256) -> split in the previous version
PreviousSplits = dict[tuple[str, str], str]
PairFinder = Callable[[Sequence[bytes]], list[tuple[int, int]]]


def assign(
    images: list[CheckedImage],
    *,
    test_fraction: float,
    val_fraction: float,
    min_images_per_diagnosis: int,
    find_pairs: PairFinder | None = None,
    previous: PreviousSplits | None = None,
) -> Assignment:
    """`find_pairs` finds near-duplicate pairs among signatures (None: no guard);
    `previous` holds the splits to keep (None: a first version, or a new split rule)."""
    images, rejected = _drop_conflicting_labels(images)
    fractions = {"test": test_fraction, "val": val_fraction}
    splitter = _Splitter(fractions, find_pairs, previous or {})
    placed: list[Assigned] = []  # label -1 until the organs are settled
    for organ, members in sorted(_by(images, lambda i: i.organ).items()):
        outcome, left_out = splitter.place(organ, members)
        placed += outcome
        rejected += left_out

    groups = _by(placed, lambda p: (p.image.organ, p.image.diagnosis))
    kept: dict[str, list[str]] = defaultdict(list)
    excluded: list[dict] = []
    for (organ, diagnosis), members in sorted(groups.items()):
        problem = _diagnosis_problem(organ, diagnosis, members, fractions, min_images_per_diagnosis)
        if problem:
            excluded.append({"organ": organ, "diagnosis": diagnosis, "reason": problem})
            rejected += [_reject(m.image, "diagnosis_too_small", problem) for m in members]
        else:
            kept[organ].append(diagnosis)

    organs: dict[str, list[str]] = {}
    for organ in sorted({o for o, _ in groups}):
        diagnoses = sorted(kept.get(organ, []))
        if len(diagnoses) >= 2:
            organs[organ] = diagnoses
            continue
        problem = (
            f"organ {organ} has {len(diagnoses)} usable diagnosis folder(s) "
            f"({', '.join(diagnoses) or 'none'}); a classifier needs at least 2"
        )
        excluded.append({"organ": organ, "diagnosis": None, "reason": problem})
        rejected += [
            _reject(m.image, "organ_single_diagnosis", problem)
            for d in diagnoses
            for m in groups[(organ, d)]
        ]

    rows = _label(placed, organs)
    return Assignment(
        rows, sorted(rejected, key=lambda r: r.key), organs, excluded,
        splitter.pairs,
    )  # fmt: skip


def _by(items, key_of) -> dict:
    out: dict = defaultdict(list)
    for item in items:
        out[key_of(item)].append(item)
    return out


class _Splitter:
    """Places one organ's images in splits, unit by unit (see the module docstring)."""

    def __init__(self, fractions: dict[str, float], find_pairs, previous: PreviousSplits):
        self.fractions = fractions
        self.find_pairs = find_pairs
        self.previous = previous
        self.pairs: dict[str, int] = {}

    def place(self, organ: str, images: list[CheckedImage]):
        images = sorted(images, key=lambda i: i.key)
        nodes = [Node(i.key, i.sha256, i.group) for i in images]
        pairs = self.find_pairs([i.signature for i in images]) if self.find_pairs else []
        self.pairs[organ] = len(pairs)
        units = split_units(organ, nodes, pairs)
        placed, rejected = [], []
        for u, members in _by(range(len(images)), lambda i: int(units.unit[i])).items():
            splits = self._unit_splits(organ, images, members, pairs, units.unit_key[u])
            for i in members:
                if isinstance(splits[i], dict):
                    rejected.append(_bridge_rejection(images[i], splits[i]))
                else:
                    unit, cluster = units.unit_key[u], units.cluster[i]
                    placed.append(Assigned(images[i], splits[i], -1, None, unit, cluster))
        return placed, rejected

    def _unit_splits(self, organ, images, members, pairs, unit_key) -> dict:
        """Each member's split; for a new image that would bridge two splits, instead, the
        existing images it joins ({split: key})."""
        old = {i: self.previous.get((organ, images[i].sha256)) for i in members}
        held = {s for s in old.values() if s is not None}
        if len(held) <= 1:
            split = held.pop() if held else split_of(unit_key, **self._fractions())
            return dict.fromkeys(members, split)
        olds = [i for i in members if old[i] is not None]
        if any(len({old[i] for i in part}) > 1 for part in _parts(organ, images, olds, pairs)):
            # The existing images themselves are joined across splits now (their groups
            # changed): the only leak-free answer is one split for the whole unit.
            return dict.fromkeys(members, split_of(unit_key, **self._fractions()))
        # New images stretch the unit across splits. Each connected part of the new images
        # that touches existing images of one split joins it; a part touching two is left out.
        out = {i: old[i] for i in olds}
        news = [i for i in members if old[i] is None]
        neighbours = defaultdict(set)
        for a, b in pairs:
            neighbours[a].add(b)
            neighbours[b].add(a)
        for part in _parts(organ, images, news, pairs):
            groups = {images[i].group for i in part} - {None}
            hashes = {images[i].sha256 for i in part}
            near = set().union(*(neighbours[i] for i in part))
            touched: dict[str, str] = {}
            for o in sorted(olds, key=lambda o: images[o].key):
                if images[o].group in groups or images[o].sha256 in hashes or o in near:
                    touched.setdefault(old[o], images[o].key)
            for i in part:
                out[i] = next(iter(touched)) if len(touched) == 1 else touched
        return out

    def _fractions(self) -> dict[str, float]:
        return {
            "test_fraction": self.fractions["test"],
            "val_fraction": self.fractions["val"],
        }


def _parts(organ: str, images, subset: list[int], pairs) -> list[list[int]]:
    """The connected parts of `subset` (indices into images) on their own."""
    index = {i: n for n, i in enumerate(subset)}
    sub_pairs = [(index[a], index[b]) for a, b in pairs if a in index and b in index]
    nodes = [Node(images[i].key, images[i].sha256, images[i].group) for i in subset]
    units = split_units(organ, nodes, sub_pairs)
    return list(_by(subset, lambda i: int(units.unit[index[i]])).values())


def _bridge_rejection(image: CheckedImage, touched: dict[str, str]) -> Rejection:
    named = " and ".join(f"{key} ({split})" for split, key in sorted(touched.items()))
    detail = (
        f"joins images already in different splits, {named}, through its patient/slide "
        "group or as a near-duplicate; existing images never change split, so this one "
        "is left out: check whether it is a copy, or belongs to another group"
    )
    return _reject(image, "bridges_splits", detail)


def _drop_conflicting_labels(
    images: list[CheckedImage],
) -> tuple[list[CheckedImage], list[Rejection]]:
    """Identical files filed under two diagnoses of one organ cannot both be right."""
    by_content: dict[tuple[str, str], list[CheckedImage]] = defaultdict(list)
    for image in images:
        by_content[(image.organ, image.sha256)].append(image)
    keep, rejected = [], []
    for copies in by_content.values():
        if len({c.diagnosis for c in copies}) == 1:
            keep += copies
            continue
        keys = ", ".join(sorted(c.key for c in copies))
        detail = f"identical files carry different diagnoses ({keys}); keep the right one"
        rejected += [_reject(c, "conflicting_labels", detail) for c in copies]
    return keep, rejected


def _diagnosis_problem(organ, diagnosis, members, fractions, minimum) -> str | None:
    distinct = {m.image.sha256: m.split for m in members}
    if len(distinct) < minimum:
        return (
            f"{organ}/{diagnosis} has {len(distinct)} distinct image(s); "
            f"at least {minimum} are needed (prepare.min_images_per_diagnosis)"
        )
    present = set(distinct.values())
    empty = [s for s in SPLITS if fractions.get(s, 1.0) > 0 and s not in present]
    if empty:
        return (
            f"{organ}/{diagnosis} has {len(distinct)} distinct images but none fall in the "
            f"{' and '.join(empty)} split (images of one group or near-duplicate cluster "
            "share a split); add images or groups to this diagnosis"
        )
    return None


def _label(placed, organs) -> list[Assigned]:
    first_copy: dict[tuple[str, str], str] = {}
    rows = []
    for row in sorted(placed, key=lambda p: p.image.key):
        image = row.image
        if image.organ not in organs or image.diagnosis not in organs[image.organ]:
            continue
        duplicate_of = first_copy.setdefault((image.organ, image.sha256), image.key)
        rows.append(
            replace(
                row,
                label=organs[image.organ].index(image.diagnosis),
                duplicate_of=None if duplicate_of == image.key else duplicate_of,
            )
        )
    return rows


def _reject(image: CheckedImage, reason: str, detail: str) -> Rejection:
    return Rejection(image.key, reason, detail, image.organ, image.diagnosis)
