"""The node-local shard cache and the tf.data pipeline, on real prepared shards."""

import multiprocessing

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from organtrain.config import PrepareConfig
from organtrain.data.cache import local_shard
from organtrain.data.dataset import load_dataset, shard_object_key
from organtrain.data.pipeline import build_dataset, shard_files
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ChecksumMismatchError
from organtrain.storage import LocalStorage, open_storage

ORGANS = {"lung": ["adenocarcinoma", "benign"]}
CFG = PrepareConfig(dataset="p", test_fraction=0.25, val_fraction=0.2, min_images_per_diagnosis=5,
                    max_image_side=48, images_per_shard=6, workers=2)  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_synthetic_tree(
        root, organs=ORGANS, images_per_diagnosis=20, image_size=40, progress=False
    )
    # One wide image, left half red and right half blue, to check the centre crop.
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :30] = (255, 0, 0)
    wide[:, 30:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "lung" / "benign" / "wide.png")
    return root


@pytest.fixture(scope="module")
def local_dataset(tree, tmp_path_factory):
    store = LocalStorage(tmp_path_factory.mktemp("store"))
    prepare(LocalStorage(tree), store, CFG, progress=False)
    return store, load_dataset(store, "p")


def test_eval_pipeline_yields_every_image_once_in_order(local_dataset):
    store, index = local_dataset
    files = shard_files(store, index, "lung", "train")
    ds = build_dataset(files, image_size=32, batch_size=5, training=False)
    batches = list(ds)
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    expected = sum(index.organs["lung"].counts["train"].values())
    assert images.shape == (expected, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 1  # raw pixel scale
    assert labels.dtype == np.int32 and set(labels) == {0, 1}
    again = np.concatenate(
        [b[1].numpy() for b in build_dataset(files, image_size=32, batch_size=5, training=False)]
    )
    assert (labels == again).all()


def test_training_pipeline_shuffles_drops_ragged_batch_and_augments(local_dataset):
    store, index = local_dataset
    files = shard_files(store, index, "lung", "train")
    n = sum(index.organs["lung"].counts["train"].values())
    seen = []

    def augment(ds):
        seen.append(True)
        return ds.map(lambda x, y: (x * 0 + 7, y))

    ds = build_dataset(files, image_size=16, batch_size=4, training=True, seed=1, augment=augment)
    batches = list(ds)
    assert seen and len(batches) == n // 4
    assert all(b[0].shape == (4, 16, 16, 3) for b in batches)
    assert all(float(tf.reduce_max(tf.abs(b[0] - 7))) == 0 for b in batches)
    plain = build_dataset(files, image_size=16, batch_size=4, training=False, augment=augment)
    assert len(seen) == 1 and float(next(iter(plain))[0][0, 0, 0, 0]) != 7  # eval: never augmented


# Where each parallel tf.data op takes its num_parallel_calls, among its inputs.
PARALLEL_CALLS_INPUT = {"ParallelMapDatasetV2": -1, "ParallelBatchDataset": 2}


def parallel_calls(ds: tf.data.Dataset) -> dict[str, list[int]]:
    """num_parallel_calls of each parallel map and batch of `ds`, by op (AUTOTUNE is -1)."""
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())  # private API
    nodes = {node.name: node for node in graph.node}
    calls: dict[str, list[int]] = {}
    for node in graph.node:
        if node.op in PARALLEL_CALLS_INPUT:
            value = nodes[node.input[PARALLEL_CALLS_INPUT[node.op]]].attr["value"].tensor
            calls.setdefault(node.op, []).append(int(tf.make_ndarray(value)))
    return calls


def test_pipelines_run_on_the_cores_given_without_autotuning(local_dataset, monkeypatch):
    # tf.data's autotuning left whole 224-px epochs on one core of two, idle machine or
    # not (bench/RESULTS.md): it is off, and each parallel stage runs as many calls as the
    # cores TensorFlow was given (a Ray trial sets them from resources.cpus_per_trial).
    store, index = local_dataset
    files = shard_files(store, index, "lung", "train")
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 3)
    for training in (True, False):
        ds = build_dataset(files, image_size=16, batch_size=4, training=training, seed=1)
        assert ds.options().autotune.enabled is False
        # Decode and batch: no AUTOTUNE left to resolve.
        assert parallel_calls(ds) == {"ParallelMapDatasetV2": [3], "ParallelBatchDataset": [3]}
    assert len(list(ds)) > 0


