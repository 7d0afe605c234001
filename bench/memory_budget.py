"""A trial's peak memory at 224 px as its organ grows, with and without the memory budget.

Makes one dataset with a small and a large organ of 224-px noise images (distinct, so
nothing is merged as a near duplicate; PNG, 150 kB decoded), then trains each organ for
two epochs in a fresh process per run (a small CNN, no augmentation: the input pipeline is
what differs) and records the process's peak RSS (VmHWM) and how far it rose during `fit`
above where it stood before (VmHWM reset through /proc/self/clear_refs, minus VmRSS),
which leaves TensorFlow's start-up out. Runs:

- budget: `input.memory_budget_mb` (default 64): images cached on disk, the shuffle
  buffer shrunk to fit;
- memory: `input.cache: memory` (uint8 images in RAM, no budget to speak of);
- before (with `--before-ref REF`): the input pipeline of a commit before the budget
  (`data/pipeline.py` read with `git show REF:...`), which cached float32 images in
  memory, put in place of today's `build_dataset`; the rest of the code is today's (older
  trees cannot read today's dataset format).

    python bench/memory_budget.py                       # 500 and 2,000 images
    python bench/memory_budget.py --before-ref a59b008  # also the float32 cache of that commit

Results: bench/memory_budget_results.json and a table on stdout. Three processes run at a
time (peak RSS is per process; times are not compared).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 224

# One training run; prints its peak RSS and the rise during fit, in MB. With OLD_PIPELINE
# (a pipeline.py of an older commit), its build_dataset replaces today's.
TRAIN_AND_MEASURE = textwrap.dedent("""
    import importlib.util, json, os, sys
    from pathlib import Path
    import keras
    from organtrain.config import load_config
    from organtrain.data.dataset import load_dataset
    from organtrain.storage import LocalStorage
    import organtrain.train as train

    def status_mb(field):
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(l for l in lines if l.startswith(field + ":")).split()[1]) / 1024

    job, organ, *settings = sys.argv[1:]
    cfg = load_config(job, settings)
    store = LocalStorage(cfg.storage.uri)
    index = load_dataset(store, cfg.prepare.dataset)
    keras.utils.set_random_seed(0)
    model = train.compiled_model(cfg, 2)
    batch = cfg.input.batch_size

    def run(train_ds, val_ds, plan):
        before = status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        train.fit(model, cfg, index, organ, batch, train_ds, val_ds, 0, [], verbose=0)
        return {"rise_mb": status_mb("VmHWM") - before, "plan": plan}

    if os.environ.get("OLD_PIPELINE"):
        spec = importlib.util.spec_from_file_location("old_pipeline", os.environ["OLD_PIPELINE"])
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

        def old_build(files, cache=None, cache_file=None, **kwargs):
            return old.build_dataset(files, cache_images=True, **kwargs)

        train.build_dataset = old_build
    with train.training_data(cfg, store, index, organ, batch) as (t, v, plan):
        record = run(t, v, None if os.environ.get("OLD_PIPELINE") else plan.record())
    import resource
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(record))
""")


def make_dataset(root: Path, organs: dict[str, int]) -> Path:
    import numpy as np
    import yaml
    from PIL import Image

    from organtrain.cli import main

    rng = np.random.default_rng(0)
    for organ, images in organs.items():
        for diagnosis in ("a", "b"):
            folder = root / "src" / organ / diagnosis
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images // 2):
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)
    job = {
        "name": "membench", "storage": {"uri": str(root / "store")},
        "prepare": {"dataset": "membench", "source": str(root / "src"), "test_fraction": 0.02,
                    "val_fraction": 0.1, "max_image_side": SIZE, "images_per_shard": 256},
        "input": {"image_size": SIZE, "batch_size": 16},
        "model": {"name": "simple_cnn", "filters": [4], "dense_units": 0},
        "train": {"epochs": 2, "early_stopping_patience": 0},
        "augment": {"placement": "dataset", "rotation_range": 0, "zoom_range": 0,
                    "width_shift_range": 0, "height_shift_range": 0, "horizontal_flip": False,
                    "vertical_flip": False, "brightness_range": None},
    }  # fmt: skip
    path = root / "membench.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    print(f"prepared {sum(organs.values())} images in {time.monotonic() - started:.0f} s")
    return path


def old_pipeline(ref: str, root: Path) -> Path:
    """`ref`'s data/pipeline.py, read with git show (the working tree is not touched)."""
    show = ["git", "-C", str(REPO), "show", f"{ref}:src/organtrain/data/pipeline.py"]
    text = subprocess.run(show, capture_output=True, check=True, text=True).stdout
    path = root / f"pipeline-{ref}.py"
    path.write_text(text)
    return path


def start(job: Path, organ: str, settings: list[str], pipeline: Path | None) -> subprocess.Popen:
    # Two malloc arenas: with one per busy thread, the peak moved by +-20 MB between runs.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if pipeline is not None:
        env["OLD_PIPELINE"] = str(pipeline)
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_AND_MEASURE, str(job), organ, *settings],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--budget-mb", type=int, default=64)
    parser.add_argument("--before-ref", default=None, help="also run this git ref's code")
    parser.add_argument("--work", default=None, help="folder for the data (default: a temp)")
    parser.add_argument("--out", default=str(REPO / "bench" / "memory_budget_results.json"))
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="membench-"))
    organs = {"small": args.small, "large": args.large}
    job = make_dataset(root, organs)
    before = old_pipeline(args.before_ref, root) if args.before_ref else None
    runs = {}
    for organ in organs:
        runs[f"{organ} budget"] = (organ, [f"input.memory_budget_mb={args.budget_mb}"], None)
        runs[f"{organ} memory"] = (organ, ["input.cache=memory"], None)
        if before is not None:
            runs[f"{organ} before"] = (organ, ["input.cache=memory"], before)
    results = {}
    names = list(runs)
    for first in range(0, len(names), 3):
        batch = {name: start(job, *runs[name]) for name in names[first : first + 3]}
        for name, process in batch.items():
            out, err = process.communicate(timeout=1800)
            if process.returncode != 0:
                sys.exit(f"{name} failed:\n{err[-3000:]}")
            results[name] = json.loads(out.strip().splitlines()[-1])
    image_mb = SIZE * SIZE * 3 / 2**20
    report = {"image_size": SIZE, "organs": organs, "budget_mb": args.budget_mb,
              "uint8_image_mb": image_mb, "before_ref": args.before_ref,
              "runs": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':<16}{'peak RSS MB':>12}{'rise in fit MB':>16}  cache, shuffle buffer")
    for name, r in results.items():
        plan = r["plan"] or {"cache": "memory (float32)", "shuffle_buffer": 2048}
        print(f"{name:<16}{r['peak_mb']:>12.0f}{r['rise_mb']:>16.0f}  "
              f"{plan['cache']}, {plan['shuffle_buffer']}")  # fmt: skip


if __name__ == "__main__":
    main()
