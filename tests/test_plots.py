"""The report's charts, checked on what they draw (matplotlib's artists), not on pixels:
a reliability diagram of a known under- and a known over-confident model, and confusion
matrices whose text stays legible at the report's width from 2 to 25 classes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from PIL import Image

from organtrain import evaluate, plots

# The smallest text, in screen pixels, that a reader at a normal distance reads without
# zooming; the report's own small print (captions, notes) is 12-13 px.
MIN_TEXT_PX = 10.0


def _two_class(confidence: np.ndarray, right: np.ndarray) -> evaluate.Reliability:
    """A 2-class model that predicts class 0 with `confidence`; `right` says where the
    true label is 0."""
    labels = np.where(right, 0, 1).astype(np.int64)
    prob = np.stack([confidence, 1.0 - confidence], axis=1)
    return evaluate.reliability(labels, prob, bins=10)


def _bars(figure, label: str) -> list:
    """The bars drawn under a legend label, in any axes of the figure ([] if none)."""
    return [
        patch
        for ax in figure.axes
        for container in ax.containers
        if isinstance(container, BarContainer) and container.get_label() == label
        for patch in container.patches
    ]


def _legend_labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_under_confident_model_draws_every_bar_at_one():
    """Every prediction right at confidence 0.55-0.7: the bars must reach 1.0 (the issue
    saw them read as 0.49-0.75, the confidences), the gap is marked under-confident."""
    confidence = np.linspace(0.55, 0.7, 40)
    result = _two_class(confidence, np.ones(40, dtype=bool))
    filled = np.nonzero(result.count)[0]
    assert list(filled) == [5, 6] and result.count.sum() == 40
    assert list(result.accuracy[filled]) == [1.0, 1.0]
    assert result.ece == pytest.approx(1.0 - confidence.mean())

    figure = plots.reliability_figure(result, title="under-confident")
    bars = _bars(figure, plots.ACCURACY_LABEL)
    assert [bar.get_height() for bar in bars] == [1.0, 1.0]
    gaps = _bars(figure, plots.UNDER_LABEL)
    assert [gap.get_y() for gap in gaps] == pytest.approx(result.confidence[filled])
    assert [gap.get_y() + gap.get_height() for gap in gaps] == pytest.approx([1.0, 1.0])
    # The gap is an open hatch, so the bar's top stays visible through it; the old chart
    # filled it, and the filled part read as the end of the bar.
    assert all(gap.get_facecolor()[3] == 0 for gap in gaps)
    assert _bars(figure, plots.OVER_LABEL) == []
    labels = _legend_labels(figure)
    assert plots.UNDER_LABEL in labels and plots.OVER_LABEL not in labels
    written = [t.get_text() for t in figure.axes[0].texts]
    assert written.count("1.00") == 2  # each bar's value above its top
    counts = _bars(figure, plots.COUNT_LABEL)
    assert [c.get_height() for c in counts] == list(result.count[filled])


def test_over_confident_model_draws_the_gap_above_the_bar():
    """Confidence 0.95, half right: one bar at 0.5, the over-confident gap up to 0.95."""
    result = _two_class(np.full(40, 0.95), np.arange(40) % 2 == 0)
    assert list(np.nonzero(result.count)[0]) == [9]
    assert result.accuracy[9] == 0.5 and result.ece == pytest.approx(0.45)

    figure = plots.reliability_figure(result, title="over-confident")
    assert [bar.get_height() for bar in _bars(figure, plots.ACCURACY_LABEL)] == [0.5]
    [gap] = _bars(figure, plots.OVER_LABEL)
    assert gap.get_y() == pytest.approx(0.5) and gap.get_height() == pytest.approx(0.45)
    assert _bars(figure, plots.UNDER_LABEL) == []
    labels = _legend_labels(figure)
    assert plots.OVER_LABEL in labels and plots.UNDER_LABEL not in labels
    assert "0.50" in [t.get_text() for t in figure.axes[0].texts]
    # Under- and over-confidence are told apart by colour too, not only by the label.
    under = _bars(plots.reliability_figure(_two_class(np.full(4, 0.6), np.ones(4, bool)),
                                           title="u"), plots.UNDER_LABEL)  # fmt: skip
    assert tuple(under[0].get_edgecolor()) != tuple(gap.get_edgecolor())


def _rendered_text_px(figure) -> tuple[list[tuple[str, float]], int]:
    """(text, its height in screen pixels where the report shows the figure) for every
    visible text, and the PNG's width. The report shows a confusion matrix at its natural
    size, scaled down only to fit plots.REPORT_WIDTH_PX."""
    FigureCanvasAgg(figure)
    figure.canvas.draw()  # lays out ticks and labels, as savefig will
    texts = [
        (t.get_text(), t.get_fontsize())
        for t in figure.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
        if t.get_visible() and t.get_text().strip()
    ]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=plots.DPI, bbox_inches="tight")
    width = Image.open(buffer).size[0]
    scale = min(1.0, plots.REPORT_WIDTH_PX / width)
    return [(text, size * plots.DPI / 72 * scale) for text, size in texts], width


@pytest.mark.parametrize("k", [2, 10, 25])
def test_confusion_matrix_text_is_legible_at_the_report_width(k):
    rng = np.random.default_rng(k)
    matrix = rng.integers(0, 6, (k, k)) + 40 * np.eye(k, dtype=np.int64)
    names = [f"diagnosis_{i}_{'squamous_cell_carcinoma' if i % 4 == 0 else 'benign'}"
             for i in range(k)]  # fmt: skip
    figure = plots.confusion_matrix_figure(matrix, names, title=f"{k} classes")
    texts, width = _rendered_text_px(figure)
    smallest = min(texts, key=lambda t: t[1])
    assert smallest[1] >= MIN_TEXT_PX, (smallest, width)
    shown = {text for text, _ in texts}
    for name in names:  # every diagnosis labels a row and a column
        assert sum(plots.display_name(name, width=w) in shown for w in (14, 26)) >= 1
    cells = [text for text, _ in texts if "%" in text]
    if k <= plots.CELL_NUMBERS_MAX_CLASSES:
        assert len(cells) == k * k and f"{matrix[0, 0]}\n" in cells[0]
    else:
        assert cells == []  # too small for numbers: the report's table holds them
