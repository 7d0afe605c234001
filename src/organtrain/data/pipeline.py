"""The tf.data input pipeline: verified local shards → batches of (image, label).

One straight line, in this order:
    shard files → (shuffle files) → interleaved parallel reads → parse + decode + resize
    → cache? → shuffle → batch → augment? → prefetch

Seeded, the training batches repeat bit for bit: parallel reads and decodes keep their
order (`deterministic=True`), and every shuffle is seeded from (seed, epoch) rather than
reshuffled from a stream that advances with each new iterator (see `build_dataset`).

Parallelism is static, not autotuned: every parallel stage runs `cores_given()` calls at
once (see `_static_parallelism` for why).

Images leave the pipeline as float32 in 0..255: each model rescales or applies its own
`preprocess_input` as its first layers, so a saved model takes raw pixels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from organtrain.data.cache import local_shard
from organtrain.data.dataset import DatasetIndex
from organtrain.data.shards import IMAGE_ENCODED, LABEL, SHA256, SOURCE_KEY, feature_spec
from organtrain.storage import Storage

BatchTransform = Callable[[tf.data.Dataset], tf.data.Dataset]
# Batches ready ahead of the consumer: enough to hide a slow batch, few enough that 224-px
# batches (19 MB each at 32 images) do not pile up.
PREFETCH_BATCHES = 2


def shard_files(
    storage: Storage, index: DatasetIndex, organ: str, split: str, cache_dir: str | None = None
) -> list[str]:
    """Local paths of one organ's shards for `split`, each fetched once and verified."""
    return [
        str(local_shard(storage, index, s, cache_dir).path) for s in index.shards_for(organ, split)
    ]


