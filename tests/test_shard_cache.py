"""Shard verification once per node: verified stamps in the node cache, and corruption that
a stat cannot see caught by TFRecord's record checksums when the pipeline reads it.

Real shards from `prepare`, a real SeaweedFS server for S3, real TensorFlow reads. Hashing
is observed, not replaced: a spy counts the calls to the real sha256_file, and
/proc/self/io counts the bytes a process read.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras
import pytest

import organtrain.data.cache as cache
from organtrain.config import PrepareConfig
from organtrain.data.cache import CorruptShardError, FileIdentity, local_shard, shard_read_errors
from organtrain.data.dataset import load_dataset
from organtrain.data.pipeline import build_dataset, shard_files
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ChecksumMismatchError
from organtrain.storage import LocalStorage, open_storage

CFG = PrepareConfig(dataset="sc", test_fraction=0.2, val_fraction=0.2, min_images_per_diagnosis=5,
                    max_image_side=32, images_per_shard=6, workers=2)  # fmt: skip
ORGAN, SPLIT = "lung", "train"
LAST_NIGHT = time.time_ns() - 12 * 3600 * 10**9


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset in a local folder, its shards dated last night (as when trials
    run on data prepared earlier; a file written seconds ago is not stamped, see
    test_a_shard_written_moments_ago_is_hashed_until_it_is_older)."""
    tree = tmp_path_factory.mktemp("src")
    write_synthetic_tree(tree, organs={ORGAN: ["adenocarcinoma", "benign"]},
                         images_per_diagnosis=20, image_size=32, progress=False)  # fmt: skip
    root = tmp_path_factory.mktemp("store")
    prepare(LocalStorage(tree), LocalStorage(root), CFG, progress=False)
    for shard in root.rglob("*.tfrecord"):
        os.utime(shard, ns=(LAST_NIGHT, LAST_NIGHT))
    return root


