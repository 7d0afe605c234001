"""The storage interface: one small set of operations, a local and an S3 backend.

Every write is atomic (readers see the old object or the whole new one, never a part)
and records the sha256 of what was written; reads verify it when the caller knows the
expected digest (shard indexes record one per shard) or the backend stored one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from organtrain.errors import ChecksumMismatchError

CHUNK = 1 << 20  # bytes hashed per read


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int  # bytes
    sha256: str | None = None  # hex digest, when the backend knows it without reading
    version_tag: str | None = None  # ETag or mtime: changes when the object changes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SkippedEntry:
    """Something in a local tree that is not listed as an object, and why: a symbolic
    link out of the tree or in a loop, a FIFO, socket or device, an unreadable folder."""

    key: str
    reason: str  # a code: symlink_loop, symlink_outside_source, broken_symlink, ...
    detail: str  # a sentence for people, saying what to do


def verify_checksum(url: str, expected: str | None, actual: str, *, advice: str = "") -> None:
    """Raise ChecksumMismatchError when `actual` is not `expected`. `advice` says what to
    run to repair this kind of object; the error keeps url/expected/actual as attributes
    so a caller that knows more (a dataset's shard readers) can rephrase it."""
    if expected is not None and expected != actual:
        error = ChecksumMismatchError(
            f"checksum mismatch for {url}: expected sha256 {expected[:16]}…, got {actual[:16]}…. "
            "The object was corrupted or changed after it was written; "
            + (advice or "delete it and re-run the command that wrote it.")
        )
        error.url, error.expected, error.actual = url, expected, actual
        raise error


class Storage(ABC):
    """A tree of objects under one root: a local folder or an s3://bucket/prefix."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The root, as a user would write it."""

    def url(self, key: str) -> str:
        """The full address of `key`, for messages."""
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def sub(self, prefix: str) -> Storage:
        """A view of the same backend rooted at `prefix`."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Write `data` atomically under `key`; returns its size and sha256."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        """Upload the local file `path` atomically under `key`."""

    @abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Read `key`; raises ChecksumMismatchError when the bytes do not match."""

    @abstractmethod
    def download(self, key: str, path: str | Path, *, sha256: str | None = None) -> None:
        """Copy `key` to the local file `path` (atomically), verifying its checksum."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and (where stored) sha256 of `key`; None when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`, recursively, sorted by key."""

    def list_checked(self, prefix: str = "") -> tuple[list[ObjectInfo], list[SkippedEntry]]:
        """`list`, plus what a tree holds that must not be read as an object (symbolic
        links out of it or in a loop, FIFOs, devices), for reporting. An object store
        holds objects only."""
        return list(self.list(prefix)), []

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is already gone."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Publish `data` at `key` only if nothing is there, atomically; False if something
        was. The building block of locks: of two writers, exactly one gets True."""
        raise NotImplementedError(f"{type(self).__name__} cannot create objects exclusively")

    def tune_location(self, key: str):
        """(path, pyarrow filesystem or None) for Ray Tune's `storage_path`: Tune writes
        its experiment state and checkpoints itself, through pyarrow."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold Ray Tune state")

    def checksum(self, key: str) -> str | None:
        """The sha256 of `key` (stored, or computed by reading it); None if absent."""
        info = self.stat(key)
        if info is None:
            return None
        return info.sha256 or sha256_bytes(self.get_bytes(key))
