"""One organ, one trial, for real: MirroredStrategy over 2 logical CPUs, resume, outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from organtrain.cli import main
from organtrain.config import load_config
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ConfigError, OrgantrainError
from organtrain.storage import LocalStorage
from organtrain.train import require_same_settings, train_organ, trial_prefix, trial_settings

TINY = {
    "name": "tiny",
    "synth": {"organs": {"lung": ["adenocarcinoma", "benign"]}, "images_per_diagnosis": 24,
              "image_size": 32},
    "prepare": {"dataset": "tiny", "test_fraction": 0.25, "val_fraction": 0.25,
                "min_images_per_diagnosis": 5, "max_image_side": 32, "images_per_shard": 8},
    "input": {"image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
    "model": {"name": "simple_cnn", "filters": [8, 16], "dense_units": 16},
    "train": {"epochs": 2, "early_stopping_patience": 0, "cpu_replicas": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """A tiny job file and its prepared dataset, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("tiny")
    job = {**TINY, "storage": {"uri": str(root / "store")},
           "synth": {**TINY["synth"], "out": str(root / "src")},
           "prepare": {**TINY["prepare"], "source": str(root / "src")}}  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    synth = job["synth"]
    write_synthetic_tree(
        synth["out"], organs=synth["organs"], image_size=synth["image_size"],
        images_per_diagnosis=synth["images_per_diagnosis"], progress=False,
    )  # fmt: skip
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    return path


def test_two_replicas_global_batch_and_outputs(tiny_job):
    cfg = load_config(tiny_job)
    store = LocalStorage(cfg.storage.uri)
    result = train_organ(cfg, store, "lung", run_id="two-replicas", expected_replicas=2, verbose=0)
    assert result.replicas == 2
    assert result.global_batch == 2 * cfg.input.batch_size
    assert result.epochs_run == 2 and result.classes == ["adenocarcinoma", "benign"]
    assert 0 <= result.test_accuracy <= 1 and result.test_images > 0

    out = store.sub(trial_prefix("two-replicas", "lung"))
    metrics = read_parquet(out.get_bytes("metrics/metrics.parquet")).to_pylist()
    accuracy = [m for m in metrics if m["metric"] == "accuracy"]
    assert accuracy[0]["value"] == pytest.approx(result.test_accuracy)
    assert {m["split"] for m in metrics} == {"test"}
    history = read_parquet(out.get_bytes("metrics/history.parquet")).to_pylist()
    assert {h["epoch"] for h in history} == {1, 2}
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= {h["metric"] for h in history}
    for plot in ("learning_curves", "confusion_matrix", "roc"):
        path = out.path(f"plots/{plot}.png")
        assert Image.open(path).format == "PNG"
    assert out.exists("model.keras")
    # One prediction per test image, traceable to the test split of the manifest.
    predictions = read_parquet(out.get_bytes("metrics/predictions.parquet")).to_pylist()
    manifest = read_parquet(
        store.get_bytes(f"datasets/tiny/{result.dataset_version}/manifest.parquet")
    ).to_pylist()
    test_files = {
        (m["sha256"], m["key"]) for m in manifest if m["split"] == "test" and not m["duplicate_of"]
    }
    assert {(p["sha256"], p["source_key"]) for p in predictions} == test_files
    assert len(predictions) == result.test_images
    right = sum(p["true_class"] == p["predicted_class"] for p in predictions)
    assert right / len(predictions) == pytest.approx(result.test_accuracy)
    assert all(p["confidence"] == max(p["probabilities"]) for p in predictions)
    # Checkpoints of stale epochs are removed; the best and latest stay.
    left = [i.key for i in out.list("checkpoint")]
    assert "checkpoint/state.json" in left and len(left) <= 3


def test_replica_count_mismatch_is_an_error(tiny_job):
    cfg = load_config(tiny_job)
    with pytest.raises(OrgantrainError, match="asked for 3 replicas but 2 devices"):
        train_organ(cfg, LocalStorage(cfg.storage.uri), "lung", run_id="x", expected_replicas=3)