@pytest.fixture
def node_cache(tmp_path, monkeypatch) -> Path:
    """A fresh node: nothing cached, nothing stamped."""
    path = tmp_path / "node-cache"
    monkeypatch.setenv("ORGANTRAIN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def local_store(prepared, tmp_path) -> LocalStorage:
    """This test's own copy of the dataset (copy2 keeps the shards' dates), free to damage."""
    return LocalStorage(shutil.copytree(prepared, tmp_path / "store"))


@pytest.fixture
def s3_store(prepared, s3_uri):
    store, source = open_storage(s3_uri), LocalStorage(prepared)
    for info in source.list("datasets"):
        store.put_file(info.key, source.path(info.key))
    return store


@pytest.fixture(params=["local", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


HASHED: list[str] = []  # the files the node cache hashed, in this process (the spy's record)


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The files the node cache hashes: the real sha256_file, wrapped to record each call."""
    real = cache.sha256_file
    HASHED.clear()

    def spy(path):
        HASHED.append(str(path))
        return real(path)

    monkeypatch.setattr(cache, "sha256_file", spy)
    return HASHED


def bytes_read() -> int:
    """All bytes this process has read so far (page-cache hits included)."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return int(next(x for x in lines if x.startswith("rchar:")).split()[1])


def _trial(store_uri: str) -> tuple[int, int, int]:
    """What a trial does before training, in its own process: open its organ's shards.
    Returns (shards hashed, shards downloaded, bytes read). The hashes are counted by a
    spy around the real sha256_file, installed here, in the trial's own process."""
    hashed: list[str] = []
    real = cache.sha256_file

    def spy(path):
        hashed.append(str(path))
        return real(path)

    store = open_storage(store_uri)
    index = load_dataset(store, CFG.dataset)
    cache.sha256_file, read_before = spy, bytes_read()
    try:
        opened = [local_shard(store, index, s) for s in index.shards_for(ORGAN, SPLIT)]
    finally:
        cache.sha256_file = real
    downloaded = sum(o.downloaded for o in opened)
    return len(hashed), downloaded, bytes_read() - read_before


def _trials(store, n: int) -> list[tuple[int, int, int]]:
    """`n` trials starting together on this node, each in its own process. Spawned, not
    forked: a child forked from a process that ran TensorFlow can wait forever on locks
    held by TensorFlow's threads, which the child does not have (a CI run hung here)."""
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        return pool.map(_trial, [store.uri] * n)


def _stamp_of(node_cache: Path, shard_path: Path) -> Path:
    (stamp,) = node_cache.rglob(f"{shard_path.name}.verified")
    return stamp


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a record: its CRC32C no longer matches
    path.write_bytes(bytes(data))


def _rot(path: Path, stamp: Path) -> None:
    """A byte flipped by the disk itself: no timestamp moves. Userland cannot write without
    moving the ctime, so the stamp is brought up to the file's new stat instead."""
    _flip_a_byte(path)
    record = json.loads(stamp.read_text())
    stamp.write_text(json.dumps(record | asdict(FileIdentity.of(path))))


def _images_read(files: list[str]) -> int:
    ds = build_dataset(files, image_size=16, batch_size=64, training=False, cache_images=False)
    return sum(int(labels.shape[0]) for _, labels in ds)


def test_trials_on_a_node_hash_each_shard_once_then_open_it_with_a_stat(store, node_cache, hashes):
    index = load_dataset(store, CFG.dataset)
    shards = index.shards_for(ORGAN, SPLIT)
    shard_bytes = sum(s.bytes for s in shards)
    assert len(shards) >= 3

    # Four trials start together on a fresh node: the lock lets one verify each shard
    # (from S3, its download is the verification) while the others wait for its stamp.
    together = _trials(store, 4)
    hashed, downloaded = sum(t[0] for t in together), sum(t[1] for t in together)
    if isinstance(store, LocalStorage):
        assert (hashed, downloaded) == (len(shards), 0)
    else:
        assert (hashed, downloaded) == (0, len(shards))

    # A later trial opens every shard at once: no hash, no download, and it reads the
    # stamps, not the shards.
    ((later_hashed, later_downloaded, later_read),) = _trials(store, 1)
    assert (later_hashed, later_downloaded) == (0, 0)
    assert later_read < shard_bytes / 10, f"read {later_read} bytes for {shard_bytes} of shards"


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["edited", "edited-mtime-restored"])
def test_a_shard_changed_after_verification_is_hashed_again_and_caught(
    store, node_cache, hashes, restore_mtime
):
    index = load_dataset(store, CFG.dataset)
    shard = index.shards_for(ORGAN, SPLIT)[0]
    path = local_shard(store, index, shard).path
    before = path.stat()
    _flip_a_byte(path)
    if restore_mtime:  # e.g. `touch -r`: the mtime hides the edit, the ctime does not
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    hashes.clear()
    if isinstance(store, LocalStorage):
        # The dataset's own file: an error naming it and the command that repairs it,
        # every time (no stamp vouches for it any more).
        for _ in range(2):
            with pytest.raises(ChecksumMismatchError, match=rf"{shard.key}.*--repair"):
                local_shard(store, index, shard)
        assert hashes == [str(path)] * 2
    else:
        # The node's copy: dropped and fetched again, then trusted.
        assert local_shard(store, index, shard).downloaded and hashes == [str(path)]
        assert not local_shard(store, index, shard).downloaded and len(hashes) == 1
        assert _images_read([str(path)]) == shard.images


def test_damage_no_stat_can_see_is_caught_when_the_pipeline_reads_it(s3_store, node_cache):
    index = load_dataset(s3_store, CFG.dataset)
    files = shard_files(s3_store, index, ORGAN, SPLIT)
    damaged = Path(files[1])
    _rot(damaged, _stamp_of(node_cache, damaged))
    assert shard_files(s3_store, index, ORGAN, SPLIT) == files  # the stamp still vouches

    reading = shard_read_errors()
    with pytest.raises(CorruptShardError, match="corrupted record") as caught, reading:
        _images_read(files)
    message = str(caught.value)
    assert str(damaged) in message and "fetched again" in message
    assert all(f not in message for f in files if f != str(damaged))
    # The damaged copy and its stamp are gone: the next attempt downloads the shard anew.
    assert not damaged.exists() and not list(node_cache.rglob(f"{damaged.name}.verified"))
    shard = index.shards_for(ORGAN, SPLIT)[1]
    assert local_shard(s3_store, index, shard).downloaded
    assert _images_read(files) == index.split_size(ORGAN, SPLIT)


def _drop_keras_state() -> None:
    keras.backend.clear_session()
    gc.collect()


def test_damage_no_stat_can_see_in_a_local_dataset_stops_training_with_its_repair(
    local_store, node_cache, hashes, request
):
    index = load_dataset(local_store, CFG.dataset)
    files = shard_files(local_store, index, ORGAN, SPLIT)
    damaged = Path(files[0])
    _rot(damaged, _stamp_of(node_cache, damaged))
    hashes.clear()
    train = build_dataset(shard_files(local_store, index, ORGAN, SPLIT), image_size=16,
                          batch_size=4, training=True, seed=0)  # fmt: skip
    assert hashes == []  # opened on the stamp's word, as a later trial would
    request.addfinalizer(_drop_keras_state)  # before any later test forks
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])  # fmt: skip
    model.compile("sgd", "sparse_categorical_crossentropy")

    training = shard_read_errors(files)  # around fit, as training wraps it
    with pytest.raises(CorruptShardError, match="--repair") as caught, training:
        model.fit(train, epochs=1, shuffle=False, verbose=0)
    assert str(damaged) in str(caught.value)
    assert damaged.exists()  # the user's data is never deleted
    # Its stamp is gone: the next trial hashes it and stops before training.
    with pytest.raises(ChecksumMismatchError, match=index.shards_for(ORGAN, SPLIT)[0].key):
        shard_files(local_store, index, ORGAN, SPLIT)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00\xff not json", b'{"sha256": "', b"[1, 2]", b'{"sha256": "0"}', "another sha"],
    ids=["empty", "binary", "truncated", "list", "partial", "another-sha256"],
)
def test_a_garbage_or_stale_stamp_is_ignored_and_replaced(local_store, node_cache, hashes, garbage):
    index = load_dataset(local_store, CFG.dataset)
    shard = index.shards_for(ORGAN, SPLIT)[0]
    path = local_shard(local_store, index, shard).path
    stamp = _stamp_of(node_cache, path)
    if garbage == "another sha":  # e.g. left by a version whose shard had other bytes
        record = json.loads(stamp.read_text())
        garbage = json.dumps(record | {"sha256": "0" * 64}).encode()
    stamp.write_bytes(garbage)
    hashes.clear()
    assert local_shard(local_store, index, shard).path == path
    assert hashes == [str(path)]  # not trusted: hashed again
    assert json.loads(stamp.read_text())["sha256"] == shard.sha256  # and stamped anew
    local_shard(local_store, index, shard)
    assert hashes == [str(path)]


