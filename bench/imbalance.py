"""Imbalanced diagnoses on real images: `train.class_weight: balanced` against `none`.

The BCCD blood-cell crops (../shared/data/bccd-cells: one organ, `blood`, three cell
types, 85 % red cells, grouped by the smear each crop came from) are prepared with
organtrain's own `prepare` into a temporary storage, then `organtrain train`'s own code
(`train.train_organ`: the tf.data pipeline, augmentation, MirroredStrategy, checkpoints,
early stopping on val_loss, the test evaluation) trains a small simple_cnn on 64-px
images, once without and once with class weights, for each seed. Both arms of a seed
share everything else (seed, images, epochs), so the difference is the weighting.

Reported per run, from the run's own metrics/metrics.parquet: test accuracy, balanced
accuracy, per-class recall; and per seed the paired comparison of the two arms on the
same test images (stats.compare_predictions: bootstrap interval of the difference, exact
McNemar). Target (issue #12): the rarest diagnosis's recall rises, and accuracy drops by
no more than one point.

    python bench/imbalance.py --seeds 0 1 --epochs 3 12 --out bench/imbalance_results.json

Two training budgets: 3 epochs (a model stopped early, or a larger one trained briefly,
as in a sweep's ASHA rungs) and 12 (trained until val_loss stops improving here).

`--work DIR` keeps the prepared dataset and the finished runs: running again with the
same settings reuses them (a finished run is not retrained).
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

import tensorflow as tf

from organtrain import stats
from organtrain.config import load_config
from organtrain.data.dataset import load_dataset
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import prepare
from organtrain.storage import LocalStorage
from organtrain.train import train_organ, trial_prefix

ORGAN = "blood"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd-cells"
ARMS = ("none", "balanced")


def job(args, root: Path) -> dict:
    """The run configuration every run shares (class_weight, seed, epochs set per run)."""
    return {
        "name": "imbalance",
        "storage": {"uri": str(root / "store")},
        "prepare": {"source": str(args.data), "dataset": "bccd", "max_image_side": 96,
                    "encoding": "jpeg", "test_fraction": 0.15, "val_fraction": 0.15},
        "input": {"image_size": args.image_size, "batch_size": 32, "shuffle_buffer": 4096},
        # Cells have no up or left: flips and rotation are fair; the crops' scale carries
        # the cell type (platelets are small), so no zoom.
        "augment": {"zoom_range": 0.0, "width_shift_range": 0.1, "height_shift_range": 0.1,
                    "brightness_range": [0.8, 1.2], "placement": "dataset"},
        "model": {"name": "simple_cnn", "filters": [16, 32, 64], "dense_units": 64,
                  "dropout": 0.3, "pooling": "max"},
        "train": {"learning_rate": 1e-3, "early_stopping_patience": args.patience},
    }  # fmt: skip


def run_id(class_weight: str, seed: int, epochs: int) -> str:
    """Epochs in the id: a finished run is reused only by a bench of the same length."""
    return f"{class_weight}-seed{seed}-epochs{epochs}"


def run_once(path: Path, storage, class_weight: str, seed: int, epochs: int) -> dict:
    overrides = [f"train.class_weight={class_weight}", f"train.seed={seed}",
                 f"train.epochs={epochs}"]  # fmt: skip
    run = run_id(class_weight, seed, epochs)
    result = train_organ(load_config(path, overrides), storage, ORGAN, run_id=run, verbose=0)
    out = storage.sub(trial_prefix(run, ORGAN))
    rows = read_parquet(out.get_bytes("metrics/metrics.parquet")).to_pylist()
    value = {(r["metric"], r["class_name"]): r["value"] for r in rows}
    history = read_parquet(out.get_bytes("metrics/history.parquet")).to_pylist()
    by_epoch = {
        metric: [h["value"] for h in sorted(history, key=lambda h: h["epoch"])
                 if h["metric"] == metric]
        for metric in ("val_accuracy", "val_balanced_accuracy")
    }  # fmt: skip
    return {
        "run_id": run,
        "epochs": epochs,
        "class_weight": class_weight,
        "seed": seed,
        "class_weights": result.class_weights,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,  # by val_loss: the epoch evaluated on test
        "stopped_early": result.stopped_early,
        "test_images": result.test_images,
        "accuracy": value[("accuracy", None)],
        "balanced_accuracy": value[("balanced_accuracy", None)],
        "macro_f1": value[("macro_f1", None)],
        "recall": {c: value[("recall", c)] for c in result.classes},
        "precision": {c: value[("precision", c)] for c in result.classes},
        "support": {c: int(value[("support", c)]) for c in result.classes},
        "validation_by_epoch": by_epoch,
        "seconds": round(result.seconds, 1),  # training time, also when reused from --work
    }


def paired(storage, seed: int, epochs: int) -> dict:
    """Weighted (challenger) against unweighted (champion) on the same test images."""
    tables = [
        read_parquet(storage.get_bytes(
            f"{trial_prefix(run_id(arm, seed, epochs), ORGAN)}/metrics/predictions.parquet"
        ))
        for arm in ARMS
    ]  # fmt: skip
    out = {}
    for metric in ("accuracy", "balanced_accuracy"):
        c = stats.compare_predictions(*tables, metric=metric)
        out[metric] = {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                       "mcnemar_p": c.p_value, "b": c.b, "c": c.c}  # fmt: skip
    return out


def summarise(runs: list[dict], rarest: str) -> dict:
    """Means over seeds per arm, for the runs of one epoch budget, and the target."""

    def mean(arm, get):
        return statistics.fmean(get(r) for r in runs if r["class_weight"] == arm)

    summary = {}
    for arm in ARMS:
        summary[arm] = {
            "accuracy": mean(arm, lambda r: r["accuracy"]),
            "balanced_accuracy": mean(arm, lambda r: r["balanced_accuracy"]),
            "recall": {c: mean(arm, lambda r, c=c: r["recall"][c]) for c in runs[0]["recall"]},
        }
    none, balanced = summary["none"], summary["balanced"]
    accuracy_lost = none["accuracy"] - balanced["accuracy"]
    rarest_gain = balanced["recall"][rarest] - none["recall"][rarest]
    summary["rarest_class"] = rarest
    summary["rarest_recall_gain"] = rarest_gain
    summary["accuracy_lost"] = accuracy_lost
    summary["balanced_accuracy_gain"] = balanced["balanced_accuracy"] - none["balanced_accuracy"]
    summary["target_met"] = bool(rarest_gain > 0 and accuracy_lost <= 0.01)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=[3, 12],
        help="training budgets: each is run for every seed and both arms",
    )
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, help="keep the dataset and runs here")
    parser.add_argument("--out", type=Path, default=Path("bench/imbalance_results.json"))
    args = parser.parse_args()  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="organtrain-imbalance-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        path = root / "imbalance.json"  # JSON is YAML: load_config reads it
        path.write_text(json.dumps(job(args, root), indent=2))
        cfg = load_config(path)
        storage = LocalStorage(cfg.storage.uri)
        started = time.monotonic()
        prepared = prepare(LocalStorage(args.data), storage, cfg.prepare, progress=False)
        prepare_seconds = time.monotonic() - started
        index = load_dataset(storage, prepared.dataset, prepared.version)
        counts = index.organs[ORGAN].counts
        rarest = min(counts["train"], key=counts["train"].get)
        print(f"prepared {prepared.images} images in {prepare_seconds:.0f} s; counts {counts}")

        runs = []
        for epochs in args.epochs:
            for seed in args.seeds:
                for arm in ARMS:  # the two arms of one seed back to back: the same load
                    runs.append(r := run_once(path, storage, arm, seed, epochs))
                    print(f"{r['run_id']}: accuracy {r['accuracy']:.3f}, balanced "
                          f"{r['balanced_accuracy']:.3f}, recall {r['recall']}, "
                          f"{r['epochs_run']} epochs (best {r['best_epoch']}), "
                          f"{r['seconds']} s", flush=True)  # fmt: skip
        job_sections = ("input", "augment", "model", "train")
        results = {
            "what": "BCCD blood-cell crops, simple_cnn: train.class_weight none vs balanced",
            "data": {
                "source": "bccd-cells (shared/data)",
                "images": prepared.images,
                "counts": counts,
                "groups": index.organs[ORGAN].groups,
            },
            "settings": {
                "image_size": args.image_size,
                "epochs": args.epochs,
                "early_stopping_patience": args.patience,
                "seeds": args.seeds,
                "job": {k: v for k, v in job(args, root).items() if k in job_sections},
            },
            "machine": {
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
            },
            "prepare_seconds": round(prepare_seconds, 1),
            "runs": runs,
            "paired": {
                f"epochs{e}-seed{s}": paired(storage, s, e) for e in args.epochs for s in args.seeds
            },
            "summary": {
                f"epochs{e}": summarise([r for r in runs if r["epochs"] == e], rarest)
                for e in args.epochs
            },
        }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for budget, s in results["summary"].items():
        print(f"{budget}: " + json.dumps({k: s[k] for k in ARMS}))
        print(
            f"{budget}: rarest ({rarest}) recall {s['rarest_recall_gain']:+.3f}, accuracy "
            f"lost {s['accuracy_lost']:+.3f}: target {'met' if s['target_met'] else 'missed'}"
        )


if __name__ == "__main__":
    main()