def build_dataset(
    files: list[str],
    *,
    num_images: int | None = None,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    cache_images: bool = True,
    augment: BatchTransform | None = None,
    with_keys: bool = False,
    first_epoch: int = 0,
    epochs: int = 1,
) -> tf.data.Dataset:
    """Batches of (float32 images (B, S, S, 3) in 0..255, int32 labels (B,)).

    `batch_size` is the global batch: under MirroredStrategy, Keras splits each batch
    across the replicas. `augment` (training only) maps batches, e.g. the in-graph
    ImageDataGenerator knobs when augmentation runs on the CPU. `num_images`, when
    known (the dataset index records it), gives the dataset a length, so Keras knows
    the steps per epoch. `with_keys` (evaluation only) adds each image's sha256 and source
    key to the batch, so predictions can be traced back to files.

    Training yields the batches of `epochs` epochs in one stream, from `first_epoch` on
    (fit it with steps_per_epoch = num_images // batch_size). Each epoch's order is a pure
    function of (seed, epoch), not of how many iterators came before: a run resumed at
    epoch k sees the same epoch k as one that never stopped.
    """
    if with_keys and training:
        raise ValueError("with_keys is for evaluation: training batches carry no keys")
    parallel = cores_given()
    if not training:
        ds = _images(tf.data.Dataset.from_tensor_slices(files), len(files), image_size,
                     num_images, with_keys)  # fmt: skip
        if cache_images:
            ds = ds.cache()  # after decode and resize: later epochs skip both
        ds = ds.batch(batch_size, num_parallel_calls=parallel)
        return _static_parallelism(ds.prefetch(PREFETCH_BATCHES))

    def read(epoch: int) -> tf.data.Dataset:
        order = tf.data.Dataset.from_tensor_slices(files)
        order = order.shuffle(
            len(files), seed=_epoch_seed(seed, epoch, stream=0), reshuffle_each_iteration=False
        )
        return _images(order, len(files), image_size, num_images)

    # Cached, epoch 0's file order is read once and kept; each epoch then reshuffles it.
    # reshuffle_each_iteration=False: an order must not depend on how many iterators were
    # made before. Keras' fit makes one to peek at a batch, whose prefetching reaches epoch
    # 2 or not depending on timing: with True, epoch 2 then repeated only most of the time.
    cached = read(0).cache() if cache_images else None

    def one_epoch(epoch: int) -> tf.data.Dataset:
        ds = cached if cached is not None else read(epoch)
        ds = ds.shuffle(
            shuffle_buffer, seed=_epoch_seed(seed, epoch, stream=1), reshuffle_each_iteration=False
        )
        # Drop the ragged last batch so every replica gets an equal share.
        return ds.batch(batch_size, drop_remainder=True, num_parallel_calls=parallel)

    # One dataset per epoch, chained: each epoch's seeds are Python ints. (A tensor epoch
    # in flat_map would need tensor shuffle seeds, which tf.data rejects when the global
    # seed is 0.) Each epoch's iterator starts when the one before it is exhausted.
    ds = functools.reduce(
        tf.data.Dataset.concatenate,
        [one_epoch(epoch) for epoch in range(first_epoch, first_epoch + max(epochs, 1))],
    )
    if num_images is not None:
        steps = max(epochs, 1) * (num_images // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    if augment is not None:
        ds = augment(ds)
    return _static_parallelism(ds.prefetch(PREFETCH_BATCHES))


def cores_given() -> int:
    """The cores this process may use: TensorFlow's inter-op thread count when it is set
    (a Ray trial sets it from `resources.cpus_per_trial`), else the CPUs it may run on."""
    threads = tf.config.threading.get_inter_op_parallelism_threads()
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _static_parallelism(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Turn tf.data's autotuning off for the whole pipeline.

    Inside tf.data each map call runs its ops on one thread (tf.data caps intra-op
    parallelism at 1), so a pipeline uses as many cores as it has calls in flight. With
    autotuning on, on 2 idle cores, whole epochs ran at one core (1.0 cores, half the images
    per second) in about half of them, and did so even with every parallelism and buffer
    fixed by hand; with it off, every epoch used both (bench/RESULTS.md, "224 px and the
    cores"). Off, a stage given AUTOTUNE (the augmentation's map) runs as many calls as
    TensorFlow has inter-op threads, which is `cores_given()`.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _images(
    files: tf.data.Dataset,
    num_files: int,
    image_size: int,
    num_images: int | None,
    with_keys: bool = False,
) -> tf.data.Dataset:
    """Shard files → decoded, resized (image, label) pairs, read and decoded in parallel.

    `deterministic=True`: parallel reads and decodes still overlap, but their results come
    out in order. With `False` (faster when one element stalls) the order depends on thread
    timing, and so did every seeded shuffle, batch and weight update after it.
    """
    # Reading waits on the disk more than on a core: every file in the cycle reads at once.
    ds = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(num_files, 8),
        num_parallel_calls=min(num_files, 8),
        deterministic=True,
    )
    decode = _decoder(image_size, with_keys)
    ds = ds.map(decode, num_parallel_calls=cores_given(), deterministic=True)
    if num_images is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(num_images))
    return ds


def _epoch_seed(seed: int | None, epoch: int, *, stream: int) -> int | None:
    """A shuffle seed that depends only on (seed, epoch, stream); None leaves it unseeded."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _decoder(image_size: int, with_keys: bool = False):
    wanted = (IMAGE_ENCODED, LABEL, SHA256, SOURCE_KEY) if with_keys else (IMAGE_ENCODED, LABEL)
    spec = {k: v for k, v in feature_spec().items() if k in wanted}

    def decode(serialized):
        example = tf.io.parse_single_example(serialized, spec)
        # decode_image reads PNG and JPEG alike; the shards are already RGB.
        image = tf.io.decode_image(example[IMAGE_ENCODED], channels=3, expand_animations=False)
        image = crop_and_resize(image, image_size)
        label = tf.cast(example[LABEL], tf.int32)
        if with_keys:
            return image, label, example[SHA256], example[SOURCE_KEY]
        return image, label

    return decode


def crop_and_resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """A decoded RGB image (H, W, 3) -> float32 (S, S, 3) in 0..255, as the model sees it.

    Training, evaluation, `organtrain predict` and the exported SavedModel all call this,
    so a model sees the same pixels whichever way an image reaches it.
    """
    image = _center_square(image)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image.set_shape((image_size, image_size, 3))
    return image


def _center_square(image: tf.Tensor) -> tf.Tensor:
    """Crop the central square, so non-square images keep their proportions when resized."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]
