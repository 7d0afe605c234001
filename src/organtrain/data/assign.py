"""From checked images to dataset rows: labels, splits, duplicates, and what is left out.

Pure functions of the checked images and the settings, so the whole decision can be
tested without touching storage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Assigned:
    """A checked image with its split and label (label -1 until the organ is settled)."""

    image: CheckedImage
    split: str
    label: int
    duplicate_of: str | None


@dataclass
class Assignment:
    rows: list[Assigned]  # every image in the dataset, sorted by key
    rejected: list[Rejection]  # images left out here, with reasons
    organs: dict[str, list[str]]  # organ -> its diagnoses, in label order
    excluded: list[dict]  # one entry per organ or diagnosis left out


def assign(
    images: list[CheckedImage],
    *,
    test_fraction: float,
    val_fraction: float,
    min_images_per_diagnosis: int,
) -> Assignment:
    images, rejected = _drop_conflicting_labels(images)
    groups: dict[tuple[str, str], list[CheckedImage]] = defaultdict(list)
    for image in images:
        groups[(image.organ, image.diagnosis)].append(image)

    fractions = {"test": test_fraction, "val": val_fraction, "train": 1.0}
    kept: dict[str, list[str]] = defaultdict(list)
    excluded: list[dict] = []
    for (organ, diagnosis), members in sorted(groups.items()):
        problem = _diagnosis_problem(
            members, fractions, min_images_per_diagnosis, test_fraction, val_fraction
        )
        if problem:
            excluded.append({"organ": organ, "diagnosis": diagnosis, "reason": problem})
            rejected += [_reject(m, "diagnosis_too_small", problem) for m in members]
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
            _reject(m, "organ_single_diagnosis", problem)
            for d in diagnoses
            for m in groups[(organ, d)]
        ]

    rows = _label_and_split(images, organs, test_fraction, val_fraction)
    return Assignment(rows, sorted(rejected, key=lambda r: r.key), organs, excluded)


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


def _diagnosis_problem(members, fractions, minimum, test_fraction, val_fraction) -> str | None:
    distinct = {m.sha256 for m in members}
    organ, diagnosis = members[0].organ, members[0].diagnosis
    if len(distinct) < minimum:
        return (
            f"{organ}/{diagnosis} has {len(distinct)} distinct image(s); "
            f"at least {minimum} are needed (prepare.min_images_per_diagnosis)"
        )
    per_split = {s: 0 for s in SPLITS}
    for sha in distinct:
        per_split[split_of(sha, test_fraction=test_fraction, val_fraction=val_fraction)] += 1
    empty = [s for s in SPLITS if fractions[s] > 0 and per_split[s] == 0]
    if empty:
        return (
            f"{organ}/{diagnosis} has {len(distinct)} distinct images but none fall in the "
            f"{' and '.join(empty)} split; add images to this diagnosis"
        )
    return None


def _label_and_split(images, organs, test_fraction, val_fraction) -> list[Assigned]:
    first_copy: dict[tuple[str, str], str] = {}
    rows = []
    for image in sorted(images, key=lambda i: i.key):
        if image.organ not in organs or image.diagnosis not in organs[image.organ]:
            continue
        content = (image.organ, image.sha256)
        duplicate_of = first_copy.setdefault(content, image.key)
        rows.append(
            Assigned(
                image=image,
                split=split_of(
                    image.sha256, test_fraction=test_fraction, val_fraction=val_fraction
                ),
                label=organs[image.organ].index(image.diagnosis),
                duplicate_of=None if duplicate_of == image.key else duplicate_of,
            )
        )
    return rows


def _reject(image: CheckedImage, reason: str, detail: str) -> Rejection:
    return Rejection(image.key, reason, detail, image.organ, image.diagnosis)
