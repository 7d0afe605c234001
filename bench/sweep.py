"""Sweep benchmark: Ray Tune's overhead, and what ASHA saves, on one organ's search.

One local Ray (started once, so its start-up is not counted), one synthetic organ
prepared once, and the same grid of trials searched twice, one after the other:

  FIFO  every trial runs all its epochs;
  ASHA  the same trials, stopped at rungs when they trail (grace period, reduction factor).

For each search:
  overhead = search wall time / (sum of the trials' own times / concurrent slots)
  where the search wall time is Tune's `Tuner.fit` in the organ's search task, the
  trials' times are what Tune measured inside each trial (time_total_s: data and model
  set-up plus epochs, checkpoints included), and the slots are CPUs / cpus_per_trial.
  What is left over is Tune and Ray: scheduling, starting each trial's worker process
  (Python, Ray and TensorFlow imports; reused by the organ's next trial), the
  controller's experiment state. The whole `sweep` call (plus planning, the chosen
  model's test evaluation in its own task, tables and plots) is reported beside it.

ASHA's saving is its trial-seconds and epochs against FIFO's, next to the best validation
metric and the test accuracy of the model each search chose.

    python bench/sweep.py --out bench/sweep_results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import datetime
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import ray

from organtrain.config import load_config
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.search.sweep import sweep
from organtrain.storage import LocalStorage

ORGAN = "blood"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-diagnosis", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cpus", type=int, default=2, help="local Ray CPUs (= slots)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_tree(
            root / "src", organs={ORGAN: ["malaria_parasitized", "uninfected"]},
            images_per_diagnosis=args.images_per_diagnosis, image_size=args.image_size,
            progress=False,
        )  # fmt: skip
        cfg = job(root, args)
        prepare(LocalStorage(root / "src"), LocalStorage(root / "store"), cfg.prepare)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        figures = {name: search(cfg, name, root) for name in ("fifo", "asha")}
        ray.shutdown()

    fifo, asha = figures["fifo"], figures["asha"]
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "setup": {**vars(args), "out": str(args.out), "trials": fifo["trials"]},
        "fifo": fifo,
        "asha": asha,
        "asha_saves": {
            "trial_seconds": 1 - asha["trial_seconds"] / fifo["trial_seconds"],
            "epochs": 1 - asha["epochs"] / fifo["epochs"],
            "wall": 1 - asha["search_wall"] / fifo["search_wall"],
        },
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def job(root: Path, args):
    space = {
        "train.learning_rate": {"grid": [3e-3, 1e-3, 3e-4]},
        "model.filters": {"grid": [[16, 32], [32, 64, 64]]},
    }
    overrides = [
        f"storage.uri={root / 'store'}",
        f"prepare.source={root / 'src'}",
        "prepare.dataset=bench",
        f"prepare.max_image_side={args.image_size}",
        f"input.image_size={args.image_size}",
        "augment.rotation_range=0", "augment.width_shift_range=0",
        "augment.height_shift_range=0", "augment.zoom_range=0",
        f"train.epochs={args.epochs}",
        "train.early_stopping_patience=0",  # every FIFO trial runs every epoch
        "search.samples=1",
        "search.grace_period=2",
        "search.reduction_factor=3",
        f"search.space={json.dumps(space)}",
    ]  # fmt: skip
    return load_config(None, overrides)


def search(cfg, scheduler: str, root: Path) -> dict:
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, scheduler=scheduler))
    started = time.monotonic()
    outcome = sweep(cfg, run_id=scheduler, report=False)
    wall = time.monotonic() - started
    run = LocalStorage(root / "store").sub(f"runs/{scheduler}")
    result = json.loads(run.get_bytes(f"{ORGAN}/result.json"))
    trials = read_parquet(run.get_bytes(f"{ORGAN}/metrics/trials.parquet")).to_pylist()
    slots = ray.cluster_resources()["CPU"] / cfg.resources.cpus_per_trial
    search_wall = result["search"]["search_seconds"]
    trial_seconds = sum(t["seconds"] for t in trials)
    (row,) = outcome.rows
    return {
        "trials": len(trials),
        "stopped_early": sum(t["stop_reason"] == "scheduler" for t in trials),
        "epochs": sum(t["epochs"] for t in trials),
        "trial_seconds": trial_seconds,
        "slots": slots,
        "sweep_wall": wall,
        "search_wall": search_wall,
        "overhead": search_wall / (trial_seconds / slots),
        "sweep_overhead": wall / (trial_seconds / slots),
        "best_val_loss": row["val_value"],
        "test_accuracy": row["test_accuracy"],
        "chosen": row["trial_config"],
    }


if __name__ == "__main__":
    main()
