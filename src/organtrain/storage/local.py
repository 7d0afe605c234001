"""A local folder as storage: the embedded default, and any shared filesystem."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from organtrain.errors import ObjectNotFoundError, StorageError
from organtrain.storage.base import (
    ObjectInfo,
    Storage,
    sha256_bytes,
    sha256_file,
    verify_checksum,
)
from organtrain.storage.keys import validate_key

TMP_MARK = ".tmp-"  # partial files carry this in their name and never show in listings


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()

    @property
    def uri(self) -> str:
        return str(self.root)

    def sub(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.path(prefix))

    def tune_location(self, key: str):
        return str(self.path(key)), None

    def path(self, key: str) -> Path:
        """The local file behind `key`."""
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._publish(key, lambda f: f.write(data), sha256_bytes(data))

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f)

        return self._publish(key, copy, sha256_file(path))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write a temporary file, then hard-link it to the target: link(2) fails if the
        target exists, so exactly one of concurrent writers (processes, NFS clients) wins,
        and the winner's file is complete when it appears."""
        try:
            self._publish(key, lambda f: f.write(data), sha256_bytes(data), exclusive=True)
            return True
        except FileExistsError:
            return False

    def _publish(self, key: str, write, digest: str, *, exclusive: bool = False) -> ObjectInfo:
        """Write into a temporary file beside the target, fsync, then rename over it (or,
        `exclusive`, hard-link it: FileExistsError if the target exists)."""
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    os.link(tmp, target)
                else:
                    os.replace(tmp, target)  # atomic on POSIX: the old or the new file
            finally:
                Path(tmp).unlink(missing_ok=True)
        except FileExistsError:
            raise
        except OSError as err:
            raise StorageError(f"cannot write {target}: {err.strerror or err}") from None
        return ObjectInfo(key=key, size=target.stat().st_size, sha256=digest)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path} does not exist") from None
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err.strerror or err}") from None
        verify_checksum(str(path), sha256, sha256_bytes(data))
        return data

    def download(self, key: str, path: str | Path, *, sha256: str | None = None) -> None:
        source = self.path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"{source} does not exist")
        dest = LocalStorage(Path(path).parent)
        copied = dest.put_file(Path(path).name, source)
        try:
            verify_checksum(str(source), sha256, copied.sha256)
        except StorageError:
            dest.delete(Path(path).name)
            raise

    def stat(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, version_tag=str(st.st_mtime_ns))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.path(prefix) if prefix else self.root
        found = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if TMP_MARK in name:
                    continue
                path = Path(dirpath, name)
                st = path.stat()
                key = path.relative_to(self.root).as_posix()
                found.append(ObjectInfo(key=key, size=st.st_size, version_tag=str(st.st_mtime_ns)))
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
