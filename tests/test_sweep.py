"""`organtrain sweep` for real: a local Ray cluster, Ray Tune with ASHA, TensorFlow trials.

Each test runs the command as a user would, in its own process (which starts its own
local Ray), on a tiny synthetic dataset of two organs.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_tensorboard import assert_every_epoch_logged

from organtrain import registry
from organtrain.cli import main
from organtrain.data.dataset import load_dataset, shard_object_key
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.predict import PREDICTIONS
from organtrain.storage import LocalStorage, open_storage

pytestmark = pytest.mark.slow  # real Ray / SLURM / training: minutes

ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}
JOB = {
    "name": "sweep",
    "prepare": {"dataset": "tiny", "test_fraction": 0.25, "val_fraction": 0.25,
                "min_images_per_diagnosis": 5, "max_image_side": 32, "images_per_shard": 8},
    "input": {"image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
    "augment": {"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                "zoom_range": 0},
    "model": {"name": "simple_cnn", "filters": [8, 16], "dense_units": 16},
    "train": {"epochs": 4, "early_stopping_patience": 0},
    "resources": {"local_cpus": 2, "cpus_per_trial": 1},
}  # fmt: skip


def write_job(root: Path, storage_uri: str, **sections) -> Path:
    job = {**JOB, "storage": {"uri": storage_uri}, **sections}
    job["prepare"] = {**JOB["prepare"], "source": str(root / "src")}
    path = root / f"job-{len(list(root.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_synthetic_tree(
        root / "src", organs=ORGANS, images_per_diagnosis=24, image_size=32, progress=False
    )
    return root


@pytest.fixture(scope="module")
def local_job(source) -> Path:
    """A dataset prepared into local storage, shared by the local-storage tests."""
    path = write_job(source, str(source / "store"))
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    return path


def sweep_command(job: Path, *overrides: str) -> list[str]:
    command = [sys.executable, "-m", "organtrain", "sweep", "--config", str(job)]
    return command + [arg for o in overrides for arg in ("--set", o)]


def run_sweep(job: Path, *overrides: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env_vars
    return subprocess.run(
        sweep_command(job, *overrides), capture_output=True, text=True, timeout=420, env=env
    )


def table(storage, key: str) -> list[dict]:
    return read_parquet(storage.get_bytes(key)).to_pylist()


def test_two_organs_searched_at_once_with_asha(local_job, tmp_path):
    space = {"train.learning_rate": {"grid": [3e-3, 1e-6, 1e-7]}}
    done = run_sweep(
        local_job, "name=asha", "search.samples=1", "search.scheduler=asha",
        "search.grace_period=1", "search.reduction_factor=2", f"search.space={json.dumps(space)}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    store = LocalStorage(load_config_uri(local_job))
    run = store.sub("runs/asha")

    summary = table(run, "summary.parquet")
    assert [r["organ"] for r in summary] == ["colon", "lung"]
    assert all(r["state"] == "done" and r["trials"] == 3 for r in summary)
    for row in summary:
        result = json.loads(run.get_bytes(f"{row['organ']}/result.json"))
        assert result["search"]["trial_id"] == row["trial_id"]
        assert result["seconds"] == row["seconds"]  # the organ's wall time in both (#17)
        assert result["test_images"] == row["test_images"] > 0
        assert 0 <= row["test_accuracy"] <= 1
        assert Image.open(run.path(f"{row['organ']}/plots/sweep.png")).format == "PNG"
        for name in ("metrics", "confusion", "history", "predictions"):
            assert run.exists(f"{row['organ']}/metrics/{name}.parquet")

    trials = [
        t for organ in ("colon", "lung") for t in table(run, f"{organ}/metrics/trials.parquet")
    ]
    assert len(trials) == 6 and all(t["status"] == "terminated" for t in trials)
    # ASHA stopped trials that trailed the others at a rung; the rest ran every epoch.
    reasons = [t["stop_reason"] for t in trials]
    assert "scheduler" in reasons, trials
    assert all(t["epochs"] < 4 for t in trials if t["stop_reason"] == "scheduler")
    assert all(t["epochs"] == 4 for t in trials if t["stop_reason"] == "completed")
    assert all(t["replicas"] == 1 for t in trials)
    # Each organ's trials trained on that organ's images (the two searches run at once).
    assert all(t["trained_organ"] == t["organ"] for t in trials)
    # Trials ran side by side: some two of them were training at the same time.
    spans = sorted((t["started"], t["ended"]) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))

    status = json.loads(run.get_bytes("status.json"))
    assert status["state"] == "finished"
    assert {o: s["state"] for o, s in status["organs"].items()} == {"colon": "done", "lung": "done"}
    # Every trial logged every epoch it ran to TensorBoard (ASHA's stopped ones and the
    # last epoch of the others too), numbered as the tables.
    for organ in ("colon", "lung"):
        assert_every_epoch_logged(store, "asha", organ, tmp_path / "tensorboard")
    # Once the search is over, each trial keeps its best and its latest checkpoint only.
    for trial in run.path("tune").glob("*/train_*"):
        assert 1 <= len(list(trial.glob("checkpoint_*"))) <= 2, trial
    # The console's one line per organ (its per-trial lines are -v's).
    assert "  lung: simple_cnn test accuracy" in done.stdout
    assert "  colon: simple_cnn test accuracy" in done.stdout


def test_a_sweeps_model_is_registered_promoted_and_classifies(local_job, source, tmp_path):
    """The chosen model of the ASHA sweep above enters the registry (`models register
    --promote`) and `predict` with the champion gives the sweep's own test predictions."""
    store = LocalStorage(load_config_uri(local_job))
    config = ["--config", str(local_job)]
    assert main(["models", "register", "asha", "colon", "--promote", *config]) == 0
    champion = registry.champion(store, "colon")
    assert champion is not None and champion.version == "asha"
    entry = registry.get_version(store, "colon", "asha")
    chosen = {r["organ"]: r for r in table(store.sub("runs/asha"), "summary.parquet")}["colon"]
    assert entry.search["trial_id"] == chosen["trial_id"]
    assert store.exists("models/colon/versions/asha/MODEL_CARD.md")

    reference = table(store.sub("runs/asha"), "colon/metrics/predictions.parquet")
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{r['source_key']}\n" for r in reference))
    out = tmp_path / "out"
    argv = ["predict", str(source / "src"), "--out", str(out), "--organ", "colon",
            "--keys", str(keys), "--no-progress", *config]  # fmt: skip
    assert main(argv) == 0
    got = {r["key"]: r for r in table(LocalStorage(out), PREDICTIONS)}
    assert len(got) == len(reference) > 0
    for ref in reference:
        row = got[ref["source_key"]]
        assert row["model_version"] == "asha" and row["predicted_class"] == ref["predicted_class"]
        probs = [row[f"p_{c}"] for c in ORGANS["colon"]]
        assert max(abs(a - b) for a, b in zip(probs, ref["probabilities"], strict=True)) < 1e-5


