"""Imbalanced diagnoses (issue #12 item 2): `train.class_weight`, balanced accuracy and
per-class recall in the tables, the report, `status`, a sweep's metric and the nightly's.

One small imbalanced organ (3 adenocarcinoma images for every benign one), prepared once
and trained for real; the sweep and the nightly run once, in the slow test at the end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.utils.class_weight import compute_class_weight

from organtrain import evaluate, nightly, registry, stats
from organtrain.checkpoint import TrainingState, load_checkpoint
from organtrain.config import load_config
from organtrain.data.dataset import dataset_prefix, load_dataset
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import prepare
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ConfigError
from organtrain.metrics import BalancedAccuracy
from organtrain.report import build_report
from organtrain.status import render_status
from organtrain.storage import LocalStorage
from organtrain.train import (
    class_weights,
    compiled_model,
    datasets,
    fit,
    predict_split,
    train_organ,
    trial_prefix,
)

ORGAN = "lung"
IMAGES = {"adenocarcinoma": 48, "benign": 16}
# No augmentation and no dropout: a training step's forward pass is then the inference
# pass, so the loss Keras reports can be recomputed by hand from predictions.
JOB = {
    "name": "imbalance",
    "prepare": {"dataset": "imb", "test_fraction": 0.25, "val_fraction": 0.25,
                "min_images_per_diagnosis": 5, "max_image_side": 32, "images_per_shard": 64},
    "input": {"image_size": 32, "batch_size": 8, "shuffle_buffer": 64},
    "augment": {"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                "zoom_range": 0, "horizontal_flip": False, "vertical_flip": False,
                "brightness_range": None, "placement": "dataset"},
    "model": {"name": "simple_cnn", "filters": [8], "dense_units": 8, "dropout": 0.0},
    "train": {"epochs": 2, "early_stopping_patience": 0, "class_weight": "balanced"},
}  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(job file, storage) of a prepared imbalanced organ."""
    root = tmp_path_factory.mktemp("imbalance")
    for seed, (diagnosis, count) in enumerate(IMAGES.items()):
        write_synthetic_tree(root / "src", organs={ORGAN: [diagnosis]}, image_size=32,
                             images_per_diagnosis=count, seed=seed, progress=False)  # fmt: skip
    job = {**JOB, "storage": {"uri": str(root / "store")},
           "prepare": {**JOB["prepare"], "source": str(root / "src")}}  # fmt: skip
    path = root / "imbalance.yaml"
    path.write_text(yaml.safe_dump(job))
    cfg = load_config(path)
    storage = LocalStorage(cfg.storage.uri)
    prepare(LocalStorage(cfg.prepare.source), storage, cfg.prepare, progress=False)
    return path, storage


# --- Configuration ----------------------------------------------------------------------


def test_class_weight_and_metrics_are_validated_and_searchable():
    with pytest.raises(ConfigError, match=r"train\.class_weight must be one of none, balanced"):
        load_config(overrides=["train.class_weight=balancd"])
    space = "search.space={train.class_weight: {choice: [none, balanced]}}"
    cfg = load_config(overrides=[space, "search.metric=val_balanced_accuracy", "search.mode=max",
                                 "nightly.metric=balanced_accuracy"])  # fmt: skip
    assert cfg.search.metric == "val_balanced_accuracy"
    assert cfg.nightly.metric == "balanced_accuracy"
    with pytest.raises(ConfigError, match=r"search\.space\.train\.class_weight.*'inverse'"):
        load_config(overrides=["search.space={train.class_weight: {choice: [none, inverse]}}"])
    with pytest.raises(ConfigError, match=r"nightly\.metric must be one of .*balanced_accuracy"):
        load_config(overrides=["nightly.metric=recall"])


# --- The numbers, against scikit-learn ----------------------------------------------------


def _probs(predicted, k):
    return np.eye(k)[np.asarray(predicted)] * 0.8 + 0.2 / k


