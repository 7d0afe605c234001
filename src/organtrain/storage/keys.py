"""Storage keys: '/'-separated relative paths, checked before any backend sees them.

Keys are built from folder names in user data (organ and diagnosis names), so a folder
called `..` or a name with a newline must never turn into a path outside the storage root
or a confusing object name.
"""

from __future__ import annotations

import unicodedata

from organtrain.errors import StorageError


def key_part_problem(part: str) -> str | None:
    """Why `part` cannot be one component of a key, or None when it can."""
    if not part:
        return "is empty"
    if part in (".", ".."):
        return f"is {part!r}, which would point outside its folder"
    if "/" in part or "\\" in part:
        return "contains a path separator"
    if any(unicodedata.category(ch) == "Cc" for ch in part):
        return "contains a control character"
    if part != part.strip():
        return "starts or ends with whitespace"
    return None


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative key, else raise StorageError."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: it is empty")
    if key.startswith("/"):
        raise StorageError(f"invalid storage key {key!r}: keys are relative, not absolute paths")
    for part in key.split("/"):
        problem = key_part_problem(part)
        if problem:
            raise StorageError(f"invalid storage key {key!r}: component {part!r} {problem}")
    return key


def join_key(*parts: str) -> str:
    """Join key fragments with '/', dropping empty ones (a root prefix may be '')."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
