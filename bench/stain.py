"""HED stain jitter: what it costs the tf.data training pipeline, on real microscope crops.

Copies a fixed subset of the BCCD blood-cell crops (`../shared/data/bccd-cells`, real JPEG
photographs of stained smears: every platelet and white cell, the first `--per-class` red
cells by path) into a temporary source tree, prepares it with organtrain's own `prepare`
(shards, PNG), and times the trainer's own training pipeline (`build_dataset` with the
seeded, XLA-fused `augment_in_dataset`, images cached after decoding, as `train.datasets`
builds it) side by side in one process:

  (a) the default augmentation (ImageDataGenerator's knobs: rotation, shifts, zoom, flips,
      brightness);
  (b) the same plus HED jitter (`augment.hed_jitter`, `augment.hed_bias`).

Each subject runs once to warm up (fills the cache, compiles XLA), then the two take turns,
`--epochs` epochs each per round, in alternating order, so the load of other jobs on a shared
machine falls on both alike. Reported: medians over the rounds, and the paired per-round
ratio (b)/(a) (target >= 0.8, judged on the median of the paired ratios and shown for every
round). Per round and subject, "cores" is this process' CPU time per wall second and
"others" the rest of the machine's (`input_pipeline.Measurement`).

It also measures how far the jitter moves pixels on these crops (mean absolute change in
grey levels over a fixed sample, for scale-only and shift-only settings), which is how the
README's recommended `hed_bias` values were chosen to match the paper's scale ranges;
and what the pieces of the jitter cost compiled alone (`kernels`), the figures the code's
comments cite.

    python bench/stain.py --image-size 64 224 --repeats 7 --out bench/stain_results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import json
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from input_pipeline import Measurement, _dataset_epoch, _warmed_up

from organtrain import stain
from organtrain.augment import (
    RandomHEDJitter,
    _augment_batch,
    _hed_from_log2,
    affine_resample,
    augment_in_dataset,
    build_augmentation,
    hed_scales_and_shifts,
)
from organtrain.config import AugmentConfig, PrepareConfig
from organtrain.data.dataset import load_dataset
from organtrain.data.pipeline import build_dataset, shard_files
from organtrain.data.prepare import prepare
from organtrain.storage import LocalStorage

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd-cells"
ORGAN, DATASET = "blood", "bench-stain"
TARGET_RATIO = 0.8  # (b) / (a) images/s
# Light and strong settings as the README recommends them (sigma from Tellez et al.).
JITTER = {"light": (0.05, 0.001), "strong": (0.2, 0.005)}
STRENGTH_SETTINGS = [(0.05, 0.0), (0.2, 0.0), (0.0, 0.001), (0.0, 0.005), (0.0, 0.02)]
STRENGTH_SETTINGS += list(JITTER.values())


def copy_subset(root: Path, per_class: int) -> Path:
    """blood/<cell type>/<smear>/<n>.jpg for every class, at most `per_class` each (the
    first by path: a fixed subset), copied (prepare refuses links that leave the tree)."""
    tree = root / "source"
    for class_dir in sorted((BCCD / ORGAN).iterdir()):
        for path in sorted(class_dir.rglob("*.jpg"))[:per_class]:
            dest = tree / path.relative_to(BCCD)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    return tree


def prepared(root: Path, per_class: int) -> tuple[list[str], int]:
    """The subset prepared by organtrain's own `prepare`: every split's shards."""
    tree = copy_subset(root, per_class)
    store = LocalStorage(root / "store")
    prepare(
        LocalStorage(tree), store, PrepareConfig(source=str(tree), dataset=DATASET), progress=False
    )
    index = load_dataset(store, DATASET)
    splits = ("train", "val", "test")
    files = [f for split in splits for f in shard_files(store, index, ORGAN, split)]
    return files, sum(index.split_size(ORGAN, split) for split in splits)


def pipeline(files: list[str], num_images: int, args, cfg: AugmentConfig) -> tf.data.Dataset:
    """The trainer's training stream (`train.datasets`): cached, seeded, fused augmentation."""

    def augment(ds: tf.data.Dataset) -> tf.data.Dataset:
        return augment_in_dataset(ds, cfg, seed=0, first_step=0)

    return build_dataset(
        files,
        num_images=num_images,
        image_size=args.image_size,
        batch_size=args.batch_size,
        training=True,
        seed=0,
        cache_images=True,
        augment=augment,
        epochs=args.epochs,
    )


