"""`organtrain predict` throughput: against the training pipeline's decode ceiling, and
with 1 vs 2 Ray workers.

Builds one synthetic lung tree, prepares it (PNG shards), saves an untrained simple_cnn
as a finished run's model (speed does not depend on the weights), then measures, taking
turns in rounds so that load from other jobs falls on all subjects alike:

  (a) decode ceiling: the training pipeline reading the prepared shards (shard read +
      parse + decode + crop/resize, no cache, no model): images/s
  (a') the same shards through the same model, as `train` evaluates its test split: the
      ceiling of any path that also runs the model
  (a'') predict's own image path, no model: read, decode_rgb, crop_and_resize
  (b) predict in this process: the source PNG files → decode → crop/resize → model →
      Parquet parts → merged tables, the whole call (model loading included)
  (c) predict on a local Ray with 1 worker, (d) with 2 workers (Ray already started)

Target: (b) / (a) ≥ 0.7. On two CPU cores the model itself is slower than the decode
ceiling, so (b) / (a') is reported as well.

    python bench/predict.py --images-per-diagnosis 1500 --out bench/predict_results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from organtrain.config import ModelConfig, PrepareConfig
from organtrain.data.dataset import load_dataset
from organtrain.data.pipeline import build_dataset, shard_files
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.models import build_model
from organtrain.predict import predict
from organtrain.storage import LocalStorage

ORGAN = "lung"
IMAGE_SIZE = [64]  # set from --image-size
DIAGNOSES = ["adenocarcinoma", "benign"]


def setup(root: Path, per_diagnosis: int, image_size: int) -> tuple[LocalStorage, list[str]]:
    write_synthetic_tree(
        root / "src",
        organs={ORGAN: DIAGNOSES},
        images_per_diagnosis=per_diagnosis,
        image_size=image_size,
        progress=False,
    )
    store = LocalStorage(root / "store")
    cfg = PrepareConfig(
        source=str(root / "src"),
        dataset="bench",
        max_image_side=image_size,
        test_fraction=0.1,
        val_fraction=0.1,
    )
    prepare(LocalStorage(root / "src"), store, cfg, progress=False)
    index = load_dataset(store, "bench")
    files = [f for s in ("train", "val", "test") for f in shard_files(store, index, ORGAN, s)]
    model = build_model(ModelConfig(), num_classes=len(DIAGNOSES), image_size=image_size)
    model.save(root / "model.keras")
    run = store.sub(f"runs/bench/{ORGAN}")
    run.put_file("model.keras", root / "model.keras")
    result = {
        "dataset": "bench",
        "dataset_version": index.version,
        "classes": DIAGNOSES,
        "settings": {"input": {"image_size": image_size}},
    }
    run.put_bytes("result.json", json.dumps(result).encode())
    return store, files


def decode_ceiling(files: list[str], image_size: int, model=None) -> float:
    started, n = time.perf_counter(), 0
    ds = build_dataset(
        files, image_size=image_size, batch_size=64, training=False, cache_images=False
    )
    for images, _ in ds:
        if model is not None:
            model.predict_on_batch(images)
        n += int(images.shape[0])
    return n / (time.perf_counter() - started)


def input_path_rate(root: Path) -> float:
    """predict's image path alone (read, decode_rgb, crop_and_resize in batches), no model:
    the figure to hold against the decode ceiling."""
    from organtrain.predict import ChunkClassifier, ModelSpec, _run_model_on

    class NoModel:
        output_shape = (None, len(DIAGNOSES))

        def predict_on_batch(self, images):
            return np.zeros((len(images), len(DIAGNOSES)), np.float32)

    source = LocalStorage(root / "src")
    keys = [info.key for info in source.list(ORGAN)]
    spec = ModelSpec(ORGAN, "bench", DIAGNOSES, "unused", IMAGE_SIZE[0], IMAGE_SIZE[0], "png")
    good: list[str] = []
    started = time.perf_counter()
    images = ChunkClassifier(source, source)._decoded(keys, spec, good, [])
    _run_model_on(NoModel(), images, IMAGE_SIZE[0], 64)
    return len(good) / (time.perf_counter() - started)


def predict_rate(root: Path, store: LocalStorage, tag: str, workers: int | None):
    """(images/s of the whole call, images/s in steady state): the second excludes what a
    call pays once (listing, loading the model, starting Ray actors) by timing from the
    first finished chunk to the last."""
    out = Path(tempfile.mkdtemp(dir=root, prefix=f"out-{tag}-"))
    finished: list[tuple[float, int]] = []
    started = time.perf_counter()
    outcome = predict(
        root / "src", out, models=store, organ=ORGAN, run="bench", workers=workers,
        on_chunk=lambda chunk: finished.append((time.perf_counter(), len(chunk.keys))),
    )  # fmt: skip
    whole = outcome.classified / (time.perf_counter() - started)
    steady = sum(n for _, n in finished[1:]) / (finished[-1][0] - finished[0][0])
    return whole, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-diagnosis", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/predict_results.json")
    args = parser.parse_args()
    import ray

    IMAGE_SIZE[0] = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, files = setup(root, args.images_per_diagnosis, args.image_size)
        model = keras.saving.load_model(root / "model.keras")
        subjects = {
            "decode_ceiling": lambda: decode_ceiling(files, args.image_size),
            "shards_through_model": lambda: decode_ceiling(files, args.image_size, model),
            "predict_input_path": lambda: input_path_rate(root),
            "predict_in_process": lambda: predict_rate(root, store, "here", None),
            "predict_ray_1_worker": lambda: predict_rate(root, store, "ray1", 1),
            "predict_ray_2_workers": lambda: predict_rate(root, store, "ray2", 2),
        }
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for fn in subjects.values():
            fn()  # warm-up: page cache, tf.function traces, Ray workers
        rates: dict[str, list[float]] = {}
        for r in range(args.rounds):
            names = list(subjects)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                result = subjects[name]()
                if isinstance(result, tuple):  # predict: the whole call, and steady state
                    rates.setdefault(name, []).append(result[0])
                    rates.setdefault(f"{name}_steady", []).append(result[1])
                else:
                    rates.setdefault(name, []).append(result)
        ray.shutdown()
    median = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "keras": keras.__version__,
        "images": 2 * args.images_per_diagnosis,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "images_per_s": {k: round(v, 1) for k, v in median.items()},
        "all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "predict_vs_ceiling": round(median["predict_in_process"] / median["decode_ceiling"], 3),
        "predict_vs_shards_through_model": round(
            median["predict_in_process"] / median["shards_through_model"], 3
        ),
        "input_path_vs_ceiling": round(median["predict_input_path"] / median["decode_ceiling"], 3),
        "predict_steady_vs_ceiling": round(
            median["predict_in_process_steady"] / median["decode_ceiling"], 3
        ),
        "ray_2_vs_1": round(median["predict_ray_2_workers"] / median["predict_ray_1_worker"], 3),
        "ray_2_vs_1_steady": round(
            median["predict_ray_2_workers_steady"] / median["predict_ray_1_worker_steady"], 3
        ),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
