"""Retention (#13 item 3): `organtrain datasets list | gc` on a local folder and on S3.

gc keeps the newest versions, the latest, and every version a registered model was trained
on, with exactly the pool shards they list; it removes other versions, folders of runs that
never finished and pool shards nothing lists. gc and `prepare` share the dataset's lock:
neither runs while the other holds it.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_prepare import make_tree, run
from test_prepare_pool import CFG, ORGANS, add_images, verify_every_shard

from organtrain import registry
from organtrain.cli import main
from organtrain.data import neardup, retention
from organtrain.data.dataset import fetch_shard, load_dataset, shard_object_key, signatures_key
from organtrain.data.prepare import DatasetLocked, prepare
from organtrain.errors import DataError
from organtrain.runlocks import organ_lock, run_lock
from organtrain.storage import LocalStorage, open_storage

LEFTOVER_SHARD = "datasets/t/shards/lung/train-" + "0" * 64 + ".tfrecord"
LEFTOVER_VERSION = "datasets/t/0123456789ab/manifest.parquet"


@dataclass
class Versions:
    storage: object
    uri: str
    src: Path
    versions: list[str]  # oldest first


def three_versions(tmp: Path, uri: str) -> Versions:
    """Three versions (lung grows each time), a model registered on the oldest, and what a
    prepare that died before publishing leaves: a pool shard and a folder no index lists."""
    src = make_tree(tmp / "src", organs=ORGANS)
    storage = open_storage(uri)
    versions = [run(src, storage, CFG).version]
    for seed in (21, 22):
        add_images(src, tmp, "lung", per_diagnosis=2, seed=seed)
        versions.append(run(src, storage, CFG).version)
    model = tmp / "model.keras"
    model.write_bytes(b"a model file")
    registry.register(storage, registry.ModelVersion(
        organ="lung", version="run-1", created="2026-12-01T00:00:00+00:00", run_id="run-1",
        source="runs/run-1", model="simple_cnn", classes=ORGANS["lung"], settings={},
        test_metrics={"accuracy": 0.5}, test_images=8, dataset="t",
        dataset_version=versions[0], fingerprint="f", code_version="0",
    ), model)  # fmt: skip
    storage.put_bytes(LEFTOVER_SHARD, b"written by a prepare that never published")
    storage.put_bytes(LEFTOVER_VERSION, b"a version that never got its dataset.json")
    return Versions(storage, uri, src, versions)


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_gc_keeps_exactly_what_is_referenced(tmp_path, request, backend, capsys):
    uri = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("s3_uri")
    v = three_versions(tmp_path, uri)
    storage, (oldest, middle, newest) = v.storage, v.versions
    args = ["--dataset", "t", "--storage", uri]
    everything = {info.key for info in storage.list("datasets")}

    assert main(["datasets", "list", *args]) == 0
    listed = capsys.readouterr().out
    assert listed.index(newest) < listed.index(middle) < listed.index(oldest)
    assert "models: lung/run-1" in listed and "incomplete" in listed

    assert main(["datasets", "gc", "--keep", "1", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert f"would remove: {middle}" in out and "would remove 2 version(s)" in out
    assert {info.key for info in storage.list("datasets")} == everything  # nothing removed

    assert main(["datasets", "gc", "--keep", "1", *args]) == 0
    out = capsys.readouterr().out
    assert f"kept: {oldest} (models trained on it: lung/run-1)" in out
    assert f"kept: {newest} (one of the 1 newest; LATEST.json names it)" in out
    kept = [load_dataset(storage, "t", version) for version in (oldest, newest)]
    method = neardup.SIGNATURE_METHOD  # each shard has its images' signatures beside it
    referenced = {shard_object_key(index, s) for index in kept for s in index.shards} | {
        f"datasets/t/{signatures_key(s.key, method)}" for index in kept for s in index.shards
    }
    pool = {info.key for info in storage.list("datasets/t/shards")}
    assert pool == referenced  # the leftover and the middle version's own shards are gone
    folders = {info.key.split("/")[2] for info in storage.list("datasets/t")}
    assert folders == {oldest, newest, "shards", "LATEST.json"}
    with pytest.raises(DataError, match="never completed"):
        load_dataset(storage, "t", middle)
    for index in kept:
        for n, shard in enumerate(index.shards):
            fetch_shard(storage, index, shard, tmp_path / "verify" / f"{n}.tfrecord")

    # Nothing left to remove: a second gc removes nothing.
    assert main(["datasets", "gc", "--keep", "1", *args]) == 0
    assert "removed 0 version(s) and 0 pool shard(s)" in capsys.readouterr().out


def test_gc_keeps_the_version_a_running_sweep_or_train_reads(tmp_path, capsys):
    """A version only a running run reads stays while its lock is held by a live process
    (a sweep: its plan names the version; a train: its organ's checkpoint does), and goes
    once the holder is gone."""
    store = tmp_path / "store"
    v = three_versions(tmp_path, str(store))
    storage, (_, middle, _) = v.storage, v.versions
    args = ["datasets", "gc", "--keep", "1", "--dataset", "t", "--storage", str(store)]
    plan = {"run_id": "sweep-1", "dataset": "t", "dataset_version": middle}
    storage.put_bytes("runs/sweep-1/sweep.json", json.dumps(plan).encode())
    state = {"dataset_version": middle, "monitor": "val_loss", "epoch": 3}
    storage.put_bytes("runs/train-1/lung/checkpoint/state.json", json.dumps(state).encode())

    with run_lock(storage, "sweep-1"):  # held by this live process
        assert main(["datasets", "list", "--dataset", "t", "--storage", str(store)]) == 0
        assert f"{middle}" in (listed := capsys.readouterr().out)
        assert "; read by running run sweep-1" in listed
        assert main(args) == 0
    assert f"kept: {middle} (read by running run sweep-1)" in capsys.readouterr().out
    with organ_lock(storage, "train-1", "lung"):
        assert main(args) == 0
    assert f"kept: {middle} (read by running run train-1)" in capsys.readouterr().out

    # A lock whose holder died on this host reads no version: the version goes.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"what": "run sweep-1", "host": socket.gethostname(), "pid": dead.pid,
              "heartbeat": time.time()}  # fmt: skip
    storage.put_bytes("locks/runs/sweep-1.json", json.dumps(record).encode())
    assert main(args) == 0
    assert f"  removed: {middle}" in capsys.readouterr().out
    with pytest.raises(DataError, match="never completed"):
        load_dataset(storage, "t", middle)


class HeldBeforeIndex(LocalStorage):
    """A destination whose manifest upload waits for `release`: a `prepare` held after it
    wrote its new pool shards and before the dataset.json that lists them."""

    def __init__(self, root, reached: threading.Event, release: threading.Event):
        super().__init__(root)
        self.reached, self.release = reached, release

    def sub(self, prefix: str):
        return HeldBeforeIndex(self.path(prefix), self.reached, self.release)

    def put_bytes(self, key, data):
        if key.endswith("manifest.parquet"):
            self.reached.set()
            assert self.release.wait(120), "the test never released the prepare"
        return super().put_bytes(key, data)


@pytest.mark.timeout(300)
def test_gc_and_prepare_do_not_run_at_once(tmp_path, capsys):
    """gc during a prepare exits 3 naming it and removes nothing (the prepare's new pool
    shards are listed by no version yet); the prepare then publishes a whole version."""
    src = make_tree(tmp_path / "src", organs=ORGANS)
    store = tmp_path / "store"
    first = run(src, store, CFG).version
    add_images(src, tmp_path, "lung", per_diagnosis=2, seed=31)
    reached, release = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        held = HeldBeforeIndex(store, reached, release)
        writing = pool.submit(prepare, LocalStorage(src), held, CFG, progress=False)
        try:
            assert reached.wait(120)
            before = {p for p in store.rglob("*") if p.is_file()}
            code = main(
                ["datasets", "gc", "--keep", "1", "--dataset", "t", "--storage", str(store)]
            )
            after = {p for p in store.rglob("*") if p.is_file()}
        finally:
            release.set()
        second = writing.result(timeout=120)
    err = capsys.readouterr().err
    assert code == 3 and "dataset t in" in err and "locked by another process" in err, err
    assert before == after
    index = load_dataset(LocalStorage(store), "t", first)
    listed = {store / shard_object_key(index, s) for s in index.shards}
    assert {p for p in before if "/shards/" in str(p)} - listed  # the prepare's new shards
    assert second.created and verify_every_shard(LocalStorage(store), second.version, tmp_path)

    # And the other way round: a prepare while gc holds the lock exits 3.
    class HeldAtFirstDelete(LocalStorage):
        def delete(self, key):
            if key.endswith("dataset.json"):
                reached.set()
                assert release.wait(120)
            super().delete(key)

    reached.clear(), release.clear()
    with ThreadPoolExecutor(1) as pool:
        collecting = pool.submit(retention.gc, HeldAtFirstDelete(store), "t", keep=1)
        try:
            assert reached.wait(120)
            with pytest.raises(DatasetLocked, match="locked by another process"):
                prepare(LocalStorage(src), LocalStorage(store), CFG, progress=False)
        finally:
            release.set()
        assert collecting.result(timeout=120).removed == [first]


def test_gc_keeps_at_least_one_version_and_names_an_unknown_dataset(tmp_path, capsys):
    src = make_tree(tmp_path / "src", organs=ORGANS)
    run(src, tmp_path / "store", CFG)
    code = main(
        ["datasets", "gc", "--keep", "0", "--dataset", "t", "--storage", str(tmp_path / "store")]
    )
    assert code == 2 and "--keep 1" in capsys.readouterr().err
    code = main(["datasets", "list", "--dataset", "nope", "--storage", str(tmp_path / "store")])
    assert code == 2 and "no dataset 'nope'" in capsys.readouterr().err