def strength(files: list[str], image_size: int) -> list[dict]:
    """Mean and 95th-percentile absolute pixel change (grey levels) of each setting, on the
    first 256 crops as the model sees them."""
    crops = build_dataset(
        files, image_size=image_size, batch_size=256, training=False, cache_images=False
    )
    images = next(iter(crops))[0]
    rows = []
    for sigma, bias in STRENGTH_SETTINGS:
        out = RandomHEDJitter(sigma, bias, seed=0)(images, training=True)
        change = np.abs(out.numpy() - images.numpy())
        rows.append(
            {
                "hed_jitter": sigma,
                "hed_bias": bias,
                "mean_abs_change": round(float(change.mean()), 2),
                "p95_abs_change": round(float(np.percentile(change, 95)), 2),
            }
        )
    return rows


def epochs_per_round(args: argparse.Namespace, image_size: int) -> int:
    """Enough epochs that a round takes seconds at every size (one 64-px epoch of these
    crops takes ~0.2 s: too short to time on a shared machine)."""
    return args.epochs or max(2, round(16 * (64 / image_size) ** 2))


def run_size(args: argparse.Namespace, image_size: int, files, num_images) -> dict:
    epochs = epochs_per_round(args, image_size)
    args = argparse.Namespace(**{**vars(args), "image_size": image_size, "epochs": epochs})
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    sigma, bias = JITTER[args.setting]
    subjects = {
        "default": AugmentConfig(),
        "default_plus_hed": AugmentConfig(hed_jitter=sigma, hed_bias=bias),
    }
    measurements = [
        _warmed_up(
            Measurement(
                key,
                f"{key} ({cfg.hed_jitter}, {cfg.hed_bias})",
                "images/s",
                _dataset_epoch(pipeline(files, num_images, args, cfg)),
            )
        )
        for key, cfg in subjects.items()
    ]
    for round_ in range(args.repeats):
        order = measurements if round_ % 2 == 0 else measurements[::-1]
        for measurement in order:
            measurement.run()
        rates = ", ".join(f"{m.key} {m.rates[-1]:.0f}" for m in measurements)
        print(f"{image_size}px round {round_ + 1}/{args.repeats}: {rates}", flush=True)
    plain, hed = measurements
    paired = [h / p for h, p in zip(hed.rates, plain.rates, strict=True)]
    ratio = statistics.median(paired)
    # Images per CPU-second of this process: what the jitter costs in work, which other
    # jobs' load disturbs less than the wall-clock rate.
    per_cpu = [
        (h / hc) / (p / pc)
        for h, hc, p, pc in zip(hed.rates, hed.cores, plain.rates, plain.cores, strict=True)
    ]
    print(
        f"{image_size}px: HED/default {ratio:.3f} images/s, {statistics.median(per_cpu):.3f} "
        f"images per CPU-second (target >= {TARGET_RATIO})",
        flush=True,
    )
    return {
        "date_utc": started.isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "settings": {
            "image_size": image_size,
            "batch_size": args.batch_size,
            "epochs_per_round": args.epochs,
            "repeats": args.repeats,
            "images": num_images,
            "hed_jitter": sigma,
            "hed_bias": bias,
        },
        "results": {m.key: m.summary() for m in measurements},
        "ratio_hed_vs_default": {
            "median_of_paired": round(ratio, 3),
            "paired": [round(r, 3) for r in paired],
            "of_medians": round(hed.summary()["median"] / plain.summary()["median"], 3),
            "target": TARGET_RATIO,
            "met": ratio >= TARGET_RATIO,
            "per_cpu_second_median_of_paired": round(statistics.median(per_cpu), 3),
            "per_cpu_second_paired": [round(r, 3) for r in per_cpu],
        },
        "pixel_change": strength(files, image_size),
    }


