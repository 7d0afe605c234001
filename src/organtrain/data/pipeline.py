"""The tf.data input pipeline: verified local shards → batches of (image, label).

One straight line, in this order:
    shard files → (shuffle files) → interleaved parallel reads → parse + decode + resize
    → cache? → shuffle → batch → float32 → augment? → prefetch

The cache and the shuffle buffer hold uint8 pixels, a quarter of float32's bytes (150 kB
per 224-px image); a batch becomes float32 only after it leaves them. Where the cache
lives (memory, a node-local file, nowhere) and how large the shuffle buffer may be follow
from a RAM budget (`plan_input`), so a trial's memory stays flat as its organ grows.

Seeded, the training batches repeat bit for bit: parallel reads and decodes keep their
order (`deterministic=True`), and every shuffle is seeded from (seed, epoch) rather than
reshuffled from a stream that advances with each new iterator (see `build_dataset`).

Parallelism is static, not autotuned: every parallel stage runs `cores_given()` calls at
once (see `_static_parallelism` for why).

Images leave the pipeline as float32 in 0..255 (whole numbers: resized pixels are rounded
to uint8): each model rescales or applies its own `preprocess_input` as its first layers,
so a saved model takes raw pixels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from organtrain.data.cache import cache_root, local_shard
from organtrain.data.dataset import DatasetIndex
from organtrain.data.shards import IMAGE_ENCODED, LABEL, SHA256, SOURCE_KEY, feature_spec
from organtrain.errors import ConfigError
from organtrain.storage import Storage

log = logging.getLogger(__name__)

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


# Without input.memory_budget_mb: this share of the node's memory (its cgroup limit when
# lower). The rest is for the models, TensorFlow's own buffers and Ray's object store
# (30 % of the node by default).
DEFAULT_BUDGET_FRACTION = 0.25
# Node-local folders of tf.data's file cache (input.cache: disk), one per trial, under the
# shard cache folder: `<host>-<pid>-<random>`.
TFDATA_CACHE = "tfdata-cache"


@dataclass(frozen=True)
class InputPlan:
    """Where one trial keeps its decoded images, and its shuffle buffer, within budget."""

    cache: str  # memory, disk or none: what the trial does (auto resolved)
    shuffle_buffer: int  # images, after fitting the budget
    requested_shuffle_buffer: int  # input.shuffle_buffer
    train_images: int
    val_images: int
    image_bytes: int  # one decoded uint8 image
    cache_bytes: int  # the train and validation images, as the in-memory cache holds them
    budget_bytes: int  # this trial's share of the node's budget
    trials_per_node: int  # trials dividing the node's budget

    def describe(self) -> str:
        """One log line: what was chosen and from which sizes."""
        shrunk = (
            f", input.shuffle_buffer {self.requested_shuffle_buffer} shrunk to fit the budget"
            if self.shuffle_shrunk
            else ""
        )
        return (
            f"input cache {self.cache}: {self.train_images} + {self.val_images} images hold "
            f"{_mb(self.cache_bytes)} as uint8; shuffle buffer {self.shuffle_buffer} images "
            f"({_mb(self.shuffle_bytes)}{shrunk}); budget {_mb(self.budget_bytes)} (the "
            f"node's input.memory_budget_mb / {self.trials_per_node} trial(s) on the node)"
        )

    @property
    def shuffle_shrunk(self) -> bool:
        """The budget held fewer images than input.shuffle_buffer asked (and the split has)."""
        return self.shuffle_buffer < min(self.requested_shuffle_buffer, self.train_images)

    @property
    def shuffle_bytes(self) -> int:
        return self.shuffle_buffer * self.image_bytes

    def record(self) -> dict:
        """The plan as plain values, for a trial's result."""
        return {**asdict(self), "shuffle_bytes": self.shuffle_bytes}


