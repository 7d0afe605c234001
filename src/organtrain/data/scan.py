"""Listing an image tree into candidate images and rejections.

Two layouts, mixed freely in one tree:

    <organ>/<diagnosis>/<image>             an image on its own
    <organ>/<diagnosis>/<group>/<image>     an image of one patient, slide or specimen

The group folder is what keeps tiles of one slide together: every image of a group gets
the group's split (see assign.py), whatever diagnosis folder it sits in.
"""

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
    group: str | None = None  # the patient/slide/specimen folder, when the layout has one
    metadata: str | None = None  # the groups table's other columns (groups.py), JSON


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
    if len(parts) not in (3, 4):
        return Rejection(
            key,
            "bad_layout",
            f"expected <organ>/<diagnosis>/<image> or <organ>/<diagnosis>/<group>/<image>, "
            f"found {len(parts)} path level(s); move the file into its organ's diagnosis "
            "folder (one patient/slide folder level at most)",
        )
    organ, diagnosis, name = parts[0], parts[1], parts[-1]
    group = parts[2] if len(parts) == 4 else None
    named = [("organ folder", organ), ("diagnosis folder", diagnosis), ("file name", name)]
    if group is not None:
        named.insert(2, ("group folder", group))
    for label, part in named:
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
    return Candidate(key, organ, diagnosis, size, group)
