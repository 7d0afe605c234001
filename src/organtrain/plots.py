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
        if len(_series(history, base)) <= 1 and len(_series(history, val)) <= 1:
            # One epoch: without limits the axis spans ±5 % of it, ticked 0.945 ... 1.05.
            ax.set_xlim(first_epoch - 0.5, first_epoch + 0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], *, title: str) -> bytes:
    """confusion_matrix_figure as PNG bytes."""
    return _png(confusion_matrix_figure(matrix, class_names, title=title))


# Above this many classes the cells are too small for their counts: the colour carries the
# fraction and the report lists the counts in a table below the figure.
CELL_NUMBERS_MAX_CLASSES = 12
# The report shows a confusion matrix at its natural size up to its content width (a
# 1280 px window less the page margins); figures are sized so their text stays legible there.
REPORT_WIDTH_PX = 1232


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], *, title: str
) -> Figure:
    """Colour is the row-normalised fraction (recall per true class), so a rare diagnosis
    that is mostly missed stands out as much as a common one; counts and fractions are
    written in the cells up to CELL_NUMBERS_MAX_CLASSES classes.

    Cells shrink as classes are added, but never below a size whose labels stay legible
    at the report's width, where a fixed cell size made a 10-class figure so large that
    the page scaled its text down to a few pixels."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"matrix must be ({k}, {k}) for {k} classes, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the split has an all-zero row: colour it 0, not 0/0.
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    numbers = k <= CELL_NUMBERS_MAX_CLASSES
    # Inches per class: large cells for a few classes, smaller ones for many.
    cell = max(0.52, min(1.1, 6.2 / k)) if numbers else max(0.3, min(0.5, 8.0 / k))
    label_pt = 9 if numbers else 8
    side = cell * k
    fig = Figure(figsize=(side + 3.0, side + 2.4), layout="tight")
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of the true diagnosis (row)", fontsize=label_pt)
    colorbar.ax.tick_params(labelsize=label_pt)
    if numbers:
        _write_cells(ax, counts, fractions, totals[:, 0])
    wrap = 14 if numbers else 26  # one line per name where rows are narrow
    names = [display_name(n, width=wrap) for n in class_names]
    rotation, align = (0, "center") if k <= 2 else (30, "right") if numbers else (90, "center")
    ax.set_xticks(range(k), names, rotation=rotation, ha=align, fontsize=label_pt)
    ax.set_yticks(range(k), names, fontsize=label_pt)
    ax.set_xlabel("predicted diagnosis")
    ax.set_ylabel("true diagnosis")
    ax.set_title(title)
    return fig


def _write_cells(ax, counts: np.ndarray, fractions: np.ndarray, totals: np.ndarray) -> None:
    """Each cell's count and its share of the true diagnosis."""
    k = len(counts)
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{fractions[i, j]:.0%}" if totals[i] else "0"
            colour = "white" if fractions[i, j] > 0.5 else "black"  # readable on dark cells
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)


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


# Reliability diagram: labels (the tests find the drawn bars by them) and colours. Under-
# and over-confidence get colours a colour-blind reader also tells apart (Okabe-Ito) and
# opposite hatches.
ACCURACY_LABEL = "fraction correct (value above the bar)"
CONFIDENCE_LABEL = "mean confidence in the bin"
UNDER_LABEL = "under-confident: right more often than it claims"
OVER_LABEL = "over-confident: claims more than it gets right"
COUNT_LABEL = "images in the bin"
_ACCURACY_COLOUR, _UNDER_COLOUR, _OVER_COLOUR = "#7fa7d1", "#009e73", "#d55e00"


def reliability_diagram_png(reliability, *, title: str) -> bytes:
    """reliability_figure as PNG bytes (a figure saying so when there are no predictions)."""
    if reliability.count.sum() == 0:
        return _message_png("No predictions to calibrate.", title=title)
    return _png(reliability_figure(reliability, title=title))


def reliability_figure(reliability, *, title: str) -> Figure:
    """Calibration at a glance (takes evaluate.reliability output): per confidence bin, a
    bar as high as the fraction of its images classified correctly, its value written just
    above it, the bin's mean confidence as a black diamond, and the gap between the
    two hatched green where the model is under-confident (bar above the diamond) and
    orange where it is over-confident (bar below). The lower panel counts the images in
    each bin: a large gap in a nearly empty bin matters little.

    The gap is drawn as an open hatch over the bar, never as a fill: a filled gap over an
    under-confident bar hid the bar's top, and the bar read as the confidence (0.5-0.7)
    where every prediction was right."""
    edges, count = reliability.edges, reliability.count
    filled = count > 0
    x, width = ((edges[:-1] + edges[1:]) / 2)[filled], 0.9 * np.diff(edges)[filled]
    accuracy, confidence = reliability.accuracy[filled], reliability.confidence[filled]
    fig = Figure(figsize=(5.6, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    _calibration_zones(top)
    top.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    top.bar(x, accuracy, width=width, color=_ACCURACY_COLOUR, edgecolor="#1f4e79",
            linewidth=1.0, label=ACCURACY_LABEL)  # fmt: skip
    for label, colour, hatch, where in (
        (UNDER_LABEL, _UNDER_COLOUR, "\\\\", accuracy > confidence),
        (OVER_LABEL, _OVER_COLOUR, "//", accuracy < confidence),
    ):
        if where.any():
            top.bar(x[where], np.abs(accuracy - confidence)[where],
                    bottom=np.minimum(accuracy, confidence)[where], width=width[where],
                    facecolor="none", edgecolor=colour, hatch=hatch, linewidth=1.5,
                    label=label)  # fmt: skip
    top.scatter(x, confidence, marker="D", s=22, color="black", zorder=4, label=CONFIDENCE_LABEL)
    for xi, value in zip(x, accuracy, strict=True):  # each bar's value just above its top
        top.annotate(f"{value:.2f}", (xi, value), xytext=(0, 2), textcoords="offset points",
                     ha="center", va="bottom", fontsize=8, zorder=5,
                     bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                           "edgecolor": "#1f4e79", "linewidth": 0.6})  # fmt: skip
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.1)
    top.set_ylabel("fraction correct")
    top.set_title(f"{title}\nexpected calibration error {reliability.ece:.3f}")
    top.grid(alpha=0.3)
    bars = bottom.bar(x, count[filled], width=width, color="grey", label=COUNT_LABEL)
    bottom.bar_label(bars, fontsize=8, padding=1)
    bottom.set_ylim(0, count.max() * 1.3)  # room for the labels
    bottom.set_xlabel("confidence (probability of the predicted diagnosis)")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    fig.legend(loc="outside lower center", ncols=1, fontsize=8, frameon=False,
               handles=top.get_legend_handles_labels()[0])  # fmt: skip
    return fig


def _calibration_zones(ax) -> None:
    """Name the two sides of the diagonal along it, so a reader need not recall which is
    which. Low on the diagonal, where bins are rarely filled (a confidence is at least
    1/classes), and under the bars (zorder) should one be there."""
    for side, offset, colour in (("under", 0.035, _UNDER_COLOUR), ("over", -0.035, _OVER_COLOUR)):
        ax.text(0.2 - offset, 0.2 + offset, f"{side}-confident", rotation=45,
                rotation_mode="anchor", ha="center", va="center", fontsize=8, color=colour,
                zorder=0.5, transform_rotates_text=True)  # fmt: skip


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
