"""Bootstrap intervals and paired comparison against known answers."""

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from organtrain import evaluate, stats
from organtrain.errors import DataError


def _probs_for(predicted: np.ndarray, k: int, confidence: float = 0.9) -> np.ndarray:
    """Probabilities whose argmax is `predicted`."""
    prob = np.full((predicted.size, k), (1 - confidence) / (k - 1))
    prob[np.arange(predicted.size), predicted] = confidence
    return prob


def _model(labels: np.ndarray, right: int, k: int) -> np.ndarray:
    """Probabilities that classify the first `right` images correctly, the rest wrongly."""
    predicted = labels.copy()
    predicted[right:] = (labels[right:] + 1) % k
    return _probs_for(predicted, k)


def test_resampled_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(5, 40))
    prob = rng.dirichlet([1, 1, 1], size=(5, 40))
    prob[0, :10] = prob[0, 10:20]  # ties in the scores, averaged like scikit-learn
    predicted = prob.argmax(axis=2)
    f1 = stats._metric("macro_f1", labels, prob)
    auc = stats._metric("macro_roc_auc", labels, prob)
    for r in range(5):
        expected_f1 = f1_score(labels[r], predicted[r], labels=[0, 1, 2], average="macro",
                               zero_division=0)  # fmt: skip
        assert f1[r] == pytest.approx(expected_f1)
        ovr = [roc_auc_score(labels[r] == c, prob[r, :, c]) for c in range(3)]
        assert auc[r] == pytest.approx(np.mean(ovr))


def test_interval_holds_the_value_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    prob = _probs_for(np.where(rng.random(300) < 0.8, labels, 1 - labels), 2)
    prob[:, 0] += rng.normal(0, 0.01, 300)  # distinct scores for a meaningful AUC
    intervals = stats.bootstrap_metrics(labels, prob, ["a", "b"], resamples=500)
    stored = {r.metric: r.value for r in evaluate.evaluate_predictions(labels, prob, ["a", "b"])}
    for metric in stats.METRICS:
        i = intervals[metric]
        assert i.value == pytest.approx(stored[metric])  # the same number as metrics.parquet
        assert i.low <= i.value <= i.high and i.resamples == 500
    again = stats.bootstrap_metrics(labels, prob, ["a", "b"], resamples=500)
    assert again == intervals


