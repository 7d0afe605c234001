"""Metrics on a test split, as tidy (long-format) Arrow tables.

scikit-learn does the metric maths, so the numbers are the ones everybody else computes.
This module adds what a nightly, many-organ pipeline needs on top: every class of the
organ appears in every result (even one the split lacks or the model never predicts),
undefined values are NaN instead of exceptions or warnings, and one schema per table
for all organs, models and runs, so tables from many runs concatenate into one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


@dataclass(frozen=True)
class MetricRow:
    """One number about a split: a whole-split metric (class_name None) or a per-class one."""

    metric: str  # accuracy, balanced_accuracy, precision, recall, f1, support, roc_auc, ...
    value: float
    class_name: str | None = None  # None for whole-split and macro_* metrics


def _check_labels(y_true: np.ndarray, k: int, what: str = "y_true") -> np.ndarray:
    """Integer labels in [0, k). scikit-learn silently drops labels outside `labels=`,
    which would quietly shrink the split, so they are an error here."""
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be 1-D integer labels, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must hold integer labels, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{what} holds labels outside 0..{k - 1}")
    return labels.astype(np.int64)


def _check_inputs(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Fail early and clearly on inputs that would otherwise give wrong numbers silently."""
    k = len(class_names)
    if k < 2:
        raise ValueError(f"need at least two classes, got {list(class_names)}")
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] != k:
        raise ValueError(f"y_prob must have shape (n, {k}) for {k} classes, got {prob.shape}")
    labels = _check_labels(y_true, k)
    if labels.shape[0] != prob.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {prob.shape[0]} rows of probabilities")
    if labels.size == 0:
        raise ValueError("the split is empty: no metric is defined")
    if not np.all(np.isfinite(prob)):
        # A diverged model predicts NaN; argmax would quietly call that class 0.
        raise ValueError("y_prob holds NaN or infinite values (did training diverge?)")
    return labels, prob


