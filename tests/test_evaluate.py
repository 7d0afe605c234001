"""Tests for evaluation metrics, their tidy tables and the report figures.

Expected values are computed by hand from small confusion matrices, so the tests check
the wiring (labels, class order, zero division, NaN for undefined AUC) rather than trust
scikit-learn against itself.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from organtrain.evaluate import (
    CONFUSION_SCHEMA,
    HISTORY_SCHEMA,
    METRICS_SCHEMA,
    MetricRow,
    confusion,
    confusion_table,
    evaluate_predictions,
    history_table,
    metrics_table,
    roc_points,
)
from organtrain.plots import (
    confusion_matrix_png,
    display_name,
    learning_curves_png,
    roc_curves_png,
)

LUNG = ["adenocarcinoma", "benign", "squamous_cell_carcinoma"]
KEYS = {"run_id": "run-1", "model": "small_cnn"}


def _probs(y_pred: list[int], k: int) -> np.ndarray:
    """Softmax-like rows whose argmax is y_pred (0.6 on the prediction, rest shared)."""
    prob = np.full((len(y_pred), k), 0.4 / (k - 1))
    prob[np.arange(len(y_pred)), y_pred] = 0.6
    return prob


def _value(rows: list[MetricRow], metric: str, class_name: str | None = None) -> float:
    [row] = [r for r in rows if r.metric == metric and r.class_name == class_name]
    return row.value


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """No UndefinedMetricWarning (or any other) may escape: a nightly log full of them
    hides the warnings that matter."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_perfect_classifier():
    y_true = np.array([0, 1, 2, 0, 1, 2])
    rows = evaluate_predictions(y_true, np.eye(3)[y_true] * 0.9 + 0.1 / 3, LUNG)
    assert _value(rows, "accuracy") == 1.0
    for name in LUNG:
        assert _value(rows, "precision", name) == 1.0
        assert _value(rows, "recall", name) == 1.0
        assert _value(rows, "f1", name) == 1.0
        assert _value(rows, "support", name) == 2.0
        assert _value(rows, "roc_auc", name) == 1.0
    for metric in ("macro_precision", "macro_recall", "macro_f1", "macro_roc_auc"):
        assert _value(rows, metric) == 1.0


def test_row_order_and_class_names_are_fixed():
    y_true = np.array([0, 1, 2])
    rows = evaluate_predictions(y_true, _probs([0, 1, 2], 3), LUNG)
    per_class = ["precision", "recall", "f1", "support"]
    expected = [("accuracy", None), ("balanced_accuracy", None)]
    expected += [(m, c) for c in LUNG for m in per_class]
    expected += [("macro_precision", None), ("macro_recall", None), ("macro_f1", None)]
    expected += [("roc_auc", c) for c in LUNG] + [("macro_roc_auc", None)]
    assert [(r.metric, r.class_name) for r in rows] == expected
    assert all(isinstance(r.value, float) for r in rows)