def load_config_uri(job: Path) -> str:
    return yaml.safe_load(job.read_text())["storage"]["uri"]


def test_killed_driver_resumes_without_redoing_finished_work(local_job):
    overrides = (
        "name=resume", "search.samples=1", "search.scheduler=fifo",
        'search.organ_space={"colon": {"train.epochs": 1}, "lung": {"train.epochs": 60}}',
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        sweep_command(local_job, *overrides), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = LocalStorage(load_config_uri(local_job))
    run = store.sub("runs/resume")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            lung_epochs = list(run.path("tune/lung").glob("*/checkpoint_00000[2-9]"))
            if run.exists("colon/result.json") and lung_epochs:
                break
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint of lung's trial and no colon result within 300 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its Ray, its trials: all gone
        driver.wait()
    colon_result = run.path("colon/result.json").stat().st_mtime_ns
    colon_trials = sorted(p.name for p in run.path("tune/colon").iterdir() if p.is_dir())
    colon_progress = {
        p: p.stat().st_mtime_ns for p in run.path("tune/colon").glob("*/progress.csv")
    }
    assert not run.exists("lung/result.json")

    again = run_sweep(local_job, *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished in run resume: colon" in again.stderr
    # The finished organ and its trials were left alone.
    assert run.path("colon/result.json").stat().st_mtime_ns == colon_result
    assert sorted(p.name for p in run.path("tune/colon").iterdir() if p.is_dir()) == colon_trials
    assert {p: p.stat().st_mtime_ns for p in colon_progress} == colon_progress
    # Lung's trial continued from its last checkpoint, not from the first epoch.
    (trial,) = [p for p in run.path("tune/lung").iterdir() if p.is_dir()]
    last = max(trial.glob("checkpoint_*"))
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 60 and len(state["history"]["loss"]) == 60
    assert state["starts"][0] == 0 and len(state["starts"]) == 2 and state["starts"][1] >= 2
    summary = table(run, "summary.parquet")
    assert [(r["organ"], r["state"]) for r in summary] == [("colon", "done"), ("lung", "done")]


def test_sweep_on_s3_two_replicas_and_test_split_untouched(source, s3_uri, tmp_path):
    """The whole sweep's storage (dataset, Tune state, results) on SeaweedFS; trials of
    lung span 2 replicas; colon's test shards are removed first: its trials still run
    (no trial opens a test shard) and only its final evaluation fails, naming the shard,
    while lung finishes."""
    job = write_job(source, s3_uri)
    assert main(["prepare", "--config", str(job), "--no-progress"]) == 0
    storage = open_storage(s3_uri)
    index = load_dataset(storage, "tiny")
    for shard in index.shards_for("colon", "test"):
        storage.delete(shard_object_key(index, shard))

    done = run_sweep(
        job, "name=s3", "search.samples=1", "search.scheduler=fifo", "train.epochs=2",
        "train.cpu_replicas=2",
        # An empty node cache: the same dataset version may be cached by an earlier S3 run
        # (shard bytes are deterministic), and the removed shards must really be missing.
        ORGANTRAIN_CACHE_DIR=str(tmp_path / "node-cache"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]  # one organ failed, the other finished
    run = storage.sub("runs/s3")
    summary = {r["organ"]: r for r in table(run, "summary.parquet")}
    assert summary["lung"]["state"] == "done"
    lung = json.loads(run.get_bytes("lung/result.json"))
    assert lung["replicas"] == 2 and lung["global_batch"] == 8
    assert [t["replicas"] for t in table(run, "lung/metrics/trials.parquet")] == [2]

    assert summary["colon"]["state"] == "failed"
    assert "shards/colon/test-" in summary["colon"]["error"], summary["colon"]["error"]
    colon_trials = table(run, "colon/metrics/trials.parquet")
    assert [(t["status"], t["stop_reason"], t["epochs"]) for t in colon_trials] == [
        ("terminated", "completed", 2)
    ]
    # Tune kept its experiment state and checkpoints in the bucket too.
    tune_keys = [i.key for i in run.list("tune/lung")]
    assert any(k.endswith("/checkpoint_000001/model.keras") for k in tune_keys)
    assert any(k.split("/")[-1].startswith("experiment_state") for k in tune_keys)
    # TensorBoard logs in the bucket, every epoch, read back from a local copy.
    assert_every_epoch_logged(storage, "s3", "lung", tmp_path / "tensorboard")
