"""`prepare` under stress: two at once, special files in the source, damaged shards,
a full disk, and the permissions of what it writes."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_prepare import CFG, make_tree, png_bytes, run, tables

from organtrain.cli import main
from organtrain.config import PrepareConfig
from organtrain.data.dataset import fetch_shard, load_dataset, shard_object_key
from organtrain.data.prepare import prepare
from organtrain.data.prepare import repair as repair_version
from organtrain.errors import ChecksumMismatchError, DataError, StorageError
from organtrain.storage import LocalStorage, open_storage

PREPARE_ARGS = [
    "--dataset",
    "t",
    "--no-progress",
    "--set",
    "prepare.min_images_per_diagnosis=5",
    "--set",
    "prepare.images_per_shard=8",
    "--set",
    "prepare.max_image_side=32",
]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`organtrain ...` in its own process, as a user or scheduler runs it."""
    return subprocess.run(
        [sys.executable, "-m", "organtrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verify_every_shard(dest, tmp_path: Path, dataset: str = "t") -> int:
    """Download every shard of the latest version against its recorded sha256."""
    index = load_dataset(dest, dataset)
    for n, shard in enumerate(index.shards):
        fetch_shard(dest, index, shard, tmp_path / "verify" / f"{n}.tfrecord")
    return len(index.shards)


# --- one writer at a time ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_prepares_at_once_publish_one_version_and_the_other_exits_3(tmp_path, request, backend):
    src = make_tree(tmp_path / "src")
    dest = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("s3_uri")
    args = ["prepare", str(src), "--dest", dest, *PREPARE_ARGS]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "organtrain", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        outcomes.append((proc.returncode, out, err))
    written = [o for o in outcomes if o[0] == 0 and "(written)" in o[1]]
    assert len(written) == 1, outcomes
    other = next(o for o in outcomes if o is not written[0])
    # The loser either found the lock taken (exit 3, naming the holder's pid), or came
    # after the winner had finished and found the version already there.
    if other[0] == 3:
        assert "locked by another process (pid" in other[2], other
        assert "Traceback" not in other[2]
    else:
        assert other[0] == 0 and "unchanged, nothing written" in other[1], other
    store = open_storage(dest)
    assert verify_every_shard(store, tmp_path) > 4
    assert not store.exists("datasets/t/prepare.lock")  # released


class HeldAtFirstShard(LocalStorage):
    """A destination whose first shard upload waits for `release`: it holds a `prepare`
    in the window between deciding to write a version and publishing it."""

    def __init__(self, root, reached: threading.Event, release: threading.Event):
        super().__init__(root)
        self.reached, self.release = reached, release

    def sub(self, prefix: str) -> HeldAtFirstShard:
        return HeldAtFirstShard(self.path(prefix), self.reached, self.release)

    def put_file(self, key, path):
        self.reached.set()
        assert self.release.wait(300), "the test never released the first prepare"
        return super().put_file(key, path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_prepare_while_one_is_writing_exits_3_naming_the_holder(tmp_path):
    """The race made certain: the second `prepare` (a real process) starts while the first
    is half-way through writing the same version. Without a lock both published it."""
    src = make_tree(tmp_path / "src")
    store = tmp_path / "store"
    same_as_cli = PrepareConfig(
        dataset="t", min_images_per_diagnosis=5, images_per_shard=8, max_image_side=32, workers=2
    )
    reached, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            prepare,
            LocalStorage(src),
            HeldAtFirstShard(store, reached, release),
            same_as_cli,
            progress=False,
        )
        try:
            assert reached.wait(120)
            second = cli("prepare", str(src), "--dest", str(store), *PREPARE_ARGS)
        finally:
            release.set()
        result = first.result(timeout=120)
    assert result.created
    assert second.returncode == 3, second.stdout + second.stderr
    assert f"dataset t in {store} is locked by another process (pid {os.getpid()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert verify_every_shard(LocalStorage(store), tmp_path) > 4
    assert not LocalStorage(store).exists("datasets/t/prepare.lock")  # released


# --- special files in the source ------------------------------------------------------------


@pytest.fixture
def special_tree(tmp_path) -> tuple[Path, dict[str, str]]:
    """A tree with a symlink loop, a FIFO named like an image, symlinks out of the tree,
    a dangling symlink, a hidden image and an in-tree symlink; and the reasons expected."""
    src = make_tree(tmp_path / "src")
    benign = src / "lung" / "benign"
    first = sorted(benign.glob("*.png"))[0].name
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    (outside / "secret.png").write_bytes(png_bytes("RGB", (20, 20)))
    (outside / "more" / "x.png").write_bytes(png_bytes("RGB", (21, 21)))
    os.symlink(benign / "loop.png", benign / "loop.png")  # points at itself
    os.symlink("..", benign / "up")  # a folder loop: lung/benign/up -> lung/
    os.mkfifo(benign / "x.png")  # reading it would block for ever
    os.symlink(outside / "secret.png", benign / "outside.png")
    os.symlink("/etc/hostname", benign / "hostname.png")
    os.symlink(outside / "more", src / "lung" / "elsewhere")  # a folder outside
    os.symlink(benign / "gone.png", benign / "dangling.png")
    os.symlink(first, benign / "alias.png")  # inside the tree: followed
    (benign / ".hidden.png").write_bytes((benign / first).read_bytes())
    (benign / ".DS_Store").write_bytes(b"\0\1")  # junk: skipped quietly
    (benign / "._0001.png").write_bytes(b"\0\5\26\7")  # macOS resource fork: quietly
    expected = {
        "lung/benign/loop.png": "symlink_loop",
        "lung/benign/up": "symlink_loop",
        "lung/benign/x.png": "not_a_regular_file",
        "lung/benign/outside.png": "symlink_outside_source",
        "lung/benign/hostname.png": "symlink_outside_source",
        "lung/elsewhere": "symlink_outside_source",
        "lung/benign/dangling.png": "broken_symlink",
        "lung/benign/.hidden.png": "hidden",
    }
    return src, expected


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_special_files_are_rejected_with_reasons_and_never_read(tmp_path, special_tree):
    src, expected = special_tree
    store = tmp_path / "store"
    # Its own process, with a timeout: before the fix the FIFO blocked the read for ever.
    done = cli("prepare", str(src), "--dest", str(store), *PREPARE_ARGS, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    dest = LocalStorage(store)
    version = load_dataset(dest, "t").version
    manifest, rejected = tables(dest, version)
    reasons = {r["key"]: r["reason"] for r in rejected}
    assert reasons == expected
    rejected_by_key = {r["key"]: r for r in rejected}
    assert "outside the source" in rejected_by_key["lung/benign/hostname.png"]["detail"]
    assert "rename it" in rejected_by_key["lung/benign/.hidden.png"]["detail"]
    keys = {r["key"] for r in manifest}
    assert "lung/benign/alias.png" in keys  # an in-tree symlink is followed ...
    by_key = {r["key"]: r for r in manifest}
    target = os.readlink(src / "lung" / "benign" / "alias.png")
    pair = {"lung/benign/alias.png", f"lung/benign/{target}"}
    # ... and stored once: one of the two is recorded as a copy of the other.
    assert {by_key[k]["duplicate_of"] for k in pair} - {None} <= pair
    assert sum(by_key[k]["duplicate_of"] is None for k in pair) == 1
    assert not any(k.startswith("lung/benign/up/") for k in keys)
    assert len(manifest) == 81  # 80 images + the alias; nothing from outside
    assert "8 file(s) rejected" in done.stdout


@pytest.mark.timeout(60)
def test_local_listing_survives_special_files(special_tree):
    src, expected = special_tree
    storage = LocalStorage(src)
    keys = {info.key for info in storage.list()}  # no loop error, no hang
    never = {
        "lung/benign/loop.png",
        "lung/benign/up",
        "lung/benign/x.png",
        "lung/benign/dangling.png",
    }
    assert not never & keys
    assert "lung/benign/alias.png" in keys
    # A source tree's listing also stops at its edge, and names everything it left out.
    objects, skipped = storage.list_checked()
    assert {s.key: s.reason for s in skipped} == {
        key: reason for key, reason in expected.items() if reason != "hidden"
    }
    assert {"lung/benign/.hidden.png", "lung/benign/alias.png"} <= {o.key for o in objects}
    with pytest.raises(StorageError, match="not a regular file"):
        storage.get_bytes("lung/benign/x.png")


# --- damaged shards and `prepare --repair` --------------------------------------------------


def test_repair_rewrites_missing_and_corrupt_shards_from_the_source(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    store = tmp_path / "store"
    args = ["prepare", str(src), "--dest", str(store), *PREPARE_ARGS]
    assert main(args) == 0
    dest = LocalStorage(store)
    index = load_dataset(dest, "t")
    corrupt, lost = index.shards[0], index.shards[-1]
    data = bytearray((store / shard_object_key(index, corrupt)).read_bytes())
    data[len(data) // 2] ^= 0x01
    (store / shard_object_key(index, corrupt)).write_bytes(bytes(data))
    (store / shard_object_key(index, lost)).unlink()

    # The reader's message says exactly what to run.
    with pytest.raises(ChecksumMismatchError) as caught:
        fetch_shard(dest, index, corrupt, tmp_path / "c.tfrecord")
    repair = (
        f"organtrain prepare {src} --dest {store} --dataset t --version {index.version} --repair"
    )
    assert repair in str(caught.value)
    capsys.readouterr()
    assert main([*repair.split()[1:], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 of" in out and "rewritten" in out, out
    assert verify_every_shard(dest, tmp_path) == len(index.shards)
    # Nothing left to do: a second repair only verifies.
    assert main([*repair.split()[1:], "--no-progress"]) == 0
    assert "all" in capsys.readouterr().out

    # A source file changed since: the shard cannot be rebuilt byte for byte; say so.
    row = next(r for r in tables(dest, index.version)[0] if r["shard"] == corrupt.key)
    (src / row["key"]).write_bytes(png_bytes("RGB", (23, 23)))
    (store / shard_object_key(index, corrupt)).unlink()
    with pytest.raises(DataError, match=rf"{row['key']}.*changed.*new version"):
        repair_version(LocalStorage(src), dest, CFG, version=index.version, progress=False)


def test_plain_prepare_does_not_call_a_version_with_missing_shards_unchanged(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    store = tmp_path / "store"
    args = ["prepare", str(src), "--dest", str(store), *PREPARE_ARGS]
    assert main(args) == 0
    index = load_dataset(LocalStorage(store), "t")
    (store / shard_object_key(index, index.shards[1])).unlink()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "unchanged" not in out and "repaired 1 shard" in out, out
    assert verify_every_shard(LocalStorage(store), tmp_path) == len(index.shards)


# --- clear errors, clean failures, permissions ----------------------------------------------


def test_missing_source_folder_is_named_as_such(tmp_path, capsys):
    code = main(
        ["prepare", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "s"), *PREPARE_ARGS]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "prepare.source" in err and "nowhere" in err
    assert "no images found" not in err


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A real tmpfs of `size_kb` at `path` (root only); None where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


class FillsUp(LocalStorage):
    """A local folder whose disk is full after `room` bytes: a write beyond it fails with
    the operating system's ENOSPC error, through LocalStorage's own error and clean-up
    path (used where no tmpfs can be mounted)."""

    def __init__(self, root, room: list[int]):
        super().__init__(root)
        self.room = room  # shared by every sub-view, like one disk

    def sub(self, prefix: str) -> FillsUp:
        return FillsUp(self.path(prefix), self.room)

    def _publish(self, key, write, digest, *, exclusive=False):
        def write_until_full(f):
            write(f)
            f.flush()
            self.room[0] -= f.tell()
            if self.room[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return super()._publish(key, write_until_full, digest, exclusive=exclusive)


def test_a_prepare_that_runs_out_of_space_leaves_no_unpublished_shards(tmp_path):
    src = make_tree(tmp_path / "src", per_diagnosis=30)
    disk = tmp_path / "disk"
    with small_disk(disk, size_kb=96) as mounted:
        dest = LocalStorage(disk) if mounted else FillsUp(disk, room=[60_000])
        with pytest.raises(StorageError, match="No space left on device"):
            run(src, dest)
        left = [p for p in disk.rglob("*") if p.is_file()]
        assert left == [], left  # the shards it had written are gone, no temporaries
        assert not dest.exists("datasets/t/LATEST.json")


def test_published_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        LocalStorage(tmp_path).put_bytes("a/b.json", b"{}")
        assert stat.S_IMODE((tmp_path / "a" / "b.json").stat().st_mode) == 0o644
        os.umask(0o077)
        LocalStorage(tmp_path).put_bytes("a/c.json", b"{}")
        assert stat.S_IMODE((tmp_path / "a" / "c.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_s3_download_follows_the_umask(tmp_path, s3_uri):
    store = open_storage(s3_uri)
    store.put_bytes("x.bin", b"payload")
    old = os.umask(0o022)
    try:
        store.download("x.bin", tmp_path / "x.bin")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o644
