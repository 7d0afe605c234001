"""How sure are we? Bootstrap intervals for test metrics, and paired model comparison.

A test split of a few hundred images gives an accuracy that moves by several points from
one draw of images to the next, so every number in the report carries a 95 % interval,
and a challenger replaces a champion only when it wins on the same images by more than
chance would explain:

- `bootstrap_metrics`: percentile bootstrap intervals for accuracy, macro-F1 and macro
  ROC AUC (resample the test images with replacement, recompute, take the middle 95 %).
- `compare_paired` / `compare_predictions`: champion vs challenger on the same images:
  the exact McNemar test on the images exactly one of them gets right, and a paired
  bootstrap interval of the metric difference (both models resampled with the same images).
- `adjust_p_values`: Holm or Benjamini-Hochberg adjusted p-values for a night's paired
  tests across organs: with N organs tested at `alpha` each, some challenger wins by
  chance as N grows unless the p-values are adjusted for the N tests together.

Point values come from evaluate.py (scikit-learn), so they equal the stored metrics; the
resampled values are computed here in NumPy over all resamples at once, checked against
scikit-learn in the tests. Resampling is seeded: the same inputs give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.stats import binomtest, rankdata

from organtrain import evaluate
from organtrain.errors import DataError

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")
RESAMPLES = 2000  # the usual minimum for stable 95 % percentile limits
CHUNK_CELLS = 2_000_000  # resampled labels held at once (~16 MB of int64): bounds memory


@dataclass(frozen=True)
class Interval:
    """A metric on the whole test split and its bootstrap confidence interval."""

    metric: str  # accuracy, macro_f1 or macro_roc_auc
    value: float  # on all images (NaN where undefined, e.g. AUC of a one-class split)
    low: float
    high: float
    level: float  # 0.95 for a 95 % interval
    resamples: int  # resamples where the metric was defined (AUC needs both classes)


@dataclass(frozen=True)
class PairedComparison:
    """Champion vs challenger on the same n images; one row of a promotion history.

    `b` and `c` are McNemar's discordant counts: images only the champion classifies
    correctly, and images only the challenger does. Images both get right or both get
    wrong say nothing about which model is better and do not enter the test.
    """

    metric: str  # what diff, ci_low and ci_high measure
    n: int  # images both models were scored on
    champion: float  # metric on all n images
    challenger: float
    diff: float  # challenger - champion
    ci_low: float  # paired bootstrap interval of diff
    ci_high: float
    bootstrap_p: float  # two-sided: 2 × fraction of resampled diffs on the far side of 0
    b: int  # champion right, challenger wrong
    c: int  # challenger right, champion wrong
    statistic: float  # exact McNemar: min(b, c)
    p_value: float  # exact McNemar, two-sided (1.0 when b + c = 0)
    level: float
    alpha: float
    # Both must agree: McNemar rejects at alpha AND the interval of diff excludes 0.
    significant: bool

    @property
    def challenger_better(self) -> bool:
        return self.significant and self.diff > 0


# --- Metrics over many resamples at once ------------------------------------------------
# labels, predicted: (r, n) int arrays, one resample per row; prob: (r, n, k).


def _accuracy(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return (labels == predicted).mean(axis=1)


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's balanced accuracy: the mean recall over the classes present in each
    resample (a class a resample happens to lack is left out, not counted as 0)."""
    recall_sum, present = np.zeros(labels.shape[0]), np.zeros(labels.shape[0])
    for cls in range(k):
        is_true = labels == cls
        seen = is_true.sum(axis=1)
        hits = (is_true & (predicted == cls)).sum(axis=1)
        recall_sum += np.divide(hits, seen, out=np.zeros(seen.shape), where=seen > 0)
        present += seen > 0
    return recall_sum / present  # every resample holds at least one image, so one class


