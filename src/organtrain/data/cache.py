"""The node-local shard cache: each shard is downloaded once per node and verified once.

Several trials on one node (separate Ray worker processes) often start at the same time
and ask for the same shards. A file lock per shard makes one of them download while the
others wait; the download is verified against the sha256 in the dataset index and then
renamed into place, so no process ever reads a partial or corrupt shard.

Hashing a shard means reading all of it (sha256 runs at 0.1-2 GB/s, depending on the
CPU), so a verified shard gets a stamp in the node cache: the sha256 the index expects and
the file's identity (size, mtime, ctime, inode). A later trial compares the stamp with a
stat of the file and opens the shard at once when they agree; a file that was written,
replaced or touched since is hashed again, and a cached copy found damaged is dropped and
fetched anew. Shards in a local storage folder are verified where they are, their stamps
kept in the node cache too (under `verified-in-place/`), never next to the user's data.

What no stat can see, a bit flipped by the disk itself, TFRecord's per-record CRC32C
catches when the pipeline reads the shard. `shard_read_errors`, around whatever iterates
the pipeline, turns TensorFlow's bare "corrupted record" into a CorruptShardError that
names the shard, drops its stamp (and a damaged cache copy) and says what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from organtrain.data.dataset import (
    DatasetIndex,
    ShardEntry,
    dataset_prefix,
    repair_advice,
    repair_command,
    shard_object_key,
)
from organtrain.errors import ChecksumMismatchError
from organtrain.storage import LocalStorage, Storage, sha256_file, verify_checksum

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/organtrain/shards"
STAMP_SUFFIX = ".verified"
IN_PLACE = "verified-in-place"  # stamps of shards read where they are (local storage)
STAMP_FORMAT = 1
# File times are coarse: a kernel tick (1-10 ms) on Linux file systems, 1 s on Lustre and
# ext3, 2 s on FAT. An edit in the same tick as a verification would keep the mtime its
# stamp records, so a file changed this recently is not stamped (as git's "racily clean"
# index entries), and a copy this cache writes is dated this far back.
RACY_NS = 2 * 10**9


@dataclass(frozen=True)
class CachedShard:
    path: Path  # a local, verified TFRecord file
    downloaded: bool  # False: it was already on this node (or storage is a local folder)


class CorruptShardError(ChecksumMismatchError):
    """A shard failed TFRecord's record checksum while being read: damage no stat saw."""


@dataclass(frozen=True)
class FileIdentity:
    """What a stat says about a file's bytes without reading them."""

    size: int
    mtime_ns: int
    ctime_ns: int  # moves on any write, and also when a tool puts the mtime back
    inode: int  # a file replaced by rename (cp, rsync, a re-run prepare) is another inode

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True)
class _Opened:
    """A shard this process verified (or trusted by its stamp) and handed to a pipeline."""

    sha256: str
    stamp: Path
    lock: Path
    cache_copy: bool  # True: the node's copy, dropped and fetched again when damaged
    repair: str  # for the dataset's own file: the command that rewrites it


# path -> how it was opened, for shard_read_errors to find which file a read error means.
_OPENED: dict[str, _Opened] = {}


def cache_root(cache_dir: str | None = None) -> Path:
    """ORGANTRAIN_CACHE_DIR, else `cache_dir`, else ~/.cache/organtrain/shards."""
    chosen = os.environ.get("ORGANTRAIN_CACHE_DIR") or cache_dir or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def local_shard(
    storage: Storage, index: DatasetIndex, shard: ShardEntry, cache_dir: str | None = None
) -> CachedShard:
    """A verified local copy of `shard`, downloaded at most once and hashed at most once
    per node (until the file changes)."""
    with repair_advice(storage, index):  # a damaged shard's error says what to run
        return _local_shard(storage, index, shard, cache_dir)