def kernels(image_size: int = 224, batch: int = 32, repeats: int = 15) -> dict:
    """CPU ms per image of the pieces the docstrings of `stain.fast_log2`, `stain._mix`
    and `stain.log2_light` cite, each compiled by XLA alone, on a random batch: a pass
    over the pixels (x * 2), tf.math.log, stain.fast_log2, tf.exp; and the default
    augmentation's resample + brightness without and with the jitter, the jitter compiled
    as organtrain does (two functions) and as one function (`one_function`), medians of
    interleaved repeats. Includes copying the result out (the same for every row)."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, image_size, image_size, 3)), tf.float32)
    light = tf.maximum(images / 255.0, stain.LIGHT_FLOOR)
    aff, bright, hed = build_augmentation(AugmentConfig(hed_jitter=0.2, hed_bias=0.005)).layers
    seeds = tf.random.experimental.stateless_split(tf.constant([1, 2], tf.int64), num=3)
    transforms, factors = aff.transforms(images, seeds[0]), bright.factors(images, seeds[1])
    unit = hed.draw(images, seeds[2])
    matrices, offsets = stain.hed_log_affine(*hed_scales_and_shifts(unit, hed.sigma, hed.bias))
    geometry, white = (aff.fill_mode, aff.fill_value, aff.interpolation), (0.0, 255.0)

    def resample(x):
        return _augment_batch(x, transforms, factors, geometry, white)

    @tf.function(jit_compile=True)
    def one_function(x):
        x = affine_resample(x, transforms, fill_mode=geometry[0], fill_value=geometry[1])
        x = tf.clip_by_value(x * factors, *white)
        return stain.apply_log_affine(x, matrices, offsets, white)

    def two_functions(x):
        log2 = _augment_batch(x, transforms, factors, geometry, white, white)
        return _hed_from_log2(log2, unit, hed.sigma, hed.bias, white)

    subjects = {
        "pass_over_pixels": tf.function(lambda: light * 2.0, jit_compile=True),
        "tf_math_log": tf.function(lambda: tf.math.log(light), jit_compile=True),
        "fast_log2": tf.function(lambda: stain.fast_log2(light), jit_compile=True),
        "tf_exp": tf.function(lambda: tf.exp(-light), jit_compile=True),
        "resample_brightness": lambda: resample(images),
        "plus_hed_two_functions": lambda: two_functions(images),
        "plus_hed_one_function": lambda: one_function(images),
    }
    times: dict[str, list[float]] = {key: [] for key in subjects}
    for run in subjects.values():
        run().numpy()  # compile
    for _ in range(repeats):
        for key, run in subjects.items():
            start = time.process_time()
            run().numpy()
            times[key].append((time.process_time() - start) / batch * 1e3)
    return {key: round(statistics.median(values), 3) for key, values in times.items()}


def machine() -> dict:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=400, help="crops per cell type")
    parser.add_argument(
        "--epochs", type=int, default=0, help="epochs per subject per round (0: by image size)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    parser.add_argument("--setting", choices=sorted(JITTER), default="strong")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="organtrain-bench-stain-") as tmp:
        t0 = time.perf_counter()
        files, num_images = prepared(Path(tmp), args.per_class)
        print(f"{num_images} BCCD crops prepared in {time.perf_counter() - t0:.0f}s", flush=True)
        report = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "runs": [run_size(args, size, files, num_images) for size in args.image_size],
        }
    report["kernels_224px_cpu_ms_per_image"] = kernels()
    print("kernels, CPU ms per 224-px image:", report["kernels_224px_cpu_ms_per_image"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