def test_a_stamp_is_published_whole_or_not_at_all(local_store, node_cache, hashes, monkeypatch):
    index = load_dataset(local_store, CFG.dataset)
    shard = index.shards_for(ORGAN, SPLIT)[0]

    def crash(src, dst):  # publishing the stamp fails, as on a full disk
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        path = local_shard(local_store, index, shard).path  # verified all the same
    assert hashes == [str(path)]
    written = [p for p in node_cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert written == []  # no stamp, and no half-written one left under another name
    local_shard(local_store, index, shard)  # hashed again, and now stamped
    local_shard(local_store, index, shard)
    assert hashes == [str(path)] * 2


def test_a_shard_written_moments_ago_is_hashed_until_it_is_older(local_store, node_cache, hashes):
    """A file time is coarse (1-10 ms on Linux, 1 s on Lustre, 2 s on FAT): an edit in the
    same tick as the verification would keep the mtime the stamp records. A shard that
    changed within the last seconds is therefore not stamped."""
    index = load_dataset(local_store, CFG.dataset)
    shard = index.shards_for(ORGAN, SPLIT)[0]
    path = local_shard(local_store, index, shard).path
    path.write_bytes(path.read_bytes())  # rewritten now, same bytes
    hashes.clear()
    local_shard(local_store, index, shard)
    local_shard(local_store, index, shard)
    assert hashes == [str(path)] * 2
    os.utime(path, ns=(LAST_NIGHT, LAST_NIGHT))  # as it will be, seconds later
    local_shard(local_store, index, shard)
    local_shard(local_store, index, shard)
    assert hashes == [str(path)] * 3
