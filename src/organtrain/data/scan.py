"""Listing an image tree into candidate images and rejections.

Two layouts, mixed freely in one tree:

    <organ>/<diagnosis>/<image>             an image on its own
    <organ>/<diagnosis>/<group>/<image>     an image of one patient, slide or specimen

The group folder is what keeps tiles of one slide together: every image of a group gets
the group's split (see assign.py), whatever diagnosis folder it sits in.
"""

from __future__ import annotations

import functools
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
    # The listing's change marker (local: mtime in ns; S3: ETag). With the size, what an
    # incremental prepare compares to reuse what it learnt from the file last time.
    tag: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A file left out of the dataset, with a reason code and a sentence for people."""

    key: str
    reason: str
    detail: str
    organ: str | None = None
    diagnosis: str | None = None
    # Set only when the file itself was read and failed its check (images.py): its size and
    # listing tag then, so an unchanged bad file is not read again (incremental.py).
    bytes: int | None = None
    source_tag: str | None = None


def scan_tree(source: Storage) -> tuple[list[Candidate], list[Rejection]]:
    """Every file under `source`, sorted by key, as a candidate image or a rejection.

    Only regular files are read. Symbolic links are followed while they stay inside the
    source (the same file twice is handled as identical files); links out of it or in a
    loop, FIFOs, sockets and devices are rejected with their reason (storage/local.py).
    Hidden image files (`.name.png`) are rejected as `hidden`, saying how to include them;
    other hidden files and everything in hidden folders (.DS_Store, `._name` AppleDouble
    files, .git, .Trash, .snapshot) are skipped silently: not data, and often copies.
    """
    objects, skipped = source.list_checked()
    candidates, rejected = [], []
    for info in objects:
        parts = info.key.split("/")
        if _is_hidden(parts):
            if _is_hidden_image(parts):
                rejected.append(_hidden_rejection(info.key, parts))
            continue
        outcome = _classify(info.key, parts, info.size, info.version_tag)
        (candidates if isinstance(outcome, Candidate) else rejected).append(outcome)
    for entry in skipped:
        parts = entry.key.split("/")
        if not _is_hidden(parts):
            organ, diagnosis = (parts[0], parts[1]) if len(parts) in (3, 4) else (None, None)
            rejected.append(Rejection(entry.key, entry.reason, entry.detail, organ, diagnosis))
    return candidates, sorted(rejected, key=lambda r: r.key)


def _is_hidden(parts: list[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def _is_hidden_image(parts: list[str]) -> bool:
    """An image file whose own name starts with a dot (not one in a hidden folder, nor a
    macOS `._name` resource fork, which only looks like one)."""
    name = parts[-1]
    return (
        not _is_hidden(parts[:-1])
        and not name.startswith("._")
        and name.lower().endswith(SUPPORTED_EXTENSIONS)
    )


def _hidden_rejection(key: str, parts: list[str]) -> Rejection:
    organ, diagnosis = (parts[0], parts[1]) if len(parts) in (3, 4) else (None, None)
    return Rejection(
        key,
        "hidden",
        "a hidden file (its name starts with a dot), so it is left out; rename it without "
        "the leading dot to include it",
        organ,
        diagnosis,
    )


# A tree has few folder names and many files in each: each name is checked once (the
# listing is all an unchanged prepare does, so its cost per file is the prepare's).
_folder_problem = functools.lru_cache(maxsize=1 << 16)(key_part_problem)


def _classify(key: str, parts: list[str], size: int, tag: str | None) -> Candidate | Rejection:
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
        problem = key_part_problem(part) if label == "file name" else _folder_problem(part)
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
    return Candidate(key, organ, diagnosis, size, group, tag=tag)