def test_balanced_accuracy_matches_scikit_learn_in_tables_statistics_and_keras():
    rng = np.random.default_rng(3)
    y = rng.choice(3, size=60, p=[0.8, 0.15, 0.05])
    scores = rng.random((60, 3))
    expected = balanced_accuracy_score(y, scores.argmax(1))
    rows = evaluate.evaluate_predictions(y, scores, ["a", "b", "c"])
    value = {(r.metric, r.class_name): r.value for r in rows}
    assert value[("balanced_accuracy", None)] == pytest.approx(expected)
    assert value[("recall", "c")] == pytest.approx(recall_score(y == 2, scores.argmax(1) == 2))
    # A class absent from the labels is left out of the mean, not counted as recall 0.
    absent = np.array([0, 0, 0, 1])
    rows = evaluate.evaluate_predictions(absent, _probs([0, 0, 1, 1], 3), ["a", "b", "c"])
    value = {(r.metric, r.class_name): r.value for r in rows}
    assert value[("balanced_accuracy", None)] == pytest.approx((2 / 3 + 1) / 2)
    assert value[("macro_recall", None)] == pytest.approx((2 / 3 + 1 + 0) / 3)

    # The bootstrap's vectorised version, resample by resample.
    labels = rng.choice(3, size=(4, 50), p=[0.7, 0.25, 0.05])
    prob = rng.dirichlet([1, 1, 1], size=(4, 50))
    resampled = stats._metric("balanced_accuracy", labels, prob)
    for r in range(4):
        assert resampled[r] == pytest.approx(balanced_accuracy_score(labels[r], prob[r].argmax(1)))
    comparison = stats.compare_paired(y, scores, _probs(y, 3), metric="balanced_accuracy",
                                      resamples=200)  # fmt: skip
    assert comparison.champion == pytest.approx(expected) and comparison.challenger == 1.0
    assert comparison.ci_low <= comparison.diff <= comparison.ci_high

    # The Keras metric, streamed over uneven batches, then reset.
    metric = BalancedAccuracy(3)
    for start in range(0, 60, 7):
        metric.update_state(y[start : start + 7], scores[start : start + 7])
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    metric.update_state(absent[:, None], _probs([0, 0, 1, 1], 3))  # labels as (n, 1)
    assert float(metric.result()) == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    again = BalancedAccuracy.from_config(metric.get_config())
    assert again.num_classes == 3 and again.name == "balanced_accuracy"


# --- class_weight: balanced, in train.fit ---------------------------------------------------


def _train_labels(storage, index) -> np.ndarray:
    manifest = read_parquet(
        storage.get_bytes(f"{dataset_prefix(index.dataset, index.version)}/manifest.parquet")
    ).to_pylist()
    names = index.diagnoses(ORGAN)
    return np.array([
        names.index(m["diagnosis"]) for m in manifest
        if m["organ"] == ORGAN and m["split"] == "train" and not m["duplicate_of"]
    ])  # fmt: skip


def _first_epoch_loss(cfg, storage, index) -> tuple[float, np.ndarray, np.ndarray]:
    """(the loss Keras reports for one step over the whole training split, the labels and
    probabilities of the same model on those images before the step)."""
    n = index.split_size(ORGAN, "train")
    keras.utils.set_random_seed(cfg.train.seed)
    model = compiled_model(cfg, len(index.diagnoses(ORGAN)))
    y, prob, _, _ = predict_split(
        model, storage, index, ORGAN, "train", image_size=cfg.input.image_size, batch_size=n
    )
    train_ds, val_ds = datasets(cfg, storage, index, ORGAN, n)
    history = keras.callbacks.History()
    fit(model, cfg, index, ORGAN, n, train_ds, val_ds, 0, [history], verbose=0)
    return history.history["loss"][0], y, prob


