"""Report figures as PNG bytes: learning curves, confusion matrix, ROC curves.

Figures are built with matplotlib's object API (`Figure` on an Agg canvas), never pyplot:
pyplot keeps global state and picks a GUI backend, which breaks on headless cluster nodes
and when several organs are plotted from threads at once. Returning bytes keeps storage
(local folder or S3) out of this module.

The reader is a pathologist, so diagnoses appear as words ("squamous cell carcinoma"),
axes say what they measure, and an empty input gives a figure that says why it is empty
instead of an exception that would stop a nightly report.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
_VAL = "val_"


def display_name(name: str, width: int = 14) -> str:
    """A class or metric name for people: underscores as spaces, wrapped onto lines of
    at most `width` characters so long diagnoses do not overlap their neighbours."""
    return textwrap.fill(name.replace("_", " "), width=width, break_long_words=False)


def _png(fig: Figure) -> bytes:
    """Render on a private Agg canvas and free the figure (nothing global to close)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return buffer.getvalue()


def _message_png(message: str, *, title: str) -> bytes:
    """A small figure that states why there is nothing to draw."""
    fig = Figure(figsize=(5, 2.5), layout="tight")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return _png(fig)


def _metric_pairs(history: Mapping[str, Sequence[float]]) -> list[tuple[str, str | None]]:
    """(training metric, its val_ twin or None), loss first: one panel each. A val_ metric
    without a training twin gets its own panel too, so nothing recorded is dropped."""
    bases = [m for m in history if not m.startswith(_VAL)]
    bases += [
        m[len(_VAL) :] for m in history if m.startswith(_VAL) and m[len(_VAL) :] not in history
    ]
    bases.sort(key=lambda m: m != "loss")  # stable: otherwise keep Keras's order
    return [(b, f"{_VAL}{b}" if f"{_VAL}{b}" in history else None) for b in bases]


def _series(history: Mapping[str, Sequence[float]], name: str | None) -> np.ndarray:
    """A metric's values as floats; empty when the metric (or its val_ twin) is missing."""
    return np.asarray(history.get(name, []), dtype=np.float64)


def learning_curves_png(
    history: Mapping[str, Sequence[float]], *, title: str, first_epoch: int = 1
) -> bytes:
    """Keras History.history -> one panel per metric (loss, accuracy, ...), training and
    validation on the same axes so over-fitting shows as the curves parting.

    first_epoch numbers the x axis like history_table does for a resumed run.
    """
    pairs = [
        (b, v)
        for b, v in _metric_pairs(history)
        if _series(history, b).size + _series(history, v).size
    ]
    if not pairs:
        return _message_png("No training history recorded.", title=title)
    fig = Figure(figsize=(4.2 * len(pairs), 3.6), layout="tight")
    for ax, (base, val) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs, strict=True):
        for name, label, style in ((base, "training", "-"), (val, "validation", "--")):
            values = _series(history, name)
            if values.size:
                epochs = np.arange(first_epoch, first_epoch + len(values))
                # Markers keep a one-epoch run visible (a single point draws no line).
                ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
        ax.set_title(display_name(base, width=30))
        ax.set_xlabel("epoch")
        ax.set_ylabel(display_name(base, width=30))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], *, title: str) -> bytes:
    """Counts written in the cells; colour is the row-normalised fraction (recall per true
    class), so a rare diagnosis that is mostly missed stands out as much as a common one."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"matrix must be ({k}, {k}) for {k} classes, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the split has an all-zero row: colour it 0, not 0/0.
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    side = 2.2 + 1.1 * k
    fig = Figure(figsize=(side + 1.2, side), layout="tight")
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of the true diagnosis")
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{fractions[i, j]:.0%}" if totals[i, 0] else "0"
            colour = "white" if fractions[i, j] > 0.5 else "black"  # readable on dark cells
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    names = [display_name(n) for n in class_names]
    ax.set_xticks(range(k), names, rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted diagnosis")
    ax.set_ylabel("true diagnosis")
    ax.set_title(title)
    return _png(fig)


def roc_curves_png(
    points: Mapping[str, tuple[np.ndarray, np.ndarray, float]], *, title: str
) -> bytes:
    """One one-vs-rest ROC curve per diagnosis, AUC in the legend, and the chance
    diagonal for reference. Takes evaluate.roc_points output."""
    fig = Figure(figsize=(5.6, 5.2), layout="tight")
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in points.items():
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{display_name(name, 40)} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUC 0.5)")
    if not points:
        message = "ROC undefined: the split lacks\ntwo classes to compare"
        box = {"facecolor": "white", "edgecolor": "grey"}  # keeps it legible over the diagonal
        ax.text(0.5, 0.6, message, ha="center", va="center", bbox=box)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


def reliability_diagram_png(reliability, *, title: str) -> bytes:
    """Calibration at a glance (takes evaluate.reliability output): per confidence bin,
    the fraction actually right against the diagonal a calibrated model follows; the gap
    to the diagonal is shaded, and the lower panel shows how many images each bin holds
    (a large gap in a nearly empty bin matters little)."""
    edges, count = reliability.edges, reliability.count
    if count.sum() == 0:
        return _message_png("No predictions to calibrate.", title=title)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = count > 0
    fig = Figure(figsize=(5.2, 6.0), layout="tight")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], reliability.accuracy[filled], width=width[filled] * 0.95,
            color="tab:blue", alpha=0.8, label="fraction correct")  # fmt: skip
    gap_low = np.minimum(reliability.accuracy, reliability.confidence)[filled]
    gap = np.abs(reliability.accuracy - reliability.confidence)[filled]
    top.bar(centres[filled], gap, bottom=gap_low, width=width[filled] * 0.95, color="tab:red",
            alpha=0.3, hatch="//", label="gap to the mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.01)
    top.set_ylabel("fraction correct")
    top.set_title(f"{title}\nexpected calibration error {reliability.ece:.3f}")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centres, count, width=width * 0.95, color="grey")
    bottom.set_xlabel("confidence (probability of the predicted diagnosis)")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def metric_trend_png(
    series: Mapping[str, tuple[Sequence[str], Sequence[float]]], *, title: str, ylabel: str
) -> bytes:
    """One line per organ over successive runs (e.g. nights): name -> (x labels, values).
    Labels are placed in order of first appearance, so every organ shares one x axis."""
    if not any(len(values) for _, values in series.values()):
        return _message_png("No history recorded yet.", title=title)
    order: dict[str, int] = {}
    for labels, _ in series.values():
        for label in labels:
            order.setdefault(label, len(order))
    fig = Figure(figsize=(max(5.0, 0.5 * len(order) + 3), 3.6), layout="tight")
    ax = fig.add_subplot()
    for name, (labels, values) in series.items():
        ax.plot([order[x] for x in labels], values, marker="o", markersize=3,
                label=display_name(name, 30))  # fmt: skip
    step = max(1, len(order) // 12)  # at most ~12 labels so they stay readable
    ticks = list(order)[::step]
    ax.set_xticks([order[x] for x in ticks], ticks, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)