def test_non_square_images_are_centre_cropped(local_dataset):
    store, index = local_dataset
    # Find the wide image wherever its split put it, and look at it through the pipeline.
    for s in ("train", "val", "test"):
        ds = build_dataset(
            shard_files(store, index, "lung", s), image_size=20, batch_size=64, training=False
        )
        for images, _ in ds:
            for image in images.numpy():
                left, right = image[10, 0], image[10, 19]
                if left[0] > 200 > max(left[1:]) + 150 and right[2] > 200 > max(right[:2]) + 150:
                    # The central 20x20 of a 60x20 image: half red, half blue, no squashing.
                    assert image[:, :9, 0].min() > 200 and image[:, 11:, 2].min() > 200
                    return
    pytest.fail("the wide test image was not found in any split")


@pytest.fixture
def s3_dataset(tree, s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("ORGANTRAIN_CACHE_DIR", str(tmp_path / "node-cache"))
    store = open_storage(s3_uri)
    prepare(LocalStorage(tree), store, CFG, progress=False)
    return store, load_dataset(store, "p")


def test_shards_from_s3_are_downloaded_once_then_reused(s3_dataset):
    store, index = s3_dataset
    shard = index.shards_for("lung", "test")[0]
    first = local_shard(store, index, shard)
    second = local_shard(store, index, shard)
    assert first.downloaded and not second.downloaded and first.path == second.path
    # A cached copy damaged on the node is noticed and fetched again.
    data = bytearray(first.path.read_bytes())
    data[10] ^= 0xFF
    first.path.write_bytes(bytes(data))
    third = local_shard(store, index, shard)
    assert third.downloaded
    ds = build_dataset([str(third.path)], image_size=16, batch_size=64, training=False)
    assert sum(int(b[1].shape[0]) for b in ds) == shard.images


def _fetch(args):
    store_uri, shard_key = args
    store = open_storage(store_uri)
    index = load_dataset(store, "p")
    shard = next(s for s in index.shards if s.key == shard_key)
    return local_shard(store, index, shard).downloaded


def test_concurrent_trials_download_a_shard_once(s3_dataset):
    store, index = s3_dataset
    shard = index.shards_for("lung", "train")[0]
    # Spawned, not forked: a child forked from a process that ran TensorFlow can wait
    # forever on locks held by TensorFlow's threads, which the child does not have.
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        downloaded = pool.map(_fetch, [(store.uri, shard.key)] * 8)
    assert sum(downloaded) == 1


def test_shard_corrupted_in_storage_is_an_error_naming_it(s3_dataset, tmp_path):
    store, index = s3_dataset
    shard = index.shards_for("lung", "val")[0]
    key = shard_object_key(index, shard)
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=bytes(data))
    with pytest.raises(ChecksumMismatchError, match=shard.key):
        shard_files(store, index, "lung", "val")
    assert not list((tmp_path / "node-cache").rglob("*.tfrecord"))


def test_disk_cache_gives_the_memory_cache_batches_as_whole_grey_levels(local_dataset, tmp_path):
    # 48-px shard images resized to 20: the pipeline rounds them to uint8 before its cache
    # and shuffle buffer (a quarter of float32's bytes), and the model gets float32.
    store, index = local_dataset
    files = shard_files(store, index, "lung", "train")
    streams = {}
    for cache in ("memory", "disk", "none"):
        ds = build_dataset(files, image_size=20, batch_size=4, training=True, seed=3, epochs=2,
                           cache=cache, cache_file=str(tmp_path / "train"))  # fmt: skip
        streams[cache] = [(x.numpy(), y.numpy()) for x, y in ds]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train.data-00000-of-00001", "train.index"
    ]  # fmt: skip
    images = np.concatenate([x for x, _ in streams["memory"]])
    assert images.dtype == np.float32 and (images == np.round(images)).all()
    # The disk cache replays what the memory cache does; without a cache, each epoch reads
    # the files in its own order, so only the first epoch is the same.
    first_epoch = len(streams["memory"]) // 2
    for cache, batches in (("disk", len(streams["memory"])), ("none", first_epoch)):
        assert len(streams[cache]) == len(streams["memory"])
        pairs = zip(streams[cache][:batches], streams["memory"][:batches], strict=True)
        for (x, y), (x_memory, y_memory) in pairs:
            assert np.array_equal(x, x_memory) and np.array_equal(y, y_memory)
    with pytest.raises(ValueError, match="cache_file"):
        build_dataset(files, image_size=20, batch_size=4, training=False, cache="disk")