def test_balanced_class_weight_changes_the_loss_as_specified(lab):
    path, storage = lab
    index = load_dataset(storage, "imb")
    # One step of the whole training split: the reported loss is that step's, computed
    # with the weights before it is taken.
    overrides = ["train.epochs=1", f"input.batch_size={index.split_size(ORGAN, 'train')}"]
    weighted = load_config(path, overrides)
    plain = load_config(path, [*overrides, "train.class_weight=none"])

    labels = _train_labels(storage, index)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    weights = class_weights(weighted, index, ORGAN)
    assert list(weights) == index.diagnoses(ORGAN)
    assert list(weights.values()) == pytest.approx(expected)
    assert weights["benign"] > weights["adenocarcinoma"]  # the rare diagnosis weighs more
    assert class_weights(plain, index, ORGAN) is None

    loss, y, prob = _first_epoch_loss(weighted, storage, index)
    cross_entropy = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0))
    # Keras' sum_over_batch_size: Σ w(y_i)·CE_i / n, the mean weight per image being 1.
    assert loss == pytest.approx(np.mean(expected[y] * cross_entropy), rel=1e-5)
    unweighted, y, prob = _first_epoch_loss(plain, storage, index)
    cross_entropy = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0))
    assert unweighted == pytest.approx(np.mean(cross_entropy), rel=1e-5)
    assert abs(loss - unweighted) > 1e-3  # the same model and images: only the weights differ


# --- A real training run: what it records and what reads it back ----------------------------


@pytest.fixture(scope="module")
def trained(lab):
    """`train` of the imbalanced organ with class_weight balanced, on 2 replicas, one epoch
    (the sweep at the end reports the metric epoch after epoch)."""
    path, storage = lab
    cfg = load_config(path, ["train.cpu_replicas=2", "train.epochs=1"])
    result = train_organ(cfg, storage, ORGAN, run_id="weighted", expected_replicas=2, verbose=0)
    return cfg, storage, result


@pytest.mark.slow  # the trained fixture: ~12 s
def test_a_trained_run_records_weights_and_balanced_metrics(trained):
    cfg, storage, result = trained
    out = storage.sub(trial_prefix("weighted", ORGAN))
    index = load_dataset(storage, "imb")
    saved = json.loads(out.get_bytes("result.json"))
    assert saved["class_weights"] == class_weights(cfg, index, ORGAN) == result.class_weights
    assert saved["settings"]["train"]["class_weight"] == "balanced"

    # Every epoch reports balanced accuracy on validation, summed over both replicas.
    state = TrainingState.load(storage, trial_prefix("weighted", ORGAN))
    assert len(state.history["val_balanced_accuracy"]) == 1 == len(state.history["loss"])
    history = read_parquet(out.get_bytes("metrics/history.parquet")).to_pylist()
    assert {h["metric"] for h in history} >= {"balanced_accuracy", "val_balanced_accuracy"}
    last = load_checkpoint(storage, trial_prefix("weighted", ORGAN), state.latest)
    y, prob, _, _ = predict_split(last, storage, index, ORGAN, "val", image_size=32, batch_size=8)
    assert state.history["val_balanced_accuracy"][-1] == pytest.approx(
        balanced_accuracy_score(y, prob.argmax(1)), abs=1e-6
    )

    # The metrics table, result.json and the predictions agree with scikit-learn.
    predictions = read_parquet(out.get_bytes("metrics/predictions.parquet")).to_pylist()
    y = np.array([p["label"] for p in predictions])
    predicted = np.array([np.argmax(p["probabilities"]) for p in predictions])
    metrics = read_parquet(out.get_bytes("metrics/metrics.parquet")).to_pylist()
    value = {(m["metric"], m["class_name"]): m["value"] for m in metrics}
    expected = balanced_accuracy_score(y, predicted)
    assert value[("balanced_accuracy", None)] == pytest.approx(expected)
    assert result.test_balanced_accuracy == value[("balanced_accuracy", None)]
    assert result.test_recall == {c: value[("recall", c)] for c in result.classes}