def plan_input(
    cache: str,
    *,
    image_size: int,
    train_images: int,
    val_images: int,
    shuffle_buffer: int,
    budget_bytes: int,
    trials_per_node: int = 1,
) -> InputPlan:
    """Fit the cache and the shuffle buffer into a trial's share of the node's budget.

    The share is `budget_bytes` / `trials_per_node`. Both hold uint8 images of
    image_size² × 3 bytes. The shuffle buffer holds min(shuffle_buffer, train_images). `auto`
    keeps the train and validation images in memory when they fit beside a full shuffle
    buffer, else in a node-local file (disk): a smaller cache costs reads, a smaller
    buffer a poorer shuffle. Whatever room is left then bounds the shuffle buffer (at
    least one image). An explicit `memory` that cannot fit is a ConfigError: it would take
    the trial past its budget however the buffer shrank.
    """
    trials_per_node = max(1, trials_per_node)
    share = budget_bytes // trials_per_node
    image_bytes = image_size * image_size * 3
    cache_bytes = (train_images + val_images) * image_bytes
    wanted = max(1, min(shuffle_buffer, train_images))
    if cache == "auto":
        cache = "memory" if cache_bytes + wanted * image_bytes <= share else "disk"
    room = share - (cache_bytes if cache == "memory" else 0)
    if cache == "memory" and room < image_bytes:
        raise ConfigError(
            f"input.cache memory: {train_images + val_images} images of {image_size} px hold "
            f"{_mb(cache_bytes)}, above this trial's share of input.memory_budget_mb "
            f"({_mb(share)}: {_mb(budget_bytes)} / {trials_per_node} trials on the node); "
            "use input.cache auto or disk, or raise input.memory_budget_mb"
        )
    return InputPlan(
        cache=cache, shuffle_buffer=max(1, min(wanted, room // image_bytes)),
        requested_shuffle_buffer=shuffle_buffer, train_images=train_images,
        val_images=val_images, image_bytes=image_bytes,
        cache_bytes=cache_bytes, budget_bytes=share, trials_per_node=trials_per_node,
    )  # fmt: skip


def node_budget_bytes(memory_budget_mb: int | None) -> int:
    """input.memory_budget_mb in bytes, or by default a share of this node's memory."""
    if memory_budget_mb is not None:
        return memory_budget_mb * 2**20
    return int(node_memory_bytes() * DEFAULT_BUDGET_FRACTION)


def node_memory_bytes() -> int:
    """The memory this process's node offers: physical memory, or its cgroup's limit
    (a SLURM job, a Kubernetes pod, a container) when that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


# glibc's M_MMAP_THRESHOLD, and the size it is pinned at (its default's starting value).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_images_to_the_system() -> bool:
    """Pin glibc's mmap threshold at 128 kB, so every allocation that large (a 224-px
    image is 147 kB as uint8) gets its own mapping and goes back to the system when freed.

    By default glibc raises the threshold to the size of the first such block freed, and
    images then come from the heap; a full shuffle buffer, replacing one image at a time
    in random order, fragments it, and the trial's RSS grew with the number of images that
    passed through (224 px, 64 MB budget: +99 MB from 500 to 2,000 images; +23 MB pinned,
    bench/RESULTS.md "Bounded training memory"). Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to pin


@contextlib.contextmanager
def disk_cache_folder(cache_dir: str | None = None) -> Iterator[Path]:
    """A node-local folder for one trial's tf.data file cache, removed when it ends.

    Under the shard cache folder (`cache_root`), named `<host>-<pid>-<random>`: folders
    that a process of this host left behind when it died (a killed trial cleans nothing)
    are removed on the next start, and folders of other hosts sharing the folder are
    left alone.
    """
    root = cache_root(cache_dir) / TFDATA_CACHE
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_abandoned(root: Path) -> None:
    host = socket.gethostname()
    for folder in root.iterdir():
        owner, _, _random = folder.name.rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def build_dataset(
    files: list[str],
    *,
    num_images: int | None = None,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    cache: str = "memory",
    cache_file: str | None = None,
    cache_images: bool | None = None,
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

    `cache`: where decoded, resized uint8 images are kept after their first pass:
    "memory", "disk" (tf.data's file cache at `cache_file`, a node-local path prefix) or
    "none" (decode every pass); `plan_input` chooses it. `cache_images` is the older
    spelling: False is cache="none", True is cache="memory".

    Training yields the batches of `epochs` epochs in one stream, from `first_epoch` on
    (fit it with steps_per_epoch = num_images // batch_size). Each epoch's order is a pure
    function of (seed, epoch), not of how many iterators came before: a run resumed at
    epoch k sees the same epoch k as one that never stopped.
    """
    if with_keys and training:
        raise ValueError("with_keys is for evaluation: training batches carry no keys")
    if cache_images is not None:
        cache = "memory" if cache_images else "none"
    keep = _cache_stage(cache, cache_file)
    parallel = cores_given()
    if not training:
        ds = _images(tf.data.Dataset.from_tensor_slices(files), len(files), image_size,
                     num_images, with_keys)  # fmt: skip
        ds = keep(ds)  # after decode and resize: later passes skip both
        ds = ds.batch(batch_size, num_parallel_calls=parallel).map(_as_float)
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
    cached = keep(read(0)) if cache != "none" else None

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
    # float32 from here: the cache and the shuffle buffer above hold uint8.
    ds = ds.map(_as_float)
    if augment is not None:
        ds = augment(ds)
    return _static_parallelism(ds.prefetch(PREFETCH_BATCHES))


def _cache_stage(cache: str, cache_file: str | None) -> BatchTransform:
    """The dataset transform that keeps decoded images for later passes, as `cache` says."""
    if cache == "memory":
        return lambda ds: ds.cache()
    if cache == "disk":
        if not cache_file:
            raise ValueError("cache='disk' needs cache_file, a path prefix on a local disk")
        return lambda ds: ds.cache(cache_file)
    if cache == "none":
        return lambda ds: ds
    raise ValueError(f"cache must be memory, disk or none, not {cache!r}")


def _as_float(images: tf.Tensor, *rest: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """A uint8 batch as the models take it: float32 0..255 (exact: every uint8 is a float)."""
    return (tf.cast(images, tf.float32), *rest)


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
        image = resized_uint8(image, image_size)
        label = tf.cast(example[LABEL], tf.int32)
        if with_keys:
            return image, label, example[SHA256], example[SOURCE_KEY]
        return image, label

    return decode


def crop_and_resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """A decoded RGB image (H, W, 3) -> float32 (S, S, 3) in 0..255, as the model sees it.

    Training, evaluation, `organtrain predict` and the exported SavedModel all call this
    (the pipeline as `resized_uint8`, before its cache, then casts), so a model sees the
    same pixels whichever way an image reaches it.
    """
    return tf.cast(resized_uint8(image, image_size), tf.float32)


def resized_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """A decoded RGB image (H, W, 3) -> the centre square resized to uint8 (S, S, 3).

    Rounded to whole grey levels so that the pipeline's cache and shuffle buffer hold a
    byte per value instead of float32's four; the rounding moves a pixel by at most half
    a grey level, and none when the shard image already has the model's size.
    """
    image = _center_square(image)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image.set_shape((image_size, image_size, 3))
    return image


def _center_square(image: tf.Tensor) -> tf.Tensor:
    """Crop the central square, so non-square images keep their proportions when resized."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]