def test_finished_trial_is_not_redone(tiny_job):
    cfg = load_config(tiny_job)
    store = LocalStorage(cfg.storage.uri)
    first = train_organ(cfg, store, "lung", run_id="once", verbose=0)
    before = store.stat(f"{trial_prefix('once', 'lung')}/result.json").version_tag
    again = train_organ(cfg, store, "lung", run_id="once", verbose=0)
    assert again == first
    assert store.stat(f"{trial_prefix('once', 'lung')}/result.json").version_tag == before
    # Another configuration under the same run id would mix two experiments: refused.
    other = load_config(tiny_job, ["model.dense_units=32"])
    with pytest.raises(
        ConfigError, match=r"another configuration \(model\.dense_units: 16 -> 32\)"
    ):
        train_organ(other, store, "lung", run_id="once", verbose=0)


def test_early_stopping_on_validation_loss(tiny_job):
    cfg = load_config(tiny_job, ["train.learning_rate=1e-12", "train.epochs=6",
                                 "train.early_stopping_patience=2"])  # fmt: skip
    result = train_organ(cfg, LocalStorage(cfg.storage.uri), "lung", run_id="early", verbose=0)
    assert result.stopped_early and result.epochs_run < 6


def start_until_checkpoint(command: list[str], store, state_key: str) -> subprocess.Popen:
    """Start `organtrain train` and return it, running, once its first epoch is saved."""
    train = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not store.exists(state_key):
        assert train.poll() is None, train.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    return train


def test_killed_training_resumes_from_its_checkpoint(tiny_job):
    cfg = load_config(tiny_job)
    store = LocalStorage(cfg.storage.uri)
    state_key = f"{trial_prefix('resume', 'lung')}/checkpoint/state.json"
    command = [sys.executable, "-m", "organtrain", "train", "--config", str(tiny_job),
               "--organ", "lung", "--run-id", "resume", "--set", "train.epochs=6"]  # fmt: skip
    first = start_until_checkpoint(command, store, state_key)
    first.kill()  # SIGKILL: no handler runs, as when a node is lost
    first.wait()
    done = json.loads(store.get_bytes(state_key))["epoch"]
    assert 1 <= done < 6, "killed too late to show a resume"

    second = subprocess.run(command, capture_output=True, text=True, check=True)
    output = second.stdout + second.stderr
    assert f"from epoch {done + 1} of 6" in output
    assert f"Epoch {done + 1}/6" in output and "Epoch 1/6" not in output
    state = json.loads(store.get_bytes(state_key))
    assert state["epoch"] == 6 and len(state["history"]["loss"]) == 6
    assert "test accuracy" in output
    assert os.path.exists(store.path(f"{trial_prefix('resume', 'lung')}/result.json"))


def test_sigterm_stops_training_like_ctrl_c_and_frees_the_organ(tiny_job):
    """SLURM's preemption and `scancel` send SIGTERM: train exits 130 with its checkpoint
    and releases the organ's lock, so a requeued job on another node starts at once (a
    lock left by a killed process on another host is only taken over after 10 minutes)."""
    cfg = load_config(tiny_job)
    store = LocalStorage(cfg.storage.uri)
    state_key = f"{trial_prefix('sigterm', 'lung')}/checkpoint/state.json"
    command = [sys.executable, "-m", "organtrain", "train", "--config", str(tiny_job),
               "--organ", "lung", "--run-id", "sigterm", "--set", "train.epochs=50"]  # fmt: skip
    train = start_until_checkpoint(command, store, state_key)
    assert store.exists("locks/runs/sigterm/lung.json")
    train.send_signal(signal.SIGTERM)
    output = train.communicate(timeout=120)[0].decode()
    assert train.returncode == 130, output
    assert "interrupted; re-run the same command to continue" in output
    assert not store.exists("locks/runs/sigterm/lung.json")
    assert 1 <= json.loads(store.get_bytes(state_key))["epoch"] < 50