def test_interval_covers_the_true_accuracy_and_narrows_with_more_images():
    """A binomial case: each image is right with probability 0.7. The 95 % interval must
    hold 0.7 in about 95 % of experiments, and be about half as wide with 4× the images."""
    rng = np.random.default_rng(7)

    def interval(n, seed):
        labels = np.zeros(n, dtype=np.int64)
        labels[: n // 2] = 1
        right = rng.random(n) < 0.7
        prob = _probs_for(np.where(right, labels, 1 - labels), 2)
        return stats.bootstrap_metrics(labels, prob, resamples=400, seed=seed)["accuracy"]

    covered = [(i := interval(200, s)).low <= 0.7 <= i.high for s in range(60)]
    assert sum(covered) >= 51  # 95 % of 60 is 57; binomial spread allows a few misses
    small = np.mean([interval(100, s).high - interval(100, s).low for s in range(5)])
    large = np.mean([interval(400, s).high - interval(400, s).low for s in range(5)])
    assert large == pytest.approx(small / 2, rel=0.25)


def test_undefined_auc_has_no_interval():
    labels = np.zeros(20, dtype=np.int64)  # one class only: AUC undefined
    intervals = stats.bootstrap_metrics(labels, _probs_for(labels, 2), resamples=50)
    auc = intervals["macro_roc_auc"]
    assert np.isnan(auc.value) and np.isnan(auc.low) and auc.resamples == 0
    assert intervals["accuracy"].value == 1.0


def test_identical_models_are_not_different():
    labels = np.arange(200) % 3
    prob = _model(labels, 150, 3)
    result = stats.compare_paired(labels, prob, prob.copy(), resamples=300)
    assert result.b == result.c == 0
    assert result.p_value == 1.0 and result.bootstrap_p == 1.0
    assert result.diff == 0 and result.ci_low <= 0 <= result.ci_high
    assert not result.significant and not result.challenger_better


def test_clearly_better_challenger_is_significant():
    labels = np.arange(200) % 2
    champion = _model(labels, 100, 2)  # 50 % right
    challenger = _model(labels, 180, 2)  # 90 % right, including all the champion gets right
    result = stats.compare_paired(labels, champion, challenger, resamples=500)
    assert (result.n, result.b, result.c) == (200, 0, 80)
    assert result.diff == pytest.approx(0.4)
    assert result.ci_low > 0.3 and result.p_value < 1e-20
    assert result.significant and result.challenger_better
    worse = stats.compare_paired(labels, challenger, champion, resamples=500)
    assert worse.significant and not worse.challenger_better and worse.ci_high < 0
    f1 = stats.compare_paired(labels, champion, challenger, metric="macro_f1", resamples=200)
    assert f1.metric == "macro_f1" and f1.diff > 0.3 and f1.significant


def test_mcnemar_textbook_example():
    """b = 6, c = 16 (Wikipedia's McNemar example): exact two-sided p = 2·P(X ≤ 6) for
    X ~ Binomial(22, 1/2) = 2 · 110056 / 2²² ≈ 0.0525 — not significant at 0.05, although
    the chi-squared approximation (statistic 4.55, p ≈ 0.033) would say it is."""
    assert stats.mcnemar_exact(6, 16) == pytest.approx(2 * 110056 / 2**22)
    assert stats.mcnemar_exact(16, 6) == pytest.approx(stats.mcnemar_exact(6, 16))
    labels = np.zeros(101, dtype=np.int64)
    champion_right = np.r_[np.ones(59 + 6), np.zeros(16 + 20)].astype(bool)
    challenger_right = np.r_[np.ones(59), np.zeros(6), np.ones(16), np.zeros(20)].astype(bool)
    result = stats.compare_paired(
        labels,
        _probs_for(np.where(champion_right, 0, 1), 2),
        _probs_for(np.where(challenger_right, 0, 1), 2),
        resamples=200,
    )
    assert (result.b, result.c, result.statistic) == (6, 16, 6.0)
    assert result.p_value == pytest.approx(0.052478, abs=1e-6) and not result.significant


def _predictions(hashes, labels, prob) -> pa.Table:
    return evaluate.predictions_table(
        np.asarray(labels), np.asarray(prob), ["a", "b"], sha256=list(hashes),
        source_keys=[f"lung/a/{h}.png" for h in hashes], run_id="r", organ="lung",
        model="m", split="test",
    )  # fmt: skip


def test_predictions_are_paired_by_image_not_by_row():
    labels = np.arange(40) % 2
    prob = _model(labels, 30, 2)
    hashes = [f"{i:064x}" for i in range(40)]
    champion = _predictions(hashes, labels, prob)
    shuffled = np.random.default_rng(0).permutation(40)
    challenger = _predictions([hashes[i] for i in shuffled], labels[shuffled], prob[shuffled])
    result = stats.compare_predictions(champion, challenger, resamples=100)
    assert result.b == result.c == 0 and result.diff == 0  # same model, rows reordered


def test_different_image_sets_are_refused():
    labels = np.arange(10) % 2
    prob = _model(labels, 8, 2)
    champion = _predictions([f"{i:064x}" for i in range(10)], labels, prob)
    challenger = _predictions([f"{i + 1:064x}" for i in range(10)], labels, prob)
    with pytest.raises(DataError, match="1 only in the champion's predictions, 1 only in"):
        stats.compare_predictions(champion, challenger)
    relabelled = _predictions([f"{i:064x}" for i in range(10)], 1 - labels, prob)
    with pytest.raises(DataError, match="different labels"):
        stats.compare_predictions(champion, relabelled)
    twice = pa.concat_tables([champion, champion])
    with pytest.raises(DataError, match="twice"):
        stats.compare_predictions(twice, champion)


# --- Calibration (evaluate.reliability, plots.reliability_diagram_png) ----------------------


def test_calibrated_model_has_no_calibration_error():
    """In every bin the confidence is c and exactly a fraction c of the images is right."""
    labels, probs = [], []
    for confidence in (0.6, 0.75, 0.9):
        n_right = round(confidence * 20)
        predicted = np.r_[np.zeros(n_right), np.ones(20 - n_right)].astype(np.int64)
        labels.append(np.zeros(20, dtype=np.int64))
        probs.append(_probs_for(predicted, 2, confidence))
    result = evaluate.reliability(np.concatenate(labels), np.concatenate(probs), bins=10)
    assert result.ece == pytest.approx(0.0, abs=1e-12)
    assert result.count.sum() == 60 and list(np.nonzero(result.count)[0]) == [5, 7, 8]
    assert result.confidence[7] == pytest.approx(0.75) and result.accuracy[7] == 0.75
    assert np.isnan(result.accuracy[0])  # empty bins are NaN, not 0


def test_large_random_calibrated_sample_has_small_error():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.5, 1.0, 20_000)
    right = rng.random(20_000) < confidence
    labels = np.zeros(20_000, dtype=np.int64)
    prob = np.stack([confidence, 1 - confidence], axis=1)  # class 0 predicted
    labels[~right] = 1
    assert evaluate.reliability(labels, prob).ece < 0.02


def test_confident_and_wrong_has_calibration_error_one():
    labels = np.zeros(50, dtype=np.int64)
    prob = np.tile([0.0, 1.0], (50, 1))  # always certain of the wrong class
    result = evaluate.reliability(labels, prob)
    assert result.ece == pytest.approx(1.0)
    assert result.count[-1] == 50  # confidence 1.0 lands in the last (right-closed) bin


def test_reliability_diagram_is_a_png():
    import io

    from PIL import Image

    from organtrain import plots

    labels = np.arange(30) % 3
    result = evaluate.reliability(labels, _model(labels, 20, 3))
    png = plots.reliability_diagram_png(result, title="lung — simple_cnn")
    assert Image.open(io.BytesIO(png)).format == "PNG"
    empty = evaluate.Reliability(result.edges, result.confidence, result.accuracy,
                                 np.zeros(10, dtype=np.int64), float("nan"))  # fmt: skip
    assert Image.open(io.BytesIO(plots.reliability_diagram_png(empty, title="x"))).size[0] > 0