def _macro_f1(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's macro F1 over labels 0..k-1 with zero_division=0: per class
    2·TP / (2·TP + FP + FN), which is 0 where that is 0/0, then the plain mean."""
    f1 = np.zeros((labels.shape[0], k))
    for cls in range(k):
        is_true, is_pred = labels == cls, predicted == cls
        tp = (is_true & is_pred).sum(axis=1)
        wrong = (is_true != is_pred).sum(axis=1)  # FP + FN
        denominator = 2 * tp + wrong
        f1[:, cls] = np.divide(2 * tp, denominator, out=f1[:, cls], where=denominator > 0)
    return f1.mean(axis=1)


def _macro_roc_auc(labels: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Mean one-vs-rest ROC AUC by the rank (Mann–Whitney) formula, ties averaged as in
    scikit-learn; NaN for a resample lacking positives or negatives of some class."""
    n, k = labels.shape[1], prob.shape[2]
    aucs = np.empty((labels.shape[0], k))
    for cls in range(k):
        positive = labels == cls
        ranks = rankdata(prob[:, :, cls], axis=1)
        n_pos = positive.sum(axis=1)
        n_neg = n - n_pos
        u = (ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[:, cls] = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return aucs.mean(axis=1)  # NaN propagates, as in evaluate.evaluate_predictions


def _metric(metric: str, labels: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """`metric` for each resample row of labels (r, n) and probabilities (r, n, k)."""
    if metric == "accuracy":
        return _accuracy(labels, prob.argmax(axis=2))
    if metric == "balanced_accuracy":
        return _balanced_accuracy(labels, prob.argmax(axis=2), prob.shape[2])
    if metric == "macro_f1":
        return _macro_f1(labels, prob.argmax(axis=2), prob.shape[2])
    if metric == "macro_roc_auc":
        return _macro_roc_auc(labels, prob)
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


def _resampled(metric: str, labels: np.ndarray, probs: Sequence[np.ndarray], indices: np.ndarray):
    """The metric of each model in `probs` on each resample (rows of `indices`), computed
    a chunk of resamples at a time so memory stays bounded for large test splits."""
    n, k = labels.size, probs[0].shape[1]
    step = max(1, CHUNK_CELLS // max(1, n * k))
    out = [np.empty(len(indices)) for _ in probs]
    for start in range(0, len(indices), step):
        rows = indices[start : start + step]
        for values, prob in zip(out, probs, strict=True):
            values[start : start + step] = _metric(metric, labels[rows], prob[rows])
    return out


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _limits(values: np.ndarray, level: float) -> tuple[float, float, int]:
    """Percentile limits over the resamples where the metric is defined."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return float("nan"), float("nan"), 0
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high), int(defined.size)


def _point_values(y_true, y_prob, class_names: Sequence[str] | None) -> dict[str, float]:
    """The metrics on all images, by evaluate.py (also validates the inputs)."""
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"y_prob must have shape (n, k), got {prob.shape}")
    names = class_names if class_names is not None else [str(i) for i in range(prob.shape[1])]
    rows = evaluate.evaluate_predictions(np.asarray(y_true), prob, names)
    return {r.metric: r.value for r in rows if r.class_name is None and r.metric in METRICS}


# --- Public API ---------------------------------------------------------------------------


def bootstrap_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals of accuracy, macro_f1 and macro_roc_auc.

    y_true: int labels (n,); y_prob: probabilities (n, k). Resamples where a metric is
    undefined (a class without positives for AUC) are left out of its interval and
    counted in Interval.resamples.
    """
    values = _point_values(y_true, y_prob, class_names)
    labels = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(y_prob, dtype=np.float64)
    indices = _resample_indices(labels.size, resamples, seed)
    intervals = {}
    for metric in METRICS:
        (resampled,) = _resampled(metric, labels, [prob], indices)
        low, high, defined = _limits(resampled, level)
        if np.isnan(values[metric]):
            low = high = float("nan")  # no interval around an undefined value
        intervals[metric] = Interval(metric, values[metric], low, high, level, defined)
    return intervals


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under "equally good", each of the b + c discordant
    images is won by either model with probability 1/2, so b ~ Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0  # the models never disagree: no evidence either way
    return float(binomtest(b, b + c, 0.5).pvalue)


def compare_paired(
    y_true: np.ndarray,
    champion_prob: np.ndarray,
    challenger_prob: np.ndarray,
    *,
    metric: str = "accuracy",
    resamples: int = RESAMPLES,
    level: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedComparison:
    """Champion vs challenger on the same images, row i of both being image i."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    champion_prob = np.asarray(champion_prob, dtype=np.float64)
    challenger_prob = np.asarray(challenger_prob, dtype=np.float64)
    if champion_prob.shape != challenger_prob.shape:
        raise ValueError(
            f"champion probabilities {champion_prob.shape} and challenger "
            f"{challenger_prob.shape} differ: not the same images and classes"
        )
    champion_value = _point_values(y_true, champion_prob, None)[metric]
    challenger_value = _point_values(y_true, challenger_prob, None)[metric]
    labels = np.asarray(y_true, dtype=np.int64)
    champion_right = champion_prob.argmax(axis=1) == labels
    challenger_right = challenger_prob.argmax(axis=1) == labels
    b = int((champion_right & ~challenger_right).sum())
    c = int((challenger_right & ~champion_right).sum())
    p_value = mcnemar_exact(b, c)

    indices = _resample_indices(labels.size, resamples, seed)
    champion_r, challenger_r = _resampled(metric, labels, [champion_prob, challenger_prob], indices)
    diffs = challenger_r - champion_r
    ci_low, ci_high, defined = _limits(diffs, level)
    diffs = diffs[~np.isnan(diffs)]
    if defined:
        bootstrap_p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    else:
        bootstrap_p = float("nan")
    excludes_zero = bool(ci_low > 0 or ci_high < 0)  # False when NaN
    return PairedComparison(
        metric=metric, n=int(labels.size), champion=champion_value, challenger=challenger_value,
        diff=challenger_value - champion_value, ci_low=ci_low, ci_high=ci_high,
        bootstrap_p=float(bootstrap_p), b=b, c=c, statistic=float(min(b, c)), p_value=p_value,
        level=level, alpha=alpha, significant=bool(p_value < alpha and excludes_zero),
    )  # fmt: skip


def _by_image(table: pa.Table, who: str) -> dict[str, tuple[int, list[float]]]:
    """sha256 -> (label, probabilities) of a predictions table (evaluate.PREDICTIONS_SCHEMA)."""
    rows = table.select(["sha256", "label", "probabilities"]).to_pylist()
    by_image = {r["sha256"]: (r["label"], r["probabilities"]) for r in rows}
    if len(by_image) != len(rows):
        raise DataError(
            f"the {who}'s predictions list {len(rows) - len(by_image)} image(s) twice; "
            "pass one split of one organ (one row per test image)"
        )
    return by_image


def compare_predictions(champion: pa.Table, challenger: pa.Table, **options) -> PairedComparison:
    """compare_paired on two predictions tables (metrics/predictions.parquet), paired by
    image sha256. Both must cover exactly the same images with the same labels: a
    comparison on different test sets would say nothing about the models."""
    old, new = _by_image(champion, "champion"), _by_image(challenger, "challenger")
    only_old, only_new = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    if only_old or only_new:
        example = (only_old or only_new)[0][:16]
        raise DataError(
            f"champion and challenger were scored on different images ({len(only_old)} only "
            f"in the champion's predictions, {len(only_new)} only in the challenger's, e.g. "
            f"sha256 {example}…); compare both on the test split of the same dataset version"
        )
    images = sorted(old)
    relabelled = [h for h in images if old[h][0] != new[h][0]]
    if relabelled:
        raise DataError(
            f"{len(relabelled)} image(s) carry different labels in the two predictions "
            f"(e.g. sha256 {relabelled[0][:16]}…): the diagnoses changed between the models; "
            "compare models trained on the same classes"
        )
    widths = {len(old[h][1]) for h in images} | {len(new[h][1]) for h in images}
    if len(widths) > 1:
        raise DataError(
            "the predictions give probabilities for different numbers of classes "
            f"{sorted(widths)}; compare models trained on the same classes"
        )
    labels = np.array([old[h][0] for h in images], dtype=np.int64)
    return compare_paired(
        labels,
        np.array([old[h][1] for h in images]),
        np.array([new[h][1] for h in images]),
        **options,
    )


# --- Many tests at once: one paired test per organ, the same night -----------------------

CORRECTIONS = ("holm", "bh", "none")


def adjust_p_values(p_values: Sequence[float], method: str) -> np.ndarray:
    """Adjusted p-values of a family of tests, in the order given; reject test i at level
    alpha when adjusted[i] < alpha (the same decisions as the step-down/step-up procedure).

    - "holm": Holm's step-down: the chance that ANY true null is rejected (here: that any
      organ's champion is replaced by a challenger that is not better) stays below alpha,
      whatever the dependence between the tests. Sorted p(1) <= ... <= p(m):
      adjusted p(i) = max over j <= i of min(1, (m - j + 1) p(j)).
    - "bh": Benjamini-Hochberg step-up: the expected SHARE of wrong rejections among all
      rejections stays below alpha (independent or positively dependent tests);
      adjusted p(i) = min over j >= i of min(1, m p(j) / j), as
      scipy.stats.false_discovery_control(method="bh").
    - "none": the p-values unchanged.

    NaN marks an organ without a test (not retrained, failed, no champion): it is left out
    of the family (m counts only real tests) and stays NaN. Tied p-values get the same
    adjusted value whatever their order.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; one of {', '.join(CORRECTIONS)}")
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    tested = ~np.isnan(p)
    if np.any((p[tested] < 0) | (p[tested] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[tested].tolist()}")
    adjusted = np.full(p.shape, np.nan)
    family = p[tested]
    if method == "none" or family.size == 0:
        adjusted[tested] = family
        return adjusted
    m = family.size
    order = np.argsort(family, kind="stable")
    ranked = family[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        stepped = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
    else:  # bh: the running minimum from the largest p-value down
        stepped = np.minimum.accumulate(np.minimum(1.0, m * ranked / rank)[::-1])[::-1]
    in_family = np.empty(m)
    in_family[order] = stepped
    adjusted[tested] = in_family
    return adjusted
