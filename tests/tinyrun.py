"""A tiny REAL `organtrain train` run of several organs, for the tests of what reads a run
back (the report, the status table): synthetic images → prepare → train each organ, in
this process (the same calls `organtrain demo` used to make before it became a sweep;
a real sweep takes minutes on two cores, too slow to share here).

The run id is "tiny"; results land in <root>/store/runs/tiny/<organ>/. The `tiny_run`
fixture (conftest.py) trains one such run of TINY_ORGANS per test session and gives each
module a copy of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from organtrain.config import load_config
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import LocalStorage
from organtrain.train import train_organ

RUN_ID = "tiny"
TINY_ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}


def tiny_job(root: Path, organs: dict[str, list[str]]) -> dict:
    return {
        "name": RUN_ID,
        "storage": {"uri": str(root / "store")},
        "synth": {"organs": organs, "images_per_diagnosis": 24, "image_size": 32,
                  "out": str(root / "src")},
        "prepare": {"source": str(root / "src"), "dataset": "tiny", "test_fraction": 0.25,
                    "val_fraction": 0.25, "min_images_per_diagnosis": 5, "max_image_side": 32,
                    "images_per_shard": 8},
        "input": {"image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
        "model": {"name": "simple_cnn", "filters": [8, 16], "dense_units": 16},
        "train": {"epochs": 1, "early_stopping_patience": 0, "cpu_replicas": 1},
    }  # fmt: skip


def make_tiny_run(root: Path, organs: dict[str, list[str]]) -> LocalStorage:
    """Train every organ of a fresh tiny dataset under `root`; returns the storage.

    Two unusable files are placed in the first organ's tree first, so the dataset has
    rejected files to show (synth adds its images beside them).
    """
    first = next(iter(organs))
    (root / "src" / first / organs[first][0]).mkdir(parents=True)
    (root / "src" / first / organs[first][0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "src" / first / "notes.txt").write_text("not an image")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_job(root, organs)))
    cfg = load_config(path)
    write_synthetic_tree(cfg.synth.out, organs=organs, images_per_diagnosis=24, image_size=32,
                         progress=False)  # fmt: skip
    storage = LocalStorage(cfg.storage.uri)
    prepare(LocalStorage(cfg.prepare.source), storage, cfg.prepare, progress=False)
    for organ in organs:
        train_organ(cfg, storage, organ, run_id=RUN_ID, verbose=0)
    return storage


def copy_tiny_run(template: Path, root: Path) -> LocalStorage:
    """A copy of the tiny run made under `template` (images, store, job file) at `root`,
    its job file pointing at the copy; returns the copy's storage."""
    shutil.copytree(template, root, dirs_exist_ok=True)
    job = root / "tiny.yaml"
    job.write_text(job.read_text().replace(str(template), str(root)))
    return LocalStorage(root / "store")


def write_many_organs(out: Path, names: list[str], *, images_per_diagnosis: int = 24) -> None:
    """Organs under any names: the synthetic blood, colon and lung recipes in turn, each
    copy drawn with its own seed, two diagnoses each, 32 px. For the tests and benchmark
    of many organs searched at once."""
    from organtrain.data.synth import DEFAULT_ORGANS

    recipes = list(DEFAULT_ORGANS.items())
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        recipe, diagnoses = recipes[i % len(recipes)]
        drawn = out.parent / f"{out.name}-drawn-{i}"
        write_synthetic_tree(
            drawn, organs={recipe: list(diagnoses)[:2]},
            images_per_diagnosis=images_per_diagnosis, image_size=32, seed=i, progress=False,
        )  # fmt: skip
        (drawn / recipe).rename(out / name)
        drawn.rmdir()


def many_organs_job(root: Path, *, search: dict, local_cpus: int = 2) -> dict:
    """A tiny sweep over the organs `write_many_organs` put under <root>/src: 32-px
    images, a one-layer CNN, 2 epochs, 1 CPU per trial."""
    return {
        "name": "organs",
        "storage": {"uri": str(root / "store")},
        "prepare": {"source": str(root / "src"), "dataset": "organs", "test_fraction": 0.25,
                    "val_fraction": 0.25, "min_images_per_diagnosis": 2,
                    "max_image_side": 32, "images_per_shard": 16},
        "input": {"image_size": 32, "batch_size": 4, "shuffle_buffer": 32},
        "augment": {"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                    "zoom_range": 0},
        "model": {"name": "simple_cnn", "filters": [8], "dense_units": 8},
        "train": {"epochs": 2, "early_stopping_patience": 0},
        "search": search,
        "resources": {"local_cpus": local_cpus, "cpus_per_trial": 1},
    }  # fmt: skip
