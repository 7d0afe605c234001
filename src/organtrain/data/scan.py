"""Listing an `<organ>/<diagnosis>/<image>` tree into candidate images and rejections."""

from __future__ import annotations

from dataclasses import dataclass

from organtrain.data.images import SUPPORTED_EXTENSIONS
from organtrain.storage import Storage, key_part_problem


@dataclass(frozen=True)
class Candidate:
    """A file that is laid out like an image of one organ and diagnosis."""

    key: str  # relative to the source root, e.g. lung/benign/0001.png
    organ: str
    diagnosis: str
    size: int  # bytes


@dataclass(frozen=True)
class Rejection:
    """A file left out of the dataset, with a reason code and a sentence for people."""

    key: str
    reason: str
    detail: str
    organ: str | None = None
    diagnosis: str | None = None


def scan_tree(source: Storage) -> tuple[list[Candidate], list[Rejection]]:
    """Every file under `source`, sorted by key, as a candidate image or a rejection.

    Hidden files and folders (.DS_Store, .git, ...) are skipped silently; anything else
    that is not an image at <organ>/<diagnosis>/<file> is rejected with its reason.
    """
    candidates, rejected = [], []
    for info in source.list():
        parts = info.key.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        outcome = _classify(info.key, parts, info.size)
        (candidates if isinstance(outcome, Candidate) else rejected).append(outcome)
    return candidates, rejected


def _classify(key: str, parts: list[str], size: int) -> Candidate | Rejection:
    if len(parts) != 3:
        return Rejection(
            key,
            "bad_layout",
            f"expected <organ>/<diagnosis>/<image>, found {len(parts)} path level(s); "
            "move the file into its organ's diagnosis folder",
        )
    organ, diagnosis, name = parts
    for label, part in (
        ("organ folder", organ),
        ("diagnosis folder", diagnosis),
        ("file name", name),
    ):
        problem = key_part_problem(part)
        if problem:
            return Rejection(
                key, "invalid_name", f"the {label} {part!r} {problem}", organ, diagnosis
            )
    if not name.lower().endswith(SUPPORTED_EXTENSIONS):
        return Rejection(
            key,
            "unsupported_extension",
            f"not one of {', '.join(SUPPORTED_EXTENSIONS)} (any case)",
            organ,
            diagnosis,
        )
    return Candidate(key, organ, diagnosis, size)
