"""Input pipeline benchmark: organtrain's tf.data pipeline vs the legacy ImageDataGenerator.

Builds one synthetic lung image tree, prepares it into TFRecord shards, and measures on the
same images, side by side in one process:

  (a) organtrain's training pipeline with the default augmentation, unseeded and seeded
      (seed=0, the reproducible path the trainer takes): both map batches in parallel
      through the fused, XLA-compiled augmentation, with tf.data's autotuning off. For
      comparison, seeded: through the augmentation layers' own ops (the ops that
      `augment.placement: model` runs on the accelerator), with autotuning off and on
      (on: the pipeline before issue 18), and the fused path with autotuning on;
  (b) tf_keras' ImageDataGenerator.flow_from_directory with the same knobs (the baseline);
  (c) decode only: shard read + parse + decode + resize, no augmentation, no cache (ceiling);
  (d) training steps/s of simple_cnn fed from the shard pipeline vs from in-memory tensors
      (only up to `--train-max-size`, 64 px by default: slow at 224 px on a CPU).

Two more rows give context: the cached pipeline without augmentation (what (d) trains on,
so the cost of augmenting shows; it is also all the CPU does per batch when augmentation
runs in the model), and training fed from the augmented pipeline (what the trainer really
does on a CPU).

Every subject runs one warm-up epoch first (it fills tf.data's cache, traces tf.functions,
compiles XLA, warms the page cache), then the subjects take turns, one full epoch each per
round, in a rotating order, so that load from other jobs on a shared machine falls on all
of them alike. Reported figures are medians over the rounds, and per-round ratios (paired:
measured next to each other). Per round and subject, "cores" is the process' CPU time per
wall-clock second of the epoch and "others" the rest of the machine's (see `Measurement`):
the two tell a subject that cannot use the cores from one that other jobs crowded out.

    python bench/input_pipeline.py --image-size 64 224 --repeats 11 --out bench/results.json

Needs scipy and tf-keras (installed without dependencies: see `make bench`).
"""

from __future__ import annotations

import os

# TensorFlow reads this when it is first imported (organtrain imports it too), so it is set
# before those imports.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from organtrain.augment import augment_in_dataset
from organtrain.config import AugmentConfig, ModelConfig, PrepareConfig, TrainConfig
from organtrain.data.dataset import load_dataset
from organtrain.data.pipeline import build_dataset, shard_files
from organtrain.data.prepare import prepare
from organtrain.data.synth import DEFAULT_ORGANS, write_synthetic_tree
from organtrain.models import build_model
from organtrain.storage import LocalStorage
from organtrain.strategy import make_strategy

ORGAN = "lung"  # the baseline reads one organ's folder, so the benchmark uses one organ
DATASET = "bench"
TARGET_AUGMENTED_VS_IDG = 5.0  # (a) / (b)
TARGET_SHARD_VS_MEMORY = 0.9  # (d) shard-fed / in-memory steps/s