# The smallest run that still exercises every random part: 2 replicas, augmentation on (in
# tf.data, the CPU default), dropout, 2 epochs of shuffled batches.
SMALL = ["input.image_size=16", "train.epochs=2"]


def _numbers(store: LocalStorage, run_id: str) -> tuple[dict, list]:
    """(history per metric per epoch, predictions) of a finished run, as stored."""
    out = store.sub(trial_prefix(run_id, "lung"))
    history = json.loads(out.get_bytes("checkpoint/state.json"))["history"]
    table = read_parquet(out.get_bytes("metrics/history.parquet")).to_pylist()
    assert {(h["metric"], h["epoch"]): h["value"] for h in table} == {
        (metric, epoch + 1): value for metric, values in history.items()
        for epoch, value in enumerate(values)
    }  # fmt: skip
    predictions = read_parquet(out.get_bytes("metrics/predictions.parquet")).to_pylist()
    return history, [(p["sha256"], p["predicted_class"], p["probabilities"]) for p in predictions]


@pytest.fixture(scope="module")
def seeded_run(tiny_job):
    """The numbers of one seeded run of SMALL, trained in this process."""
    cfg = load_config(tiny_job, SMALL)
    store = LocalStorage(cfg.storage.uri)
    result = train_organ(cfg, store, "lung", run_id="seeded", expected_replicas=2, verbose=0)
    assert result.replicas == 2 and cfg.augment.rotation_range > 0 and cfg.model.dropout > 0
    numbers = _numbers(store, "seeded")
    assert len(numbers[0]["loss"]) == 2 and len(numbers[1]) == result.test_images
    return numbers


def test_seeded_runs_repeat_exactly(tiny_job, seeded_run):
    # The same run again in a fresh process (the CLI): bit-identical, not approximately.
    sets = [arg for change in SMALL for arg in ("--set", change)]
    subprocess.run([sys.executable, "-m", "organtrain", "train", "--config", str(tiny_job),
                    "--organ", "lung", "--run-id", "seeded-again", *sets],
                   check=True, capture_output=True)  # fmt: skip
    assert _numbers(LocalStorage(load_config(tiny_job).storage.uri), "seeded-again") == seeded_run


def test_resumed_run_continues_as_an_uninterrupted_one(tiny_job, seeded_run):
    # Each epoch's shuffle, augmentation and dropout depend on (seed, epoch), not on how
    # many epochs this process has run: stopping after epoch 1 changes nothing.
    store = LocalStorage(load_config(tiny_job).storage.uri)
    first_epoch = load_config(tiny_job, [*SMALL, "train.epochs=1"])
    train_organ(first_epoch, store, "lung", run_id="stopped", verbose=0)
    store.delete(f"{trial_prefix('stopped', 'lung')}/result.json")  # as if killed after epoch 1
    train_organ(load_config(tiny_job, SMALL), store, "lung", run_id="stopped", verbose=0)
    assert _numbers(store, "stopped") == seeded_run


def test_a_run_recorded_before_a_setting_existed_resumes_unless_that_setting_changes():
    """Settings added to organtrain later (class_weight, mixed_precision, hed_jitter...)
    are missing from older runs' records: those runs had the setting's default."""
    cfg = load_config(None, [])
    saved = trial_settings(cfg)
    for section, key in (("train", "class_weight"), ("augment", "hed_jitter")):
        del saved[section][key]
    require_same_settings(saved, trial_settings(cfg), "runs/old")  # resumes
    changed = load_config(None, ["train.class_weight=balanced"])
    with pytest.raises(ConfigError, match=r"train\.class_weight: 'none' -> 'balanced'"):
        require_same_settings(saved, trial_settings(changed), "runs/old")