def _one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one class against the rest; NaN when the split lacks positives or
    negatives, where AUC is undefined (checked here so scikit-learn never warns)."""
    positives = int(is_class.sum())
    if positives == 0 or positives == is_class.size:
        return float("nan")
    return float(roc_auc_score(is_class, score))


def evaluate_predictions(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]
) -> list[MetricRow]:
    """Accuracy, balanced accuracy, per-class and macro precision/recall/f1/support,
    one-vs-rest ROC AUC.

    y_true holds int labels (n,), y_prob softmax probabilities (n, k); the prediction is the
    most probable class. Rows come in a fixed order: accuracy; balanced_accuracy;
    precision, recall, f1, support for each class; macro_precision, macro_recall, macro_f1;
    roc_auc for each class; macro_roc_auc.

    balanced_accuracy is scikit-learn's: the mean recall over the classes present in
    y_true. It differs from macro_recall only when a class is absent from the split
    (macro_recall counts that class's recall as 0).

    Undefined ratios follow scikit-learn's zero_division=0: a class never predicted has
    precision 0, a class absent from y_true recall 0 (and both count as 0 in the macro
    means, as in scikit-learn's macro average over `labels=`). ROC AUC is NaN for a class
    absent from y_true and for every class of a single-class split; macro_roc_auc is NaN
    if any class's AUC is, so runs are only ever compared over the same classes.
    """
    labels, prob = _check_inputs(y_true, y_prob, class_names)
    k = len(class_names)
    predicted = prob.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(k)), average=None, zero_division=0.0
    )
    rows = [
        MetricRow("accuracy", float(np.mean(predicted == labels))),
        MetricRow("balanced_accuracy", float(np.mean(recall[support > 0]))),
    ]
    for i, name in enumerate(class_names):
        rows += [
            MetricRow("precision", float(precision[i]), name),
            MetricRow("recall", float(recall[i]), name),
            MetricRow("f1", float(f1[i]), name),
            MetricRow("support", float(support[i]), name),
        ]
    # Unweighted means over all classes: rare diagnoses count as much as common ones.
    rows += [
        MetricRow("macro_precision", float(np.mean(precision))),
        MetricRow("macro_recall", float(np.mean(recall))),
        MetricRow("macro_f1", float(np.mean(f1))),
    ]
    aucs = [_one_vs_rest_auc(labels == i, prob[:, i]) for i in range(k)]
    rows += [MetricRow("roc_auc", auc, name) for name, auc in zip(class_names, aucs, strict=True)]
    # np.mean propagates NaN on purpose (see docstring).
    rows.append(MetricRow("macro_roc_auc", float(np.mean(aucs))))
    return rows


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts, rows = true class, columns = predicted class.

    Every class has its row and column, even one neither seen nor predicted, so matrices
    of one organ always line up with its class names.
    """
    labels = _check_labels(y_true, k, "y_true")
    predicted = _check_labels(y_pred, k, "y_pred")
    if labels.shape != predicted.shape:
        raise ValueError(f"{labels.size} true labels but {predicted.size} predictions")
    if labels.size == 0:
        return np.zeros((k, k), dtype=np.int64)  # scikit-learn refuses an empty split
    return confusion_matrix(labels, predicted, labels=list(range(k))).astype(np.int64)


def roc_points(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curve per class: class name -> (fpr, tpr, auc), for plotting.

    Classes whose curve is undefined (absent from y_true, or the only class in the split)
    are left out rather than drawn as a meaningless line.
    """
    labels, prob = _check_inputs(y_true, y_prob, class_names)
    points: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for i, name in enumerate(class_names):
        is_class = labels == i
        auc = _one_vs_rest_auc(is_class, prob[:, i])
        if np.isnan(auc):
            continue
        fpr, tpr, _ = roc_curve(is_class, prob[:, i])
        points[name] = (fpr, tpr, auc)
    return points


# --- Tidy tables -------------------------------------------------------------------------
# Long format (one number per row) with identical schemas for every organ, model and run:
# a new metric or class needs no schema change, and pa.concat_tables stacks any runs.


def _key_fields() -> list[pa.Field]:
    return [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("organ", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]


METRICS_SCHEMA = pa.schema(
    [
        *_key_fields(),
        pa.field("split", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=True),  # null: whole-split metric
        pa.field("value", pa.float64(), nullable=False),  # NaN where undefined
    ]
)

CONFUSION_SCHEMA = pa.schema(
    [
        *_key_fields(),
        pa.field("split", pa.string(), nullable=False),
        pa.field("true_class", pa.string(), nullable=False),
        pa.field("predicted_class", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ]
)

HISTORY_SCHEMA = pa.schema(
    [
        *_key_fields(),
        pa.field("epoch", pa.int32(), nullable=False),  # 1-based, continues across resumes
        pa.field("metric", pa.string(), nullable=False),  # loss, accuracy, val_loss, ...
        pa.field("value", pa.float64(), nullable=False),
    ]
)


def _keys(**keys: str) -> dict[str, str]:
    """The identifying columns; Arrow does not enforce non-null fields on from_pylist,
    so an empty or missing key (which would make runs indistinguishable) is checked here."""
    for name, value in keys.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return keys


def metrics_table(
    rows: Sequence[MetricRow], *, run_id: str, organ: str, model: str, split: str
) -> pa.Table:
    """MetricRows of one split of one run -> METRICS_SCHEMA rows."""
    keys = _keys(run_id=run_id, organ=organ, model=model, split=split)
    records = [
        {**keys, "metric": r.metric, "class_name": r.class_name, "value": float(r.value)}
        for r in rows
    ]
    return pa.Table.from_pylist(records, schema=METRICS_SCHEMA)


def confusion_table(
    matrix: np.ndarray,
    class_names: Sequence[str],
    *,
    run_id: str,
    organ: str,
    model: str,
    split: str,
) -> pa.Table:
    """A (k, k) confusion matrix -> k*k CONFUSION_SCHEMA rows (zeros included, so every
    cell of the matrix can be rebuilt from the table alone)."""
    keys = _keys(run_id=run_id, organ=organ, model=model, split=split)
    counts = np.asarray(matrix)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"matrix must be ({k}, {k}) for {k} classes, got {counts.shape}")
    records = [
        {**keys, "true_class": t, "predicted_class": p, "count": int(counts[i, j])}
        for i, t in enumerate(class_names)
        for j, p in enumerate(class_names)
    ]
    return pa.Table.from_pylist(records, schema=CONFUSION_SCHEMA)


def history_table(
    history: Mapping[str, Sequence[float]],
    *,
    run_id: str,
    organ: str,
    model: str,
    first_epoch: int = 1,
) -> pa.Table:
    """Keras History.history ({"loss": [...], "val_loss": [...], ...}) -> long rows.

    Entry e of every list is epoch first_epoch + e: a run resumed with Keras
    initial_epoch=3 passes first_epoch=4, so its rows continue the earlier run's epochs.
    Lists of different lengths (e.g. validation_freq > 1) cannot be matched to epochs
    unambiguously and are an error rather than a silent misalignment.
    """
    keys = _keys(run_id=run_id, organ=organ, model=model)
    lengths = {metric: len(values) for metric, values in history.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history lists differ in length, cannot align epochs: {lengths}")
    epochs = next(iter(lengths.values()), 0)
    records = [
        {**keys, "epoch": first_epoch + e, "metric": metric, "value": float(values[e])}
        for e in range(epochs)
        for metric, values in history.items()
    ]
    return pa.Table.from_pylist(records, schema=HISTORY_SCHEMA)


PREDICTIONS_SCHEMA = pa.schema(
    [
        *_key_fields(),
        pa.field("split", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # the image file's content hash
        pa.field("source_key", pa.string(), nullable=False),  # <organ>/<diagnosis>/<file>
        pa.field("label", pa.int32(), nullable=False),
        pa.field("true_class", pa.string(), nullable=False),
        pa.field("predicted_class", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),  # probability of the prediction
        pa.field("probabilities", pa.list_(pa.float64()), nullable=False),  # per class, in order
    ]
)


def predictions_table(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    *,
    sha256: Sequence[str],
    source_keys: Sequence[str],
    run_id: str,
    organ: str,
    model: str,
    split: str,
) -> pa.Table:
    """One row per image: what the model said about it, traceable to the file.

    Paired statistics (champion vs challenger on the same images), calibration and the
    report's misclassified-image grid all start from this table.
    """
    keys = _keys(run_id=run_id, organ=organ, model=model, split=split)
    labels, prob = _check_inputs(y_true, y_prob, class_names)
    if not len(sha256) == len(source_keys) == len(labels):
        raise ValueError(
            f"{len(labels)} predictions but {len(sha256)} hashes and {len(source_keys)} keys"
        )
    predicted = prob.argmax(axis=1)
    records = [
        {
            **keys,
            "sha256": h,
            "source_key": k,
            "label": int(t),
            "true_class": class_names[t],
            "predicted_class": class_names[p],
            "confidence": float(row[p]),
            "probabilities": [float(v) for v in row],
        }
        for h, k, t, p, row in zip(sha256, source_keys, labels, predicted, prob, strict=True)
    ]
    return pa.Table.from_pylist(records, schema=PREDICTIONS_SCHEMA)


# --- Calibration ---------------------------------------------------------------------------
# Does "90 % confident" mean right 9 times in 10? A pathologist reading a confidence needs
# that to hold; networks trained to low loss are often over-confident.


@dataclass(frozen=True, eq=False)
class Reliability:
    """Top-label calibration in equal-width confidence bins (right-closed: (lo, hi])."""

    edges: np.ndarray  # bins + 1 confidence limits, 0 .. 1
    confidence: np.ndarray  # mean confidence of the images in each bin (NaN where empty)
    accuracy: np.ndarray  # fraction of them classified correctly (NaN where empty)
    count: np.ndarray  # images per bin
    ece: float  # expected calibration error: Σ count/n · |accuracy − confidence|


def reliability(y_true: np.ndarray, y_prob: np.ndarray, bins: int = 10) -> Reliability:
    """Reliability of the predicted class's probability (the `confidence` of
    predictions.parquet), and its expected calibration error (Guo et al. 2017): 0 for a
    perfectly calibrated model, 1 for one that is always certain and always wrong."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"y_prob must have shape (n, k), got {prob.shape}")
    labels, prob = _check_inputs(y_true, prob, [str(i) for i in range(prob.shape[1])])
    confidence = prob.max(axis=1)
    correct = prob.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins; a confidence of exactly 0 (impossible after a softmax) joins bin 0.
    which = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    mean_confidence = np.full(bins, np.nan)
    accuracy = np.full(bins, np.nan)
    mean_confidence[filled] = np.bincount(which, confidence, bins)[filled] / count[filled]
    accuracy[filled] = np.bincount(which, correct.astype(float), bins)[filled] / count[filled]
    gaps = np.abs(accuracy[filled] - mean_confidence[filled])
    ece = float(np.sum(count[filled] / labels.size * gaps))
    return Reliability(edges, mean_confidence, accuracy, count, ece)