def machine_busy_seconds() -> float:
    """CPU-seconds every core of the machine has spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal


@dataclass
class Measurement:
    """One subject: `epoch()` runs one full steady-state epoch and returns (items, seconds).

    Per round it records the rate, the cores this process used ("cores": its CPU time per
    second of the epoch, every thread, TF's pools included), the cores the rest of the
    machine used meanwhile ("others": whole-machine busy time from /proc/stat minus this
    process'), and the 1-minute load average after the epoch. cores + others below the
    machine's core count means a core stood idle while the subject ran.
    """

    key: str
    label: str
    unit: str  # "images/s" or "steps/s"
    epoch: Callable[[], tuple[int, float]]
    rates: list[float] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def run(self) -> None:
        cpu_before, busy_before = time.process_time(), machine_busy_seconds()
        start = time.perf_counter()
        count, seconds = self.epoch()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_before
        self.cores.append(cpu / seconds)
        self.others.append(max(machine_busy_seconds() - busy_before - cpu, 0.0) / wall)
        self.load.append(os.getloadavg()[0])
        self.items.append(count)
        self.rates.append(count / seconds)

    def summary(self) -> dict:
        return {
            "label": self.label,
            "unit": self.unit,
            "median": statistics.median(self.rates),
            "min": min(self.rates),
            "max": max(self.rates),
            "rates": self.rates,
            "items_per_epoch": self.items,
            "cores_median": statistics.median(self.cores),
            "cores": self.cores,
            "others_cores": self.others,
            # Cores nobody used while the subject ran: > 0.5 means it left a core idle.
            "idle_cores": [
                max(len(os.sched_getaffinity(0)) - c - o, 0.0)
                for c, o in zip(self.cores, self.others, strict=True)
            ],
            "loadavg_1min": self.load,
        }


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    tree: Path  # <tree>/<organ>/<diagnosis>/*.png, what ImageDataGenerator reads
    files: list[str]  # every shard of ORGAN (train, val and test): the same images
    num_images: int
    num_classes: int


def build_data(root: Path, images_per_diagnosis: int, image_size: int) -> BenchData:
    """Write the synthetic tree and prepare it; all of ORGAN's shards, all splits."""
    tree = root / "source"
    write_synthetic_tree(
        tree,
        organs={ORGAN: DEFAULT_ORGANS[ORGAN]},
        images_per_diagnosis=images_per_diagnosis,
        image_size=image_size,
        progress=False,
    )
    store = LocalStorage(root / "store")
    # max_image_side=0: the synthetic images are already the model's size.
    cfg = PrepareConfig(source=str(tree), dataset=DATASET, max_image_side=0)
    prepare(LocalStorage(tree), store, cfg, progress=False)
    index = load_dataset(store, DATASET)
    splits = ("train", "val", "test")
    files = [f for split in splits for f in shard_files(store, index, ORGAN, split)]
    num_images = sum(index.split_size(ORGAN, split) for split in splits)
    return BenchData(tree, files, num_images, len(index.diagnoses(ORGAN)))


def organtrain_dataset(
    data: BenchData,
    args: argparse.Namespace,
    *,
    training: bool = True,
    cache: bool = True,
    augment_seed: int | None = None,
    augment: bool = True,
    fused: bool = True,
) -> tf.data.Dataset:
    """organtrain's build_dataset over all the shards, as the trainer calls it for training."""
    transform = None
    if augment:

        def transform(ds: tf.data.Dataset) -> tf.data.Dataset:
            return augment_in_dataset(ds, AugmentConfig(), seed=augment_seed, fused=fused)

    return build_dataset(
        data.files,
        num_images=data.num_images,
        image_size=args.image_size,
        batch_size=args.batch_size,
        training=training,
        seed=0,  # the trainer seeds the shuffles with train.seed
        cache_images=cache,
        augment=transform,
    )


def _dataset_epoch(ds: tf.data.Dataset) -> Callable[[], tuple[int, float]]:
    def epoch() -> tuple[int, float]:
        images = 0
        start = time.perf_counter()
        for _, labels in ds:
            images += int(labels.shape[0])
        return images, time.perf_counter() - start

    return epoch


def _warmed_up(measurement: Measurement) -> Measurement:
    measurement.epoch()  # fills the cache, traces functions; not counted
    return measurement


# --- the subjects ------------------------------------------------------------------------


def time_organtrain_pipeline(
    data: BenchData,
    args: argparse.Namespace,
    *,
    seed: int | None,
    fused: bool = True,
    autotune: bool = False,
) -> Measurement:
    """(a) The training pipeline with the default augmentation: shards → cache → augment.

    For comparison, `fused=False`: the augmentation layers' own ops, one after the other
    (what `augment.placement: model` runs). `autotune=True` turns tf.data's autotuning
    back on; with `fused=False` too, that is the pipeline as it was before issue 18 (which
    also had AUTOTUNE where the parallelism is now a number).
    """
    ds = organtrain_dataset(data, args, augment_seed=seed, fused=fused)
    key = f"organtrain_augment_seed_{seed}" + ("" if fused else "_layer_ops")
    how = "fused, XLA" if fused else "the layers' own ops"
    if autotune:
        options = tf.data.Options()
        options.autotune.enabled = True  # overrides build_dataset's setting
        ds = ds.with_options(options)
        key, how = key + "_autotune", how + ", tf.data autotuning on"
    path = "unseeded" if seed is None else "seeded per batch, the trainer's path"
    return _warmed_up(
        Measurement(
            key,
            f"organtrain, default augmentation ({how}), seed={seed} ({path})",
            "images/s",
            _dataset_epoch(ds),
        )
    )


def time_organtrain_no_augmentation(data: BenchData, args: argparse.Namespace) -> Measurement:
    """The same pipeline without augmentation (what (d) trains on): the cost of augmenting."""
    ds = organtrain_dataset(data, args, augment=False)
    return _warmed_up(
        Measurement(
            "organtrain_no_augment",
            "organtrain, cache, no augmentation",
            "images/s",
            _dataset_epoch(ds),
        )
    )


def time_image_data_generator(data: BenchData, args: argparse.Namespace) -> Measurement:
    """(b) The legacy recipe: PIL load + scipy affine transform per image, in Python."""
    # Imported here: only this subject needs tf_keras (a separate, legacy Keras 2 package).
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(
        rescale=1 / 255,
        rotation_range=30,
        width_shift_range=0.15,
        height_shift_range=0.15,
        horizontal_flip=True,
        vertical_flip=True,
        brightness_range=[0.5, 1.5],
        zoom_range=0.2,
        fill_mode="nearest",
    )
    flow = generator.flow_from_directory(
        str(data.tree / ORGAN),
        target_size=(args.image_size, args.image_size),
        batch_size=args.batch_size,
        class_mode="sparse",
    )
    if flow.samples != data.num_images:
        raise RuntimeError(f"ImageDataGenerator found {flow.samples}, not {data.num_images}")

    def epoch() -> tuple[int, float]:
        # One pass of len(flow) batches is one epoch, as model.fit(flow) would take it
        # (single-threaded: Keras 2's default workers=1).
        images = 0
        start = time.perf_counter()
        for _ in range(len(flow)):
            batch_x, _ = next(flow)
            images += batch_x.shape[0]
        return images, time.perf_counter() - start

    return _warmed_up(
        Measurement(
            "image_data_generator",
            "tf_keras ImageDataGenerator.flow_from_directory",
            "images/s",
            epoch,
        )
    )


def time_decode_only(data: BenchData, args: argparse.Namespace) -> Measurement:
    """(c) Read + parse + decode + resize every epoch: no cache, no shuffle, no augmentation."""
    ds = organtrain_dataset(data, args, training=False, cache=False, augment=False)
    return _warmed_up(
        Measurement(
            "decode_only",
            "decode only (read, parse, decode, resize; no cache)",
            "images/s",
            _dataset_epoch(ds),
        )
    )


class _EpochClock(keras.callbacks.Callback):
    """Times one fit epoch from its start (before the iterator is made) to its end."""

    def on_epoch_begin(self, epoch, logs=None):
        self.steps = 0
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def time_training_steps(data: BenchData, args: argparse.Namespace) -> list[Measurement]:
    """(d) simple_cnn's training steps/s fed from the shards vs from in-memory tensors.

    One model, built and compiled as the trainer builds it (MirroredStrategy over the one
    CPU, Adam, sparse cross-entropy, accuracy), trains from both sources in turn, so the
    only difference is where the batches come from. Both give floor(N / batch) full batches.
    """
    shards = organtrain_dataset(data, args, augment=False)
    # Not in (d) proper: what the trainer really feeds on a CPU (augmentation seeded with
    # train.seed, in tf.data), to see whether augmenting on the same cores slows training.
    augmented = organtrain_dataset(data, args, augment_seed=TrainConfig().seed)
    # The same decoded images as numpy arrays (decode-only pipeline, deterministic order).
    decoded = list(organtrain_dataset(data, args, training=False, cache=False, augment=False))
    x = np.concatenate([images.numpy() for images, _ in decoded])
    y = np.concatenate([labels.numpy() for _, labels in decoded])
    # The strongest in-memory baseline: slices of resident tensors, prefetched.
    in_memory = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(args.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )

    train = TrainConfig()
    keras.utils.set_random_seed(train.seed)
    strategy = make_strategy(train.cpu_replicas)
    with strategy.scope():
        model = build_model(
            ModelConfig(),
            num_classes=data.num_classes,
            image_size=args.image_size,
            rescale=AugmentConfig().rescale,
        )
        optimizer = keras.optimizers.get(
            {"class_name": train.optimizer, "config": {"learning_rate": train.learning_rate}}
        )
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )

    def fit_epoch(ds: tf.data.Dataset) -> Callable[[], tuple[int, float]]:
        def epoch() -> tuple[int, float]:
            clock = _EpochClock()
            model.fit(ds, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
            return clock.steps, clock.seconds

        return epoch

    return [
        _warmed_up(
            Measurement(
                "train_from_shards",
                "simple_cnn training, fed from shards (cache, no augmentation)",
                "steps/s",
                fit_epoch(shards),
            )
        ),
        _warmed_up(
            Measurement(
                "train_from_memory",
                "simple_cnn training, fed from in-memory tensors",
                "steps/s",
                fit_epoch(in_memory),
            )
        ),
        _warmed_up(
            Measurement(
                "train_from_augmented_shards",
                "simple_cnn training, fed from shards with augmentation (seed=0)",
                "steps/s",
                fit_epoch(augmented),
            )
        ),
    ]


# --- report ------------------------------------------------------------------------------


def machine() -> dict:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    import tf_keras

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_keras": tf_keras.__version__,
        # 0 = TensorFlow's default: one thread per core for each pool.
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def ratios(results: dict[str, dict]) -> dict:
    """Ratios of medians, and the paired per-round ratios (subjects of one round ran next
    to each other, so the load on the machine was about the same): "every round" targets
    are judged on those."""

    def ratio(numerator: str, denominator: str, target: float | None) -> dict:
        top, bottom = results[numerator], results[denominator]
        paired = [a / b for a, b in zip(top["rates"], bottom["rates"], strict=True)]
        found = {
            "value": top["median"] / bottom["median"],
            "paired": paired,
            "paired_min": min(paired),
        }
        if target is not None:
            met = sum(value >= target for value in paired)
            found.update(
                target=target,
                met=found["value"] >= target,
                rounds_met=f"{met} of {len(paired)}",
            )
        return found

    found = {}
    for seed in (None, 0):
        found[f"augmented_seed_{seed}_vs_image_data_generator"] = ratio(
            f"organtrain_augment_seed_{seed}", "image_data_generator", TARGET_AUGMENTED_VS_IDG
        )
    # Without issue 18's changes, side by side in the same rounds: the layers' own ops
    # (static parallelism), and those with tf.data's autotuning as before.
    for variant in ("layer_ops", "layer_ops_autotune"):
        found[f"augmented_{variant}_seed_0_vs_image_data_generator"] = ratio(
            f"organtrain_augment_seed_0_{variant}", "image_data_generator", TARGET_AUGMENTED_VS_IDG
        )
    found["fused_vs_layer_ops_seed_0"] = ratio(
        "organtrain_augment_seed_0", "organtrain_augment_seed_0_layer_ops", None
    )
    if "train_from_shards" in results:
        found["train_shards_vs_memory"] = ratio(
            "train_from_shards", "train_from_memory", TARGET_SHARD_VS_MEMORY
        )
        # No target: how much augmenting on the training cores costs (context for (d)).
        found["train_augmented_shards_vs_memory"] = ratio(
            "train_from_augmented_shards", "train_from_memory", None
        )
    return found


def print_table(results: dict[str, dict], found: dict, repeats: int) -> None:
    print(f"\nmedian of {repeats} steady-state epochs per subject (min..max)")
    width = max(len(r["label"]) for r in results.values())
    for r in results.values():
        spread = f"{r['min']:.1f}..{r['max']:.1f}"
        print(
            f"  {r['label']:<{width}}  {r['median']:9.1f} {r['unit']:<9} "
            f"{r['cores_median']:4.1f} cores  ({spread})"
        )
        cores = " ".join(
            f"{c:.2f}+{o:.2f}" for c, o in zip(r["cores"], r["others_cores"], strict=True)
        )
        print(f"  {'':<{width}}  per round, cores + others: {cores}")
    print()
    for name, r in found.items():
        verdict = ""
        if "target" in r:
            verdict = f"  (target >= {r['target']:g}: {'met' if r['met'] else 'NOT met'}"
            verdict += f"; paired rounds met {r['rounds_met']}, min {r['paired_min']:.2f})"
        print(f"  {name:<50} {r['value']:6.2f}{verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images-per-diagnosis",
        type=int,
        default=400,
        help="synthetic lung images per diagnosis (3 diagnoses; default %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[64],
        help="pixels; several sizes run one after the other, each with its own data (default 64)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed epochs per subject (default 3)"
    )
    parser.add_argument(
        "--train-max-size",
        type=int,
        default=64,
        help="run (d), the training subjects, only at image sizes up to this (default 64: "
        "at 224 px simple_cnn trains for minutes per round on a CPU; 0 leaves (d) out)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def run_size(args: argparse.Namespace, image_size: int) -> dict:
    """Every subject at one image size, in rotating rounds; the report for that size."""
    args = argparse.Namespace(**{**vars(args), "image_size": image_size})
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="organtrain-bench-") as tmp:
        t0 = time.perf_counter()
        data = build_data(Path(tmp), args.images_per_diagnosis, image_size)
        print(
            f"{data.num_images} {ORGAN} images in {len(data.files)} shard(s), "
            f"{image_size}px, prepared in {time.perf_counter() - t0:.0f}s; warming up",
            flush=True,
        )
        subjects = [
            time_organtrain_pipeline(data, args, seed=None),
            time_organtrain_pipeline(data, args, seed=0),
            time_organtrain_pipeline(data, args, seed=0, fused=False),
            time_organtrain_pipeline(data, args, seed=0, fused=False, autotune=True),
            time_organtrain_pipeline(data, args, seed=0, autotune=True),
            time_organtrain_no_augmentation(data, args),
            time_image_data_generator(data, args),
            time_decode_only(data, args),
        ]
        if image_size <= args.train_max_size:
            subjects += time_training_steps(data, args)
        for round_ in range(args.repeats):
            # Rotate the order each round so no subject always follows the same neighbour.
            shift = round_ % len(subjects)
            for subject in subjects[shift:] + subjects[:shift]:
                subject.run()
            print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    results = {s.key: s.summary() for s in subjects}
    found = ratios(results)
    print_table(results, found, args.repeats)
    return {
        "date_utc": started.isoformat(timespec="seconds"),
        "seconds": round(
            (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1
        ),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "settings": {
            "organ": ORGAN,
            "images": data.num_images,
            "shards": len(data.files),
            "images_per_diagnosis": args.images_per_diagnosis,
            "image_size": image_size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
        },
        "results": results,
        "ratios": found,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "runs": [run_size(args, size) for size in args.image_size],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
