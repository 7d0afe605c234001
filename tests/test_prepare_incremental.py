"""Incremental prepare (#13 item 1): unchanged files are not read again, an unchanged source
reads nothing, and the result is the one a cold prepare gives.

Reads are counted on the real sources: a spy on LocalStorage's read methods (the only way
`prepare` reads a local file), and the GET requests SeaweedFS itself counted for the bucket
(its Prometheus metrics), for a source in S3.
"""

import json
import os
import re
import shutil
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from organtrain.cli import main
from organtrain.config import PrepareConfig
from organtrain.data.dataset import load_dataset, read_manifest, shard_object_key
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import prepare
from organtrain.data.shards import read_shard
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import LocalStorage, open_storage

CFG = PrepareConfig(
    dataset="t",
    test_fraction=0.25,
    val_fraction=0.2,
    min_images_per_diagnosis=5,
    max_image_side=32,
    images_per_shard=8,
    workers=2,
)
SETTINGS = ("test_fraction", "val_fraction", "min_images_per_diagnosis", "max_image_side",
            "images_per_shard", "workers")  # fmt: skip
CHANGED = "lung/benign/probe.bmp"  # rewritten with other pixels, same size
ADDED = "lung/adenocarcinoma/arrived.bmp"
DELETED = "lung/benign/gone.bmp"
BROKEN = "lung/benign/broken.png"  # fails its check: a rejection that is reused too


def noise_bmp(path: Path, seed: int) -> None:
    """A 16×16 BMP of random pixels: every one has the same size (822 bytes), so a rewrite
    is told by its modification time alone."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="BMP")


def make_tree(root: Path) -> Path:
    write_synthetic_tree(
        root, organs={"lung": ["adenocarcinoma", "benign"]}, images_per_diagnosis=16,
        image_size=32, seed=0, progress=False,
    )  # fmt: skip
    noise_bmp(root / CHANGED, seed=1)
    noise_bmp(root / DELETED, seed=2)
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "notes.txt").write_text("not an image: left out from the listing alone")
    return root


@pytest.fixture
def reads(monkeypatch):
    """Every (storage root, key) read through LocalStorage, whichever object reads it (the
    CLI makes its own)."""
    seen: list[tuple[Path, str]] = []
    get_bytes, download = LocalStorage.get_bytes, LocalStorage.download

    def counted_get_bytes(self, key, **kwargs):
        seen.append((self.root, key))
        return get_bytes(self, key, **kwargs)

    def counted_download(self, key, path, **kwargs):
        seen.append((self.root, key))
        return download(self, key, path, **kwargs)

    monkeypatch.setattr(LocalStorage, "get_bytes", counted_get_bytes)
    monkeypatch.setattr(LocalStorage, "download", counted_download)
    return seen


def source_reads(reads: list, src: Path) -> list[str]:
    """The source files read since the last call (the list is emptied)."""
    keys = sorted(key for root, key in reads if root == src.absolute())
    reads.clear()
    return keys


def images_of(src: Path) -> list[str]:
    return sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix in (".png", ".bmp")
    )


def version_tables(dest: LocalStorage, version: str):
    base = f"datasets/t/{version}"
    return (
        read_manifest(dest, load_dataset(dest, "t", version)).to_pylist(),
        read_parquet(dest.get_bytes(f"{base}/rejected.parquet")).to_pylist(),
        {s.key: s.sha256 for s in load_dataset(dest, "t", version).shards},
    )


def version_content(dest: LocalStorage, version: str):
    """What a version holds, whichever shards hold it: the manifest rows without the shard
    column, the rejections, and every record of each organ's split. An incremental prepare
    keeps the previous version's shards (test_prepare_pool.py), so its shards are cut
    differently from a cold prepare's; what they hold is the same."""
    rows, rejected, _ = version_tables(dest, version)
    index = load_dataset(dest, "t", version)
    records = {}
    for shard in index.shards:
        records.setdefault((shard.organ, shard.split), []).extend(
            read_shard(dest.path(shard_object_key(index, shard)))
        )
    return (
        [{k: v for k, v in r.items() if k != "shard"} for r in rows],
        rejected,
        {split: sorted(held, key=lambda r: r.sha256) for split, held in records.items()},
    )


