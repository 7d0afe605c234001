"""The tf.data input pipeline: verified local shards → batches of (image, label).

One straight line, in this order:
    shard files → (shuffle files) → interleaved parallel reads → parse + decode + resize
    → cache? → shuffle → batch → augment? → prefetch

Images leave the pipeline as float32 in 0..255: each model rescales or applies its own
`preprocess_input` as its first layers, so a saved model takes raw pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from organtrain.data.cache import local_shard
from organtrain.data.dataset import DatasetIndex
from organtrain.data.shards import IMAGE_ENCODED, LABEL, SHA256, SOURCE_KEY, feature_spec
from organtrain.storage import Storage

AUTOTUNE = tf.data.AUTOTUNE
BatchTransform = Callable[[tf.data.Dataset], tf.data.Dataset]


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
) -> tf.data.Dataset:
    """Batches of (float32 images (B, S, S, 3) in 0..255, int32 labels (B,)).

    `batch_size` is the global batch: under MirroredStrategy, Keras splits each batch
    across the replicas. `augment` (training only) maps batches, e.g. the in-graph
    ImageDataGenerator knobs when augmentation runs on the CPU. `num_images`, when
    known (the dataset index records it), gives the dataset a length, so Keras knows
    the steps per epoch. `with_keys` (evaluation only) adds each image's sha256 and source
    key to the batch, so predictions can be traced back to files.
    """
    if with_keys and training:
        raise ValueError("with_keys is for evaluation: training batches carry no keys")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
        # Evaluation order is reproducible; training is shuffled anyway.
        deterministic=not training,
    )
    ds = ds.map(
        _decoder(image_size, with_keys), num_parallel_calls=AUTOTUNE, deterministic=not training
    )
    if num_images is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(num_images))
    if cache_images:
        ds = ds.cache()  # after decode and resize: later epochs skip both
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # Training drops the ragged last batch so every replica gets an equal share.
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    if training and augment is not None:
        ds = augment(ds)
    return ds.prefetch(AUTOTUNE)


def _decoder(image_size: int, with_keys: bool = False):
    wanted = (IMAGE_ENCODED, LABEL, SHA256, SOURCE_KEY) if with_keys else (IMAGE_ENCODED, LABEL)
    spec = {k: v for k, v in feature_spec().items() if k in wanted}

    def decode(serialized):
        example = tf.io.parse_single_example(serialized, spec)
        # decode_image reads PNG and JPEG alike; the shards are already RGB.
        image = tf.io.decode_image(example[IMAGE_ENCODED], channels=3, expand_animations=False)
        image = _center_square(image)
        image = tf.image.resize(image, (image_size, image_size), antialias=True)
        image.set_shape((image_size, image_size, 3))
        label = tf.cast(example[LABEL], tf.int32)
        if with_keys:
            return image, label, example[SHA256], example[SOURCE_KEY]
        return image, label

    return decode


def _center_square(image: tf.Tensor) -> tf.Tensor:
    """Crop the central square, so non-square images keep their proportions when resized."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]