def _local_shard(storage, index, shard, cache_dir) -> CachedShard:
    key = shard_object_key(index, shard)
    # The cache mirrors the dataset's folder: a pool shard (named by its sha256) is one
    # file on the node whichever versions list it; a shard a version owns is under it.
    within = Path(*key.removeprefix(dataset_prefix(index.dataset) + "/").split("/"))
    if isinstance(storage, LocalStorage):
        # Already a local file: verify it where it is instead of copying it.
        stamp = cache_root(cache_dir) / IN_PLACE / index.dataset / within
        stamp = stamp.with_name(stamp.name + STAMP_SUFFIX)
        return _in_place_shard(storage.path(key), shard, stamp, repair_command(storage, index))
    path = cache_root(cache_dir) / index.dataset / within
    return _cached_shard(storage, key, shard, path)


def _in_place_shard(path: Path, shard: ShardEntry, stamp: Path, repair: str) -> CachedShard:
    _OPENED.pop(str(path), None)  # listed again once verified
    _verify_in_place(path, shard.sha256, stamp)
    _OPENED[str(path)] = _Opened(shard.sha256, stamp, Path(f"{stamp}.lock"), False, repair)
    return CachedShard(path, downloaded=False)


def _cached_shard(storage: Storage, key: str, shard: ShardEntry, path: Path) -> CachedShard:
    _OPENED.pop(str(path), None)
    stamp = path.with_name(path.name + STAMP_SUFFIX)
    lock = Path(f"{path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        downloaded = not _cached_copy_is_good(path, shard.sha256, stamp)
        if downloaded:
            _download(storage, key, shard.sha256, path, stamp)
    _OPENED[str(path)] = _Opened(shard.sha256, stamp, lock, True, "")
    return CachedShard(path, downloaded=downloaded)


def _cached_copy_is_good(path: Path, sha256: str, stamp: Path) -> bool:
    """Whether the node already holds a good copy; a damaged one is deleted."""
    if not path.exists():
        return False
    try:
        _verify(path, sha256, stamp)
        return True
    except ChecksumMismatchError:
        log.warning("cached shard %s is corrupt; fetching it again", path)
        path.unlink()
        return False


def _download(storage: Storage, key: str, sha256: str, path: Path, stamp: Path) -> None:
    """Fetch `key` (the download checks its sha256) into place, dated back so that no
    later write can leave its mtime as stamped, and stamp it."""
    fetching = path.with_name(f".{path.name}.fetching")  # one writer: we hold the lock
    try:
        storage.download(key, fetching, sha256=sha256)
        now = time.time_ns()
        os.utime(fetching, ns=(now, now - 2 * RACY_NS))
        os.replace(fetching, path)
    finally:
        fetching.unlink(missing_ok=True)
    _write_stamp(stamp, path, sha256, FileIdentity.of(path))


def _verify_in_place(path: Path, sha256: str, stamp: Path) -> None:
    """Verify a shard of a local storage folder; under a lock, so that trials starting
    together hash it once."""
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{stamp}.lock")
        lock.acquire()
    except OSError as err:  # a read-only or full cache: slower, still correct
        log.warning("no stamps in %s (%s): %s is hashed on every use", stamp.parent, err, path)
        verify_checksum(str(path), sha256, sha256_file(path))
        return
    try:
        _verify(path, sha256, stamp)
    finally:
        lock.release()


def _verify(path: Path, sha256: str, stamp: Path) -> None:
    """Raise ChecksumMismatchError unless `path` holds the bytes the index expects.
    Hashes it only when its stamp does not vouch for the file as it is now."""
    if _stamp_vouches(stamp, path, sha256):
        return
    stamp.unlink(missing_ok=True)  # stale or garbage: it must not outlive this check
    identity = FileIdentity.of(path)
    verify_checksum(str(path), sha256, sha256_file(path))
    if FileIdentity.of(path) == identity:  # not written to while it was being hashed
        _write_stamp(stamp, path, sha256, identity)


def _stamp_record(path: Path, sha256: str, identity: FileIdentity) -> dict:
    return {"format": STAMP_FORMAT, "path": str(path), "sha256": sha256, **asdict(identity)}


def _stamp_vouches(stamp: Path, path: Path, sha256: str) -> bool:
    """Whether `stamp` records that `path`, exactly as a stat sees it now, was verified
    to hold `sha256`. Anything else in the stamp (garbage, another file's, another
    version's digest) is no evidence."""
    try:
        recorded = json.loads(stamp.read_bytes())
        return recorded == _stamp_record(path, sha256, FileIdentity.of(path))
    except (OSError, ValueError):  # no stamp, unreadable, not JSON, no such file
        return False


def _write_stamp(stamp: Path, path: Path, sha256: str, identity: FileIdentity) -> None:
    """Publish the stamp whole (temp file + rename) or not at all. A stamp only saves
    work, so failing to write one is a warning; a file modified within RACY_NS of now
    gets none (see RACY_NS)."""
    if identity.mtime_ns > time.time_ns() - RACY_NS:
        return
    record = json.dumps(_stamp_record(path, sha256, identity)).encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=stamp.parent, prefix=f".{stamp.name}.", suffix=".tmp")
    except OSError as err:
        log.warning("could not stamp %s as verified (%s); it will be hashed again", path, err)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        os.replace(tmp, stamp)
    except OSError as err:
        log.warning("could not stamp %s as verified (%s); it will be hashed again", path, err)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def shard_read_errors(files: Iterable[str] | None = None) -> Iterator[None]:
    """Around code that iterates a pipeline of shards from `local_shard` (Keras fit,
    evaluate, predict): TFRecord's "corrupted record" (tf.errors.DataLossError), a byte
    changed where no stat could see it, becomes a CorruptShardError naming the shard.

    The shards this process opened (or only `files`) are hashed again to find which one
    it was: its stamp is dropped, a damaged cache copy deleted so the next attempt
    fetches it anew, and the error says what to run for a damaged dataset file."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.DataLossError as err:
        raise _corrupt_shard_error(err.message, files) from err


def _corrupt_shard_error(detail: str, files: Iterable[str] | None) -> CorruptShardError:
    found = re.search(r"corrupted record[^\n\[]*", detail)  # "corrupted record at N"
    detail = found.group(0).strip() if found else detail.strip().splitlines()[-1][:200]
    candidates = list(_OPENED) if files is None else [str(f) for f in files]
    damaged = [p for p in candidates if p in _OPENED and not _recheck(Path(p), _OPENED[p])]
    if not damaged:
        return CorruptShardError(
            f"a shard failed TFRecord's record checksum while being read ({detail}), but "
            f"the {len(candidates)} shard(s) this process opened all match their sha256 "
            "now: the damage was in reading, not in the files. Run the command again; if "
            "it recurs, check this node's disk and memory"
        )
    what_to_do = []
    for path in damaged:
        opened = _OPENED.pop(path)
        what_to_do.append(
            f"{path} was removed from this node's shard cache and is fetched again when "
            "the command runs again (a failed trial: retry or resume the sweep)"
            if opened.cache_copy
            else f"{path} is the dataset's own file, damaged where it is stored: rewrite it "
            f"from the source images with `{opened.repair}`"
        )
    error = CorruptShardError(
        f"{len(damaged)} shard(s) failed TFRecord's record checksum while being read "
        f"({detail}) and no longer match the sha256 in their dataset index (damaged after "
        f"they were verified, by a change no stat could see): {'; '.join(what_to_do)}"
    )
    error.paths = damaged
    return error


def _recheck(path: Path, opened: _Opened) -> bool:
    """Hash `path` again, ignoring its stamp: True when it is still good (stamped anew);
    False when damaged (stamp dropped; a cache copy deleted)."""
    try:
        with FileLock(opened.lock):
            opened.stamp.unlink(missing_ok=True)
            try:
                _verify(path, opened.sha256, opened.stamp)
                return True
            except ChecksumMismatchError:
                if opened.cache_copy:
                    path.unlink(missing_ok=True)
                return False
    except OSError:  # gone since (another trial dropped it): nothing left to blame
        return True