def cli_prepare(src: Path, store: Path, *extra: str) -> int:
    return main(["prepare", str(src), "--dest", str(store), "--dataset", "t", "--no-progress",
                 *(f"--set=prepare.{k}={getattr(CFG, k)}" for k in SETTINGS), *extra])  # fmt: skip


def test_unchanged_rerun_reads_no_file_and_rehash_reads_all(tmp_path, reads, capsys):
    src = make_tree(tmp_path / "src")
    store = tmp_path / "store"
    assert cli_prepare(src, store) == 0
    assert source_reads(reads, src) == images_of(src)  # the first version reads every image
    first = capsys.readouterr().out

    # The listing is what it was: the latest version is the answer, nothing read or written.
    written = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert cli_prepare(src, store) == 0
    assert source_reads(reads, src) == []
    assert written == {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = capsys.readouterr().out
    assert "unchanged, nothing written" in again
    # The same report as the run that wrote the version: images, rejections and reasons.
    assert again.splitlines()[1:] == first.splitlines()[1:]
    assert "rejected: 1 bad_layout, 1 not_an_image;" in again  # the broken file, unread

    # --rehash reads every file again and finds the same version.
    assert cli_prepare(src, store, "--rehash") == 0
    assert source_reads(reads, src) == images_of(src)
    assert "unchanged, nothing written" in capsys.readouterr().out


def test_changed_added_and_deleted_files_and_the_same_result_as_a_cold_prepare(tmp_path, reads):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    first = prepare(LocalStorage(src), dest, CFG, progress=False)
    source_reads(reads, src)
    old_rows = {r["key"]: r for r in version_tables(dest, first.version)[0]}

    before = (src / CHANGED).stat()
    noise_bmp(src / CHANGED, seed=3)  # same name and size, new bytes
    os.utime(src / CHANGED, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (src / CHANGED).stat().st_size == before.st_size
    noise_bmp(src / ADDED, seed=4)
    (src / DELETED).unlink()

    second = prepare(LocalStorage(src), dest, CFG, progress=False)
    assert source_reads(reads, src) == sorted([CHANGED, ADDED])  # and only they
    assert second.created and second.version != first.version
    rows, rejected, _ = version_tables(dest, second.version)
    by_key = {r["key"]: r for r in rows}
    assert DELETED in old_rows and DELETED not in by_key
    assert ADDED in by_key
    assert by_key[CHANGED]["sha256"] != old_rows[CHANGED]["sha256"]
    for key, row in old_rows.items():  # unchanged files keep their split
        if key in by_key and key != CHANGED:
            assert by_key[key]["split"] == row["split"]

    # A cold prepare of the same tree, with no earlier version, reads everything and gives
    # the same version: the same manifest rows, splits, rejections and shard records.
    cold_dest = LocalStorage(tmp_path / "cold")
    cold = prepare(LocalStorage(src), cold_dest, CFG, progress=False)
    assert source_reads(reads, src) == images_of(src)
    assert cold.version == second.version
    assert version_content(cold_dest, cold.version) == version_content(dest, second.version)
    assert [(r["key"], r["reason"]) for r in rejected] == [
        (BROKEN, "not_an_image"),
        ("notes.txt", "bad_layout"),
    ]


def test_a_source_in_s3_unchanged_makes_no_get(tmp_path, s3_uri, seaweedfs):
    tree = make_tree(tmp_path / "tree")
    source = open_storage(f"{s3_uri}/incoming")
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            source.put_file(path.relative_to(tree).as_posix(), path)
    dest = LocalStorage(tmp_path / "store")  # so every GET on the bucket is a source read
    bucket = s3_uri.removeprefix("s3://").split("/")[0]

    gets = _s3_gets(seaweedfs, bucket)
    first = prepare(source, dest, CFG, progress=False)
    assert _s3_gets(seaweedfs, bucket, at_least=gets + 1) - gets == len(images_of(tree))

    gets = _s3_gets(seaweedfs, bucket)
    again = prepare(source, dest, CFG, progress=False)
    assert (again.version, again.created) == (first.version, False)
    time.sleep(0.5)  # a late request would have been counted by now
    assert _s3_gets(seaweedfs, bucket) == gets

    noise_bmp(tmp_path / "new.bmp", seed=5)
    source.put_file(ADDED, tmp_path / "new.bmp")  # a new ETag, and one GET to read it
    gets = _s3_gets(seaweedfs, bucket)
    third = prepare(source, dest, CFG, progress=False)
    assert third.created and third.images == first.images + 1
    time.sleep(0.5)
    assert _s3_gets(seaweedfs, bucket) - gets == 1


def _s3_gets(server, bucket: str, at_least: int = 0, timeout: float = 5.0) -> int:
    """GET requests SeaweedFS counted for `bucket` (waiting, up to `timeout`, for at least
    `at_least`: a counter may be bumped just after the response)."""
    pattern = re.compile(
        r'^SeaweedFS_s3_request_total\{bucket="' + re.escape(bucket) + r'",code="\d+",'
        r'type="GET"\} (\d+)', re.MULTILINE,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        count = sum(int(n) for n in pattern.findall(text))
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def test_a_version_without_the_reuse_columns_is_read_once_then_not(tmp_path, reads):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    first = prepare(LocalStorage(src), dest, CFG, progress=False)
    # As an organtrain before incremental prepare wrote it: no listing digest in LATEST.json,
    # no encoded size or listing tag in the manifest, no size or tag in rejected.parquet.
    base = tmp_path / "store" / "datasets" / "t"
    for name, drop in (("manifest", ["encoded_width", "encoded_height", "source_tag"]),
                       ("rejected", ["bytes", "source_tag"])):  # fmt: skip
        path = base / first.version / f"{name}.parquet"
        pq.write_table(pq.read_table(path).drop_columns(drop), path)
    latest = json.loads((base / "LATEST.json").read_text())
    (base / "LATEST.json").write_text(json.dumps({k: latest[k] for k in ("version", "images",
                                                                          "organs")}))  # fmt: skip
    source_reads(reads, src)

    again = prepare(LocalStorage(src), dest, CFG, progress=False)
    assert (again.version, again.created) == (first.version, False)
    assert source_reads(reads, src) == images_of(src)  # read once, no crash
    assert prepare(LocalStorage(src), dest, CFG, progress=False).version == first.version
    assert source_reads(reads, src) == []  # LATEST.json now holds the listing

    # Another image setting: what the files gave no longer holds, every one is read again.
    other = prepare(LocalStorage(src), dest, replace(CFG, max_image_side=24), progress=False)
    assert other.created and source_reads(reads, src) == images_of(src)


def test_a_damaged_previous_shard_is_not_copied_its_images_are_read(tmp_path, reads):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    first = prepare(LocalStorage(src), dest, CFG, progress=False)
    rows, _, _ = version_tables(dest, first.version)
    index = load_dataset(dest, "t")
    damaged = index.shards[0]
    path = tmp_path / "store" / shard_object_key(index, damaged)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # One of its images is deleted: the shard is not kept, its other images are rewritten,
    # from the source, since the damaged shard they are in cannot vouch for them.
    in_damaged = [r["key"] for r in rows if r["shard"] == damaged.key and not r["duplicate_of"]]
    (src / in_damaged[0]).unlink()
    noise_bmp(src / ADDED, seed=4)
    source_reads(reads, src)

    second = prepare(LocalStorage(src), dest, CFG, progress=False)
    assert source_reads(reads, src) == sorted([ADDED, *in_damaged[1:]])
    cold_dest = LocalStorage(tmp_path / "cold")
    cold = prepare(LocalStorage(src), cold_dest, CFG, progress=False)
    assert version_content(cold_dest, cold.version) == version_content(dest, second.version)


def test_a_copied_tree_in_another_folder_is_read_again(tmp_path, reads):
    """Reuse is tied to the source a version was prepared from: `cp -p` keeps sizes and
    modification times, but the folder is another one."""
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    first = prepare(LocalStorage(src), dest, CFG, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # copy2: times kept
    source_reads(reads, src)
    again = prepare(LocalStorage(copy), dest, CFG, progress=False)
    assert again.version == first.version
    assert source_reads(reads, copy) == images_of(copy)
