"""A local folder as storage: the embedded default, and any shared filesystem."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from organtrain.errors import ObjectNotFoundError, StorageError
from organtrain.storage.base import (
    ObjectInfo,
    SkippedEntry,
    Storage,
    sha256_bytes,
    sha256_file,
    verify_checksum,
)
from organtrain.storage.keys import validate_key

TMP_MARK = ".tmp-"  # partial files carry this in their name and never show in listings
_SPECIAL_KINDS = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket",
                  stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}  # fmt: skip


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
            fd, tmp = _new_temp_file(target)
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
            data = _read_regular_file(path)
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
        """Regular files under `prefix`, following symbolic links (a storage folder may
        link to another disk) but never round a loop; FIFOs, sockets and devices are left
        out, so no reader can block on one."""
        found = [e for e in self._walk(prefix, confined=False) if isinstance(e, ObjectInfo)]
        yield from sorted(found, key=lambda info: info.key)

    def list_checked(self, prefix: str = "") -> tuple[list[ObjectInfo], list[SkippedEntry]]:
        """For reading a source tree: symbolic links are followed only while they stay
        inside the root (a link to /etc/hostname or to another lab's folder is not data of
        this tree), and everything not listed is named with its reason."""
        objects, skipped = [], []
        for entry in self._walk(prefix, confined=True):
            (objects if isinstance(entry, ObjectInfo) else skipped).append(entry)
        return sorted(objects, key=lambda o: o.key), sorted(skipped, key=lambda s: s.key)

    def _walk(self, prefix: str, *, confined: bool) -> Iterator[ObjectInfo | SkippedEntry]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        root_real = os.path.realpath(self.root)
        # The folders above the one being read, by (device, inode): a link to one of them
        # is a loop, however it is spelt.
        above = frozenset(
            _identity(p) for p in (base, *base.parents) if p.is_relative_to(self.root)
        )
        yield from self._walk_folder(base, above, root_real, confined)

    def _walk_folder(self, folder: Path, above: frozenset, root_real: str, confined: bool):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            yield SkippedEntry(
                self._key(folder),
                "unreadable",
                f"the folder cannot be read ({err.strerror}); check its permissions",
            )
            return
        for entry in entries:
            if TMP_MARK in entry.name:
                continue
            path, key = Path(entry.path), self._key(Path(entry.path))
            try:
                st = os.stat(path)  # follows symbolic links
            except OSError as err:
                yield _unstattable(key, path, err, entry.is_symlink())
                continue
            if entry.is_symlink():
                real = os.path.realpath(path)
                if confined and os.path.commonpath([root_real, real]) != root_real:
                    yield SkippedEntry(
                        key,
                        "symlink_outside_source",
                        f"a symbolic link to {real}, outside the source {self.root}; "
                        "links out of the source are not followed: copy the file "
                        "into the tree to include it",
                    )
                    continue
            if stat.S_ISDIR(st.st_mode):
                if _identity(path) in above:
                    yield SkippedEntry(
                        key,
                        "symlink_loop",
                        f"a symbolic link to {os.path.realpath(path)}, a folder "
                        "that contains it: following it would never end",
                    )
                    continue
                yield from self._walk_folder(path, above | {_identity(path)}, root_real, confined)
            elif stat.S_ISREG(st.st_mode):
                yield ObjectInfo(key=key, size=st.st_size, version_tag=str(st.st_mtime_ns))
            else:
                kind = _SPECIAL_KINDS.get(stat.S_IFMT(st.st_mode), "special file")
                yield SkippedEntry(
                    key,
                    "not_a_regular_file",
                    f"a {kind}, not a regular file: only regular files are read "
                    "(reading a FIFO or device could block for ever)",
                )

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unstattable(key: str, path: Path, err: OSError, is_link: bool) -> SkippedEntry:
    if err.errno == errno.ELOOP:
        return SkippedEntry(
            key, "symlink_loop", "a symbolic link that leads back to itself: it points nowhere"
        )
    if is_link:
        return SkippedEntry(
            key, "broken_symlink", f"a symbolic link to {os.readlink(path)!r}, which does not exist"
        )
    return SkippedEntry(key, "unreadable", f"cannot be read ({err.strerror})")


def _new_temp_file(target: Path) -> tuple[int, str]:
    """A new, empty temporary file beside `target`, created by open(2) with mode 0666 so
    the process umask applies as for any file (mkstemp makes 0600 files whatever the
    umask, and they stay 0600 once renamed into place)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}{TMP_MARK}{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        return fd, str(tmp)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, refusing anything but a regular file: opened non-blocking (a
    FIFO opens at once instead of waiting for a writer) and checked before any read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode), "folder or special file")
            raise StorageError(f"cannot read {path}: it is a {kind}, not a regular file")
        return f.read()