def test_known_three_class_confusion():
    # true\pred  0  1  2        precision  recall  f1
    #     0      3  1  0          3/4       3/4    3/4
    #     1      1  2  1          2/3       2/4    4/7
    #     2      0  0  2          2/3       2/2    4/5
    cells = {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 2, (1, 2): 1, (2, 2): 2}
    y_true = [t for (t, _), n in cells.items() for _ in range(n)]
    y_pred = [p for (_, p), n in cells.items() for _ in range(n)]
    rows = evaluate_predictions(np.array(y_true), _probs(y_pred, 3), LUNG)

    assert _value(rows, "accuracy") == pytest.approx(7 / 10)
    expected = {
        "adenocarcinoma": (3 / 4, 3 / 4, 3 / 4, 4),
        "benign": (2 / 3, 1 / 2, 4 / 7, 4),
        "squamous_cell_carcinoma": (2 / 3, 1, 4 / 5, 2),
    }
    for name, (precision, recall, f1, support) in expected.items():
        assert _value(rows, "precision", name) == pytest.approx(precision)
        assert _value(rows, "recall", name) == pytest.approx(recall)
        assert _value(rows, "f1", name) == pytest.approx(f1)
        assert _value(rows, "support", name) == support
    assert _value(rows, "macro_precision") == pytest.approx(25 / 36)
    assert _value(rows, "macro_recall") == pytest.approx(3 / 4)
    assert _value(rows, "macro_f1") == pytest.approx(99 / 140)

    matrix = confusion(np.array(y_true), np.array(y_pred), 3)
    assert matrix.tolist() == [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    assert matrix.dtype == np.int64


def test_known_roc_auc():
    # Classic case: of the 4 (negative, positive) pairs, 3 are ranked correctly.
    y_true = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    prob = np.stack([1 - p1, p1], axis=1)
    rows = evaluate_predictions(y_true, prob, ["benign", "malignant"])
    assert _value(rows, "roc_auc", "malignant") == pytest.approx(0.75)
    assert _value(rows, "roc_auc", "benign") == pytest.approx(0.75)
    assert _value(rows, "macro_roc_auc") == pytest.approx(0.75)

    points = roc_points(y_true, prob, ["benign", "malignant"])
    fpr, tpr, auc = points["malignant"]
    assert auc == pytest.approx(0.75)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_class_never_predicted_has_precision_zero_without_warning():
    y_true = np.array([0, 1, 2, 2])
    rows = evaluate_predictions(y_true, _probs([0, 1, 1, 0], 3), LUNG)
    assert _value(rows, "precision", "squamous_cell_carcinoma") == 0.0
    assert _value(rows, "recall", "squamous_cell_carcinoma") == 0.0
    assert _value(rows, "f1", "squamous_cell_carcinoma") == 0.0
    assert _value(rows, "precision", "benign") == pytest.approx(1 / 2)


def test_class_absent_from_y_true():
    y_true = np.array([0, 0, 1, 1])
    y_pred = [0, 2, 1, 1]  # predicted once, never true
    prob = _probs(y_pred, 3)
    rows = evaluate_predictions(y_true, prob, LUNG)
    assert math.isnan(_value(rows, "roc_auc", "squamous_cell_carcinoma"))
    assert not math.isnan(_value(rows, "roc_auc", "adenocarcinoma"))
    assert math.isnan(_value(rows, "macro_roc_auc"))  # not an average over a subset
    assert _value(rows, "support", "squamous_cell_carcinoma") == 0.0
    assert _value(rows, "precision", "squamous_cell_carcinoma") == 0.0

    matrix = confusion(y_true, np.array(y_pred), 3)
    assert matrix[2].tolist() == [0, 0, 0]
    assert matrix.shape == (3, 3)
    assert set(roc_points(y_true, prob, LUNG)) == {"adenocarcinoma", "benign"}


def test_single_class_split_gives_nan_auc_and_no_curves():
    y_true = np.array([1, 1, 1])
    prob = _probs([1, 0, 1], 3)
    rows = evaluate_predictions(y_true, prob, LUNG)
    assert all(math.isnan(_value(rows, "roc_auc", name)) for name in LUNG)
    assert _value(rows, "accuracy") == pytest.approx(2 / 3)
    assert roc_points(y_true, prob, LUNG) == {}


def test_confusion_keeps_unseen_classes():
    assert confusion(np.array([0]), np.array([0]), 4).tolist() == [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert confusion(np.array([], dtype=int), np.array([], dtype=int), 2).tolist() == [
        [0, 0],
        [0, 0],
    ]


@pytest.mark.parametrize(
    ("y_true", "y_prob", "message"),
    [
        (np.array([0, 1]), np.zeros((2, 2)), r"shape \(n, 3\)"),
        (np.array([0, 3]), np.zeros((2, 3)), "outside 0..2"),
        (np.array([0, 1, 2]), np.zeros((2, 3)), "3 labels but 2 rows"),
        (np.array([0.0, 1.0]), np.zeros((2, 3)), "integer"),
        (np.array([], dtype=int), np.zeros((0, 3)), "empty"),
        (np.array([0, 1]), np.full((2, 3), np.nan), "NaN"),
    ],
)
def test_bad_inputs_are_clear_errors(y_true, y_prob, message):
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(y_true, y_prob, LUNG)


def test_confusion_rejects_labels_scikit_learn_would_drop():
    with pytest.raises(ValueError, match="y_pred holds labels outside"):
        confusion(np.array([0, 1]), np.array([0, 5]), 3)


# --- tables ------------------------------------------------------------------------------


def _organ_tables(organ: str, classes: list[str]) -> tuple[pa.Table, pa.Table]:
    y_true = np.arange(len(classes)).repeat(2)
    y_pred = np.roll(y_true, 1)
    rows = evaluate_predictions(y_true, _probs(list(y_pred), len(classes)), classes)
    metrics = metrics_table(rows, organ=organ, split="test", **KEYS)
    matrix = confusion(y_true, y_pred, len(classes))
    return metrics, confusion_table(matrix, classes, organ=organ, split="test", **KEYS)


def test_tables_have_exact_schemas_and_concatenate_across_organs():
    lung_metrics, lung_confusion = _organ_tables("lung", LUNG)
    colon_metrics, colon_confusion = _organ_tables("colon", ["adenocarcinoma", "benign"])
    for table, schema in [
        (lung_metrics, METRICS_SCHEMA),
        (colon_metrics, METRICS_SCHEMA),
        (lung_confusion, CONFUSION_SCHEMA),
        (colon_confusion, CONFUSION_SCHEMA),
    ]:
        assert table.schema.equals(schema)

    metrics = pa.concat_tables([lung_metrics, colon_metrics])
    assert metrics.schema.equals(METRICS_SCHEMA)
    assert set(metrics["organ"].to_pylist()) == {"lung", "colon"}
    # 2 + 4k + 3 + k + 1 rows per organ.
    assert metrics.num_rows == (6 + 5 * 3) + (6 + 5 * 2)
    accuracy = [r for r in lung_metrics.to_pylist() if r["metric"] == "accuracy"]
    assert accuracy == [
        {
            "run_id": "run-1",
            "organ": "lung",
            "model": "small_cnn",
            "split": "test",
            "metric": "accuracy",
            "class_name": None,
            "value": 0.5,  # np.roll keeps each class's second sample right
        }
    ]

    confusions = pa.concat_tables([lung_confusion, colon_confusion])
    assert confusions.num_rows == 9 + 4
    lung_rows = lung_confusion.to_pylist()
    assert sum(r["count"] for r in lung_rows) == 6
    cell = next(
        r
        for r in lung_rows
        if r["true_class"] == "adenocarcinoma" and r["predicted_class"] == "squamous_cell_carcinoma"
    )
    assert cell["count"] == 1  # np.roll gave each class's first sample the previous class


def test_nan_auc_survives_the_table():
    rows = evaluate_predictions(np.array([0, 0]), _probs([0, 1], 2), ["a", "b"])
    table = metrics_table(rows, organ="blood", split="test", **KEYS)
    values = dict(zip(table["metric"].to_pylist(), table["value"].to_pylist(), strict=True))
    assert math.isnan(values["macro_roc_auc"])


def test_tables_refuse_empty_keys():
    with pytest.raises(ValueError, match="organ must be a non-empty string"):
        metrics_table([MetricRow("accuracy", 1.0)], organ="", split="test", **KEYS)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        confusion_table(np.zeros((2, 2)), LUNG, organ="lung", split="test", **KEYS)


HISTORY = {
    "loss": [1.10, 0.80, 0.62, 0.51, 0.45, 0.41, 0.38, 0.36],
    "accuracy": [0.40, 0.58, 0.71, 0.78, 0.82, 0.85, 0.87, 0.88],
    "val_loss": [1.00, 0.78, 0.66, 0.60, 0.58, 0.59, 0.61, 0.64],
    "val_accuracy": [0.45, 0.60, 0.69, 0.74, 0.76, 0.76, 0.75, 0.75],
}


def test_history_table_is_long_and_numbers_epochs_from_one():
    table = history_table(HISTORY, organ="lung", **KEYS)
    assert table.schema.equals(HISTORY_SCHEMA)
    assert table.num_rows == 8 * 4
    rows = table.to_pylist()
    assert rows[0] == {
        "run_id": "run-1",
        "organ": "lung",
        "model": "small_cnn",
        "epoch": 1,
        "metric": "loss",
        "value": 1.10,
    }
    assert {r["epoch"] for r in rows} == set(range(1, 9))
    val_loss = [r["value"] for r in rows if r["metric"] == "val_loss"]
    assert val_loss == HISTORY["val_loss"]


def test_history_table_of_resumed_run_continues_epochs():
    # A run resumed after 3 epochs (Keras initial_epoch=3) trains epochs 4 and 5.
    resumed = {"loss": [0.5, np.float32(0.4)], "val_loss": [0.6, 0.55]}
    table = history_table(resumed, organ="lung", first_epoch=4, **KEYS)
    rows = [(r["epoch"], r["metric"], r["value"]) for r in table.to_pylist()]
    assert rows == [
        (4, "loss", 0.5),
        (4, "val_loss", 0.6),
        (5, "loss", pytest.approx(0.4)),
        (5, "val_loss", 0.55),
    ]
    earlier = history_table(
        {"loss": [0.9, 0.7, 0.6], "val_loss": [1, 0.8, 0.7]}, organ="lung", **KEYS
    )
    whole = pa.concat_tables([earlier, table])
    assert sorted({r for r in whole["epoch"].to_pylist()}) == [1, 2, 3, 4, 5]


def test_history_table_edge_cases():
    assert history_table({}, organ="lung", **KEYS).num_rows == 0
    with pytest.raises(ValueError, match="differ in length"):
        history_table({"loss": [1, 2, 3, 4], "val_loss": [1, 2]}, organ="lung", **KEYS)


# --- figures -----------------------------------------------------------------------------


@pytest.fixture
def plot_dir(tmp_path) -> Path:
    """Where example figures go: ORGANTRAIN_PLOT_DIR to look at them by eye (for example
    /tmp/organtrain-plots), else the test's own temporary folder."""
    path = Path(os.environ.get("ORGANTRAIN_PLOT_DIR") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_png(data: bytes, path: Path, *, min_side: int = 250) -> tuple[int, int]:
    assert isinstance(data, bytes)
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_side <= width <= 3000 and min_side <= height <= 3000, image.size
    return width, height


def _lung_test_split() -> tuple[np.ndarray, np.ndarray]:
    """A believable, imperfect 3-class test split (fixed seed)."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=120)
    logits = rng.normal(size=(120, 3)) + 2.0 * np.eye(3)[y_true]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, prob


def test_learning_curves_png(plot_dir):
    data = learning_curves_png(HISTORY, title="lung · small_cnn · learning curves")
    width, height = _check_png(data, plot_dir / "learning_curves.png")
    assert width > height  # two panels side by side


def test_confusion_matrix_png(plot_dir):
    y_true, prob = _lung_test_split()
    matrix = confusion(y_true, prob.argmax(axis=1), 3)
    data = confusion_matrix_png(matrix, LUNG, title="lung · small_cnn · test split")
    _check_png(data, plot_dir / "confusion_matrix.png")


def test_roc_curves_png(plot_dir):
    y_true, prob = _lung_test_split()
    data = roc_curves_png(roc_points(y_true, prob, LUNG), title="lung · small_cnn · test ROC")
    _check_png(data, plot_dir / "roc_curves.png")


def test_figures_for_degenerate_inputs_still_render(tmp_path):
    _check_png(learning_curves_png({}, title="lung"), tmp_path / "a.png", min_side=100)
    _check_png(
        learning_curves_png({"loss": [0.7]}, title="lung", first_epoch=4), tmp_path / "b.png"
    )
    _check_png(roc_curves_png({}, title="lung"), tmp_path / "c.png")
    unseen = np.array([[2, 1, 0], [0, 3, 0], [0, 0, 0]])  # a class absent from the split
    _check_png(confusion_matrix_png(unseen, LUNG, title="lung"), tmp_path / "d.png")


def test_display_name_spaces_and_wraps():
    assert display_name("squamous_cell_carcinoma") == "squamous cell\ncarcinoma"
    assert display_name("benign") == "benign"