@pytest.mark.slow  # the trained fixture
def test_status_and_report_show_balanced_accuracy_and_per_class_recall(trained):
    _, storage, result = trained
    text = render_status(storage, "weighted")
    header, _, row = text.splitlines()[2:5]
    assert "balanced accuracy" in header and "lowest recall" in header
    worst = min(result.test_recall, key=result.test_recall.get)
    assert f"{result.test_balanced_accuracy:.3f}" in row
    assert f"{result.test_recall[worst]:.3f} ({worst})" in row

    page = storage.path(build_report(storage, "weighted", resamples=200)).read_text()
    assert "<th>balanced accuracy</th>" in page
    section = page[page.index("<h3>Per diagnosis, on the test split</h3>") :]
    section = section[: section.index("</table>")]
    assert "<th>recall</th>" in section and "<th>loss weight</th>" in section
    for name, recall in result.test_recall.items():
        cells = section[section.index(f"<i>{name}</i>") :]
        assert f'<td class="num">{recall:.3f}</td>' in cells.split("</tr>")[0]
        weight = result.class_weights[name]
        assert f'<td class="num">{weight:.3f}</td>' in cells.split("</tr>")[0]


# --- A sweep selecting on val_balanced_accuracy, and a nightly promoting on it ---------------


@pytest.mark.slow
def test_sweep_and_nightly_select_on_balanced_accuracy(lab):
    """One nightly (a real Ray sweep): both class weights tried, trials selected and stopped
    by val_balanced_accuracy (max, ASHA), the challenger judged on balanced_accuracy."""
    path, storage = lab
    job = yaml.safe_load(path.read_text())
    job["search"] = {"samples": 1, "scheduler": "asha", "grace_period": 1,
                     "metric": "val_balanced_accuracy", "mode": "max",
                     "space": {"train.class_weight": {"grid": ["none", "balanced"]}}}  # fmt: skip
    job["nightly"] = {"metric": "balanced_accuracy"}
    job["resources"] = {"local_cpus": 2, "cpus_per_trial": 1}
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "organtrain", "nightly", "--config", str(path), "--date",
               "2026-05-01", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]

    run_id = "nightly-2026-05-01"
    out = storage.sub(trial_prefix(run_id, ORGAN))
    trials = read_parquet(out.get_bytes("metrics/trials.parquet")).to_pylist()
    assert sorted(json.loads(t["config"])["train.class_weight"] for t in trials) == [
        "balanced", "none"]  # fmt: skip
    assert all(t["metric"] == "val_balanced_accuracy" and 0 <= t["best_value"] <= 1 for t in trials)
    result = json.loads(out.get_bytes("result.json"))
    best = next(t for t in trials if t["trial_id"] == result["search"]["trial_id"])
    assert result["search"]["value"] == pytest.approx(max(t["best_value"] for t in trials))
    assert result["search"]["value"] == pytest.approx(best["best_value"])
    chosen = json.loads(best["config"])["train.class_weight"]
    assert (result["class_weights"] is None) == (chosen == "none")

    decision = json.loads(storage.get_bytes(f"runs/{run_id}/decisions/{ORGAN}.json"))
    metrics = read_parquet(out.get_bytes("metrics/metrics.parquet")).to_pylist()
    balanced = next(m["value"] for m in metrics if m["metric"] == "balanced_accuracy")
    assert decision["metric"] == "balanced_accuracy" and decision["promoted"]
    assert decision["challenger_value"] == pytest.approx(balanced)
    version = registry.get_version(storage, ORGAN, decision["challenger"])
    assert version.test_metrics["balanced_accuracy"] == pytest.approx(balanced)

    # The paired comparison a later night makes, here of the champion with itself: its
    # predictions, made again, give the same balanced accuracy as the stored ones.
    cfg = load_config(path)
    plan = json.loads(storage.get_bytes(f"runs/{run_id}/nightly.json"))
    comparison = nightly._compare(cfg, storage, run_id, ORGAN, plan, version)
    assert comparison.metric == "balanced_accuracy" and comparison.diff == 0
    assert comparison.champion == pytest.approx(balanced) and not math.isnan(comparison.ci_low)
