"""`organtrain report RUN`: one self-contained HTML page for a run, saved beside it.

    runs/<run_id>/report.html

A summary table (one row per organ, every test metric with its 95 % bootstrap interval),
then one section per organ: per-diagnosis recall, precision and F1 (a rare diagnosis the
model misses shows here, where accuracy hides it), figures, calibration, class balance,
rejected files, the
leakage check (no patient/slide group or near-duplicate image in two splits; the closest
train/test pairs side by side), the trials of its search, and the test images it got
wrong. Organs that failed show their error; organs still running say so. An optional
nightly history adds trends and promotion decisions. Works for `organtrain train` runs
and for sweeps.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from organtrain import evaluate, plots, stats
from organtrain.config import MODEL_NAMES, applied_model_settings
from organtrain.data.dataset import MANIFEST, REJECTED, DatasetIndex, dataset_prefix, load_dataset
from organtrain.errors import OrgantrainError
from organtrain.report import html as h
from organtrain.report.run import OrganRun, Run, load_run, read_table
from organtrain.report.thumbnails import misclassified, thumbnails_from_split
from organtrain.storage import Storage, join_key

log = logging.getLogger(__name__)

REPORT = "report.html"
SPLITS = ("train", "val", "test")
CONFUSION_PNG = "confusion_matrix.png"
FIGURES = (  # file under <organ>/plots/, caption
    ("learning_curves.png", "Learning curves (training and validation, per epoch)"),
    (CONFUSION_PNG, "Confusion matrix on the test split (colour: share of the true diagnosis)"),
    ("roc.png", "One-vs-rest ROC curves on the test split"),
    ("sweep.png", "The search: every trial's validation metric"),
)
MAX_ROWS = 50  # rows of a rejected-files or trials table before "… and N more"
MIN_TEST_GROUPS = 5  # a diagnosis tested on fewer patients/slides than this is flagged
LEAK_KINDS = {  # leakage.py's kinds, in a pathologist's words
    "group": "patient/slide group",
    "copy": "identical file",
    "near_duplicate": "near-duplicate pair",
}


@dataclass
class DatasetView:
    """The dataset version the run trained on, or why it could not be read."""

    index: DatasetIndex | None = None
    manifest: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    problem: str | None = None


@dataclass
class OrganFacts:
    """Numbers computed for one organ from its predictions.parquet."""

    intervals: dict[str, stats.Interval] | None = None
    reliability: evaluate.Reliability | None = None
    metrics: list[evaluate.MetricRow] = field(default_factory=list)  # as metrics.parquet
    predictions: list[dict] = field(default_factory=list)
    problem: str | None = None


def build_report(
    storage: Storage,
    run_id: str,
    *,
    history: pa.Table | None = None,
    resamples: int = stats.RESAMPLES,
    max_thumbnails: int = 24,
) -> str:
    """Write runs/<run_id>/report.html; returns its key.

    `history`: the nightly history table (one row per night, organ and metric: `night`,
    `organ`, `metric`, `value`, optionally `decision`, `p_value`, ...); when given, the
    report adds its trends and the latest promotion decisions.
    """
    run = load_run(storage, run_id)
    dataset = _dataset_view(run)
    facts = {name: _organ_facts(run, organ, resamples) for name, organ in run.organs.items()}
    body = [
        _header(run, dataset),
        _summary(run, dataset, facts),
        _history(history) if history is not None else "",
        *(_organ_section(run, o, dataset, facts[n], max_thumbnails) for n, o in run.organs.items()),
        _left_out(run, dataset),
    ]
    key = run.key(REPORT)
    storage.put_bytes(key, h.page(f"organtrain run {run_id}", "\n".join(body)).encode())
    log.info("report: %s", storage.url(key))
    return key


# --- Gathering ----------------------------------------------------------------------------


def _dataset_view(run: Run) -> DatasetView:
    which = run.dataset()
    if which is None:
        return DatasetView(problem="no organ has finished yet, so the dataset is not known")
    name, version = which
    try:
        index = load_dataset(run.storage, name, version)
    except OrgantrainError as err:
        return DatasetView(problem=str(err))
    prefix = dataset_prefix(name, version)
    return DatasetView(
        index,
        read_table(run.storage, join_key(prefix, MANIFEST)) or [],
        read_table(run.storage, join_key(prefix, REJECTED)) or [],
    )


def _organ_facts(run: Run, organ: OrganRun, resamples: int) -> OrganFacts:
    if organ.result is None:
        return OrganFacts()
    rows = read_table(run.storage, run.key(organ.organ, "metrics", "predictions.parquet"))
    if not rows:
        return OrganFacts(problem="metrics/predictions.parquet is missing or empty")
    labels = np.array([r["label"] for r in rows], dtype=np.int64)
    prob = np.array([r["probabilities"] for r in rows], dtype=np.float64)
    classes = organ.result["classes"]
    return OrganFacts(
        intervals=stats.bootstrap_metrics(labels, prob, classes, resamples=resamples),
        reliability=evaluate.reliability(labels, prob),
        metrics=evaluate.evaluate_predictions(labels, prob, classes),
        predictions=rows,
    )


def _model_settings(organ: OrganRun) -> dict | None:
    """The winning trial's sampled configuration (sweeps), else the trained model's
    settings; either way only what the model used reads (no `weights` for a simple_cnn)."""
    search = (organ.result or {}).get("search") or {}
    config = search.get("trial_config") or (organ.summary or {}).get("trial_config")
    if isinstance(config, str):
        config = json.loads(config)
    if config:
        return _applied_trial_config(config, _model_name(organ))
    model = _trained_settings(organ).get("model")
    return applied_model_settings(model) if model else None


def _trained_settings(organ: OrganRun) -> dict:
    """The configuration that trained the organ's model (result.json `settings`), by section."""
    return (organ.result or {}).get("settings") or {}


def _applied_trial_config(config: dict, default_model: str | None) -> dict:
    """A trial's sampled `section.field` values without the `model.*` fields its model
    ignores (a search over simple_cnn and vgg16 samples `model.weights` for both)."""
    name = config.get("model.name", default_model)
    if name not in MODEL_NAMES:
        return config  # a model this organtrain does not know: nothing to judge by
    fields = {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}
    kept = applied_model_settings({**fields, "name": name})
    return {k: v for k, v in config.items() if not k.startswith("model.") or k[6:] in kept}


def _model_name(organ: OrganRun) -> str:
    return (organ.result or {}).get("model") or (organ.summary or {}).get("model") or "—"


def _trials(organ: OrganRun) -> tuple[int | None, int | None]:
    """(trials run, trials stopped early) of the organ's search; None for a `train` run."""
    row = organ.summary or {}
    search = (organ.result or {}).get("search") or {}
    entry = (organ.status or {}).get("trials") or {}
    total = row.get("trials") or search.get("trials") or entry.get("total")
    early = row.get("trials_stopped_early")
    if early is None:
        early = search.get("trials_stopped_early", (organ.status or {}).get("stopped_early"))
    return total, early


def _seconds(organ: OrganRun) -> float | None:
    return (organ.summary or {}).get("seconds") or (organ.result or {}).get("seconds")


# --- Rendering ----------------------------------------------------------------------------


def _header(run: Run, dataset: DatasetView) -> str:
    which = run.dataset()
    kind = "sweep" if run.sweep else "train"
    state = (run.status or {}).get("state", "finished" if run.organs else "unknown")
    if run.status is None and any(o.state != "done" for o in run.organs.values()):
        state = "incomplete"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"run kind: <b>{h.text(kind)}</b>, state: <b>{h.text(state)}</b>",
        f"dataset: <b>{h.text(which[0])}</b> version <code>{h.text(which[1])}</code>"
        if which
        else "dataset: unknown",
        f"storage: <code>{h.text(run.storage.url(run.prefix))}</code>",
        f"report generated {generated}",
    ]
    if run.sweep:
        metric, mode = run.sweep.get("metric"), run.sweep.get("mode")
        lines.insert(1, f"search metric: {h.text(metric)} ({h.text(mode)}), "
                        f"started {h.text(run.sweep.get('started', '?'))}")  # fmt: skip
    nav = " ".join(f'<a href="#organ-{h.anchor(o)}">{h.text(o)}</a>' for o in run.organs)
    problem = (
        f'<p class="note">Dataset details unavailable: {h.text(dataset.problem)}</p>'
        if dataset.problem
        else ""
    )
    return (
        f"<header><h1>organtrain run {h.text(run.run_id)}</h1>"
        f'<p class="meta">{"<br>".join(lines)}</p>{problem}{_split_changes(dataset)}'
        f"<nav>Organs: {nav or 'none yet'}</nav></header>"
    )


def _split_changes(dataset: DatasetView) -> str:
    """A warning when images changed split since the previous dataset version."""
    changes = dataset.index.split_changes if dataset.index else None
    if not changes:
        return ""
    before = f"<code>{h.text(changes.get('from_version', '?'))}</code>"
    reason = h.text(changes.get("reason") or "reason not recorded")
    return (
        f'<p class="warning">{h.text(changes.get("images", "?"))} of the '
        f"{h.text(changes.get('of', '?'))} images of dataset version {before} changed split "
        f"in this version ({reason}). Test figures of models trained on version {before} "
        "are not comparable with this run's.</p>"
    )


def _summary(run: Run, dataset: DatasetView, facts: dict[str, OrganFacts]) -> str:
    headers = ["organ", "state", "model", "configuration", "test accuracy",
               "balanced accuracy", "macro-F1", "macro ROC AUC", "ECE",
               "train / val / test images", "trials (stopped early)", "time"]  # fmt: skip
    rows, classes = [], []
    for name, organ in run.organs.items():
        i = facts[name].intervals or {}
        rel = facts[name].reliability
        total, early = _trials(organ)
        rows.append([
            f'<a href="#organ-{h.anchor(name)}">{h.text(name)}</a>',
            f'<span class="state state-{h.anchor(organ.state)}">{h.text(organ.state)}</span>',
            h.text(_model_name(organ)),
            h.settings_text(_model_settings(organ)),
            *(_interval_cell(i.get(m)) for m in stats.METRICS),
            h.number(rel.ece if rel else None),
            h.text(_split_sizes(dataset, name)),
            h.text(f"{total} ({early or 0})" if total is not None else "—"),
            f'<td class="num">{h.text(h.duration(_seconds(organ)))}</td>',
        ])  # fmt: skip
        classes.append("failed" if organ.state == "failed" else "")
    note = (
        "Test metrics with their 95 % percentile-bootstrap interval below (resampling the "
        "test images); balanced accuracy: the mean of the per-diagnosis recalls (a model "
        "that never predicts a rare diagnosis loses its share here, not in accuracy); ECE: "
        "expected calibration error of the predicted class's probability (0 = perfectly "
        "calibrated)."
    )
    return (
        '<section id="summary"><h2>Summary</h2>'
        f'{h.table(headers, rows, row_classes=classes)}<p class="note">{note}</p></section>'
    )


def _interval_cell(interval: stats.Interval | None) -> str:
    if interval is None:
        return h.number(None)
    return h.with_interval(interval.value, interval.low, interval.high)


def _split_sizes(dataset: DatasetView, organ: str) -> str:
    if dataset.index is None or organ not in dataset.index.organs:
        return "—"
    return " / ".join(str(dataset.index.split_size(organ, s)) for s in SPLITS)


def _organ_section(
    run: Run, organ: OrganRun, dataset: DatasetView, facts: OrganFacts, max_thumbnails: int
) -> str:
    name = organ.organ
    parts = [f'<section class="organ" id="organ-{h.anchor(name)}"><h2>{h.text(name)}</h2>']
    parts.append(
        f'<p>State: <span class="state state-{h.anchor(organ.state)}">{h.text(organ.state)}'
        f"</span>{_progress(organ)}</p>"
    )
    if organ.error:
        parts.append(f'<pre class="error">{h.text(organ.error)}</pre>')
    if organ.result:
        parts.append(_result_facts(organ))
        parts.append(_configuration(organ))
        parts.append(_per_diagnosis(organ, facts))
        parts.append(_figures(run, organ, facts))
    if facts.problem:
        parts.append(f'<p class="note">{h.text(facts.problem)}</p>')
    parts.append(_class_balance(dataset, name))
    parts.append(_rejected(dataset, name))
    parts.append(_leakage(run, dataset, name))
    parts.append(_trials_table(run, organ))
    if facts.predictions:
        parts.append(_misclassified(run, organ, dataset, facts, max_thumbnails))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _progress(organ: OrganRun) -> str:
    if organ.state == "training" and organ.training:
        return f" (epoch {h.text(organ.training.get('epoch', '?'))} done; or interrupted)"
    trials = (organ.status or {}).get("trials")
    if organ.state in ("searching", "pending", "evaluating") and trials:
        counts = ", ".join(f"{h.text(v)} {h.text(k)}" for k, v in trials.items())
        return f" (trials: {counts})"
    return ""


def _result_facts(organ: OrganRun) -> str:
    r = organ.result
    search = r.get("search") or {}
    lines = [
        f"Model <b>{h.text(r.get('model'))}</b>, classes: "
        + ", ".join(f"<i>{h.text(c)}</i>" for c in r.get("classes", [])),
        f"Epochs run {h.text(r.get('epochs_run'))}, best epoch {h.text(r.get('best_epoch'))}"
        + (" (stopped early)" if r.get("stopped_early") else "")
        + f", {h.text(r.get('replicas'))} replica(s), global batch {h.text(r.get('global_batch'))}",
    ]
    if search:
        lines.append(
            f"Best trial <code>{h.text(search.get('trial_id'))}</code>: "
            f"{h.text(search.get('metric'))} = {h.text(_fmt(search.get('value')))}"
        )
    lines.append(f"Files: <code>{h.text(r.get('uri'))}</code>")
    return "<p>" + "<br>".join(lines) + "</p>"


def _configuration(organ: OrganRun) -> str:
    """The settings that trained the model, one row per section, folded away (most
    readers need only the summary's configuration column). The model section lists only
    what the model reads: a simple_cnn shows no pretrained `weights`."""
    settings = _trained_settings(organ)
    if not settings:
        return ""
    rows = []
    for section, values in settings.items():
        if not isinstance(values, dict):
            continue
        shown = applied_model_settings(values) if section == "model" else values
        rows.append([h.text(section), h.settings_text(shown)])
    return (
        "<details><summary>Configuration that trained this model</summary>"
        f"{h.table(['section', 'settings'], rows)}</details>"
    )


def _per_diagnosis(organ: OrganRun, facts: OrganFacts) -> str:
    """Recall, precision, F1 and test images per diagnosis, and the loss weight each had
    in training (train.class_weight), from the same predictions as the summary."""
    if not facts.metrics:
        return ""
    value = {(r.metric, r.class_name): r.value for r in facts.metrics}
    weights = (organ.result or {}).get("class_weights") or {}
    classes = organ.result.get("classes", [])
    headers = ["diagnosis", "test images", "recall", "precision", "F1"]
    if weights:
        headers.append("loss weight")
    rows = []
    for name in classes:
        row = [f"<i>{h.text(name)}</i>", h.number(int(value[("support", name)])),
               *(h.number(value[(m, name)]) for m in ("recall", "precision", "f1"))]  # fmt: skip
        if weights:
            row.append(h.number(weights.get(name)))
        rows.append(row)
    balanced = value[("balanced_accuracy", None)]
    note = (
        f"Balanced accuracy {balanced:.3f}: the mean recall over the diagnoses in the test "
        f"split; accuracy {value[('accuracy', None)]:.3f}."
        + (" Trained with train.class_weight: balanced." if weights else "")
    )
    return (
        "<h3>Per diagnosis, on the test split</h3>"
        f'{h.table(headers, rows)}<p class="note">{h.text(note)}</p>'
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figures(run: Run, organ: OrganRun, facts: OrganFacts) -> str:
    """The organ's stored plots, its confusion matrix redrawn from confusion.parquet (with
    a table of its counts below the figures), and its reliability diagram."""
    title = f"{organ.organ} — {_model_name(organ)}"
    classes = (organ.result or {}).get("classes") or []
    matrix = _confusion_matrix(run, organ.organ, classes)
    figures = []
    for file, caption in FIGURES:
        css_class = "matrix" if file == CONFUSION_PNG else ""
        if file == CONFUSION_PNG and matrix is not None:
            png = plots.confusion_matrix_png(matrix, classes, title=title)
            figures.append(h.figure(png, caption, css_class=css_class))
            continue
        key = run.key(organ.organ, "plots", file)
        if run.storage.exists(key):
            figures.append(h.figure(run.storage.get_bytes(key), caption, css_class=css_class))
    if facts.reliability is not None:
        png = plots.reliability_diagram_png(facts.reliability, title=title)
        figures.append(h.figure(png, "Calibration on the test split (reliability diagram)"))
    if not figures:
        return ""
    counts = _confusion_counts(matrix, classes) if matrix is not None else ""
    return f'<div class="figures">{"".join(figures)}</div>{counts}'


def _confusion_matrix(run: Run, organ: str, classes: list[str]) -> np.ndarray | None:
    """The test split's confusion matrix from metrics/confusion.parquet, rows and columns
    in the organ's class order; None when the table is missing or names other classes
    (the stored figure is shown then)."""
    rows = read_table(run.storage, run.key(organ, "metrics", "confusion.parquet")) or []
    rows = [r for r in rows if r.get("split", "test") == "test"]
    position = {name: i for i, name in enumerate(classes)}
    if not rows or any(
        r["true_class"] not in position or r["predicted_class"] not in position for r in rows
    ):
        return None
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r in rows:
        matrix[position[r["true_class"]], position[r["predicted_class"]]] += r["count"]
    return matrix


def _confusion_counts(matrix: np.ndarray, classes: list[str]) -> str:
    """Every count of the confusion matrix as a table (hover a cell for what it counts),
    folded away while the figure writes the counts in its cells, open once it cannot."""
    totals = matrix.sum(axis=1)
    rows = []
    for i, true in enumerate(classes):
        cells = [f"<i>{h.text(true)}</i>"]
        for j, predicted in enumerate(classes):
            share = matrix[i, j] / totals[i] if totals[i] else 0.0
            hover = (
                f"true: {true} · predicted: {predicted} · {matrix[i, j]:,} of {totals[i]:,} "
                f"test images ({share:.0%})"
            )
            klass = "num diagonal" if i == j else "num"
            tint = f"background: rgba(31, 119, 180, {0.55 * share:.2f})"  # as the figure's
            cells.append(
                f'<td class="{klass}" title="{h.text(hover)}" style="{tint}">{matrix[i, j]:,}</td>'
            )
        cells.append(h.number(int(totals[i])))
        rows.append(cells)
    headers = ["true ↓ predicted →", *classes, "total"]
    state = " open" if len(classes) > plots.CELL_NUMBERS_MAX_CLASSES else ""
    return (
        f"<details{state}><summary>Confusion matrix counts on the test split (rows: true "
        "diagnosis, columns: predicted)</summary>"
        f"{h.table(headers, rows, css_class='counts')}</details>"
    )


def _class_balance(dataset: DatasetView, organ: str) -> str:
    """Images per diagnosis and split (distinct images, as trained and tested on), and
    how many more files were identical copies of one of them."""
    rows = [m for m in dataset.manifest if m["organ"] == organ]
    if not rows:
        return ""
    distinct = Counter((m["diagnosis"], m["split"]) for m in rows if not m["duplicate_of"])
    copies = Counter(m["diagnosis"] for m in rows if m["duplicate_of"])
    diagnoses = sorted({m["diagnosis"] for m in rows})
    table = [
        [h.text(d), *(h.number(distinct[d, s]) for s in SPLITS),
         h.number(sum(distinct[d, s] for s in SPLITS)), h.number(copies[d])]
        for d in diagnoses
    ]  # fmt: skip
    table.append(
        ["<b>all</b>", *(h.number(sum(distinct[d, s] for d in diagnoses)) for s in SPLITS),
         h.number(sum(distinct.values())), h.number(sum(copies.values()))]
    )  # fmt: skip
    headers = ["diagnosis", *SPLITS, "total", "duplicate files"]
    return f"<h3>Class balance</h3>{h.table(headers, table)}"


def _rejected(dataset: DatasetView, organ: str) -> str:
    rows = [r for r in dataset.rejected if r["organ"] == organ]
    if not rows:
        return '<h3>Rejected files</h3><p class="note">None.</p>' if dataset.index else ""
    return f"<h3>Rejected files ({len(rows)})</h3>{_rejected_table(rows, dataset)}"


def _rejected_table(rows: list[dict], dataset: DatasetView) -> str:
    shown = [
        [h.text(r["key"]), h.text(r["diagnosis"] or "—"), h.text(r["reason"]), h.text(r["detail"])]
        for r in rows[:MAX_ROWS]
    ]
    more = ""
    if len(rows) > MAX_ROWS:
        where = dataset_prefix(dataset.index.dataset, dataset.index.version)
        more = (
            f'<p class="note">… and {len(rows) - MAX_ROWS} more in '
            f"<code>{h.text(join_key(where, REJECTED))}</code></p>"
        )
    return h.table(["file", "diagnosis", "reason", "detail"], shown) + more


# --- Leakage check ------------------------------------------------------------------------


def _leakage(run: Run, dataset: DatasetView, organ: str) -> str:
    """The organ's leakage check, with thumbnails of its closest train/test pairs."""
    closest = (_organ_leakage(dataset.index, organ) or {}).get("closest") or []
    thumbs, problems = {}, []
    for split in ("train", "test"):
        wanted = {pair[f"{split}_sha256"] for pair in closest}
        thumbs[split], problem = _thumbnails(run, dataset, organ, split, wanted)
        problems += [problem] if problem else []
    return _leakage_part(dataset, organ, thumbs, "; ".join(problems))


def _organ_leakage(index: DatasetIndex | None, organ: str) -> dict | None:
    """The leakage check's figures for `organ` (LeakageReport.to_dict()), if checked."""
    if index is None or not index.leakage:
        return None
    return (index.leakage.get("organs") or {}).get(organ)


def _leakage_part(
    dataset: DatasetView, organ: str, thumbs: dict[str, dict[str, bytes]], problem: str = ""
) -> str:
    """The "Leakage check" part of an organ's section, from the figures `prepare` stored
    in dataset.json: the verdict, images/groups/clusters per split, patients/slides per
    diagnosis, and the closest train/test pairs side by side.

    `thumbs`: split -> sha256 -> JPEG thumbnail; `problem`: why some images are missing.
    """
    index = dataset.index
    if index is None or organ not in index.organs:
        return ""
    checked = _organ_leakage(index, organ)
    parts = ["<h3>Leakage check</h3>"]
    if checked is None:
        parts.append(_not_checked(index, organ))
    else:
        parts += [_leakage_verdict(index, checked), _units_per_split(dataset, organ, checked)]
    parts.append(_groups_per_diagnosis(index, organ))
    if checked is not None:
        parts.append(_closest_pairs(index, checked, thumbs, problem))
    return "\n".join(p for p in parts if p)


def _not_checked(index: DatasetIndex, organ: str) -> str:
    version = f"<code>{h.text(index.version)}</code>"
    if index.leakage:
        return (
            f'<p class="warning">The leakage check of version {version} has no figures for '
            f"{h.text(organ)}.</p>"
        )
    command = f"organtrain leakage --dataset {index.dataset} --version {index.version}"
    return (
        f'<p class="warning">Version {version} of dataset <b>{h.text(index.dataset)}</b> was '
        "prepared by an older organtrain, before leakage checks: nothing here shows that no "
        "patient/slide group or near-duplicate image is in both the training and the test "
        f"split. Run <code>{h.text(command)}</code> to check it, or re-run "
        "<code>organtrain prepare</code> to make a version that keeps each in one split.</p>"
    )


def _leakage_verdict(index: DatasetIndex, checked: dict) -> str:
    method = h.text((index.leakage or {}).get("method", "unknown method"))
    counts = {k: checked.get(f"cross_split_{k}", 0) for k in ("groups", "copies", "pairs")}
    guard_off = ((index.settings or {}).get("split_rule") or {}).get("units") == "groups"
    off = (
        '<p class="note">The near-duplicate guard was off when this version was prepared '
        "(<code>prepare.near_duplicates: false</code>): rotated, flipped or re-compressed "
        "copies of one tile were neither grouped nor looked for.</p>"
        if guard_off
        else ""
    )
    if not any(counts.values()):
        return (
            '<p class="pass">✔ No patient/slide group, identical file or near-duplicate pair '
            f"straddles two splits (checked by {method}).</p>{off}"
        )
    leaks = checked.get("leaks") or []
    items = "".join(
        f"<li>{h.text(LEAK_KINDS.get(leak.get('kind'), leak.get('kind')))}: "
        f"{h.text(leak.get('what'))}</li>"
        for leak in leaks
    )
    total = sum(counts.values())
    listed = f"<p>The first {len(leaks)} of {total}:</p>" if len(leaks) < total else ""
    return (
        f'<div class="warning"><p><b>Leakage found</b> (checked by {method}): '
        f"{counts['groups']} patient/slide group(s), {counts['copies']} identical file(s) and "
        f"{counts['pairs']} near-duplicate pair(s) straddle two splits. The model may have "
        "been tested on patients or images it saw in training, so this organ's test figures "
        f"are likely too good.</p>{listed}<ul>{items}</ul></div>{off}"
    )


def _units_per_split(dataset: DatasetView, organ: str, checked: dict) -> str:
    """Images, patient/slide groups, split units and near-duplicate clusters per split."""
    rows = [m for m in dataset.manifest if m["organ"] == organ]
    has_units = any(m.get("unit") for m in rows)
    groups, clusters = checked.get("groups") or {}, checked.get("clusters") or {}
    table = [
        [
            h.text(split),
            h.number(dataset.index.split_size(organ, split)),
            h.number(groups.get(split)),
            h.number(len({m["unit"] for m in rows if m["split"] == split and m.get("unit")})
                     if has_units else None),
            h.number(clusters.get(split)),
        ]
        for split in SPLITS
    ]  # fmt: skip
    headers = ["split", "images", "patient/slide groups", "split units", "near-duplicate clusters"]
    note = (
        "A split unit is what always stays in one split: a patient/slide group with "
        "everything joined to it, a cluster of near-duplicates (rotated, flipped or "
        "re-compressed copies of one tile), or a single image with neither."
    )
    return f'{h.table(headers, table)}<p class="note">{note}</p>'


def _groups_per_diagnosis(index: DatasetIndex, organ: str) -> str:
    """Patients/slides (split units) per diagnosis and split; few test ones flagged."""
    groups = index.organs[organ].groups
    if not groups:
        return ""
    few = {}
    table = []
    for diagnosis in index.organs[organ].diagnoses:
        cells = [h.text(diagnosis)]
        for split in SPLITS:
            n = (groups.get(split) or {}).get(diagnosis, 0)
            if split == "test" and n < MIN_TEST_GROUPS:
                few[diagnosis] = n
                cells.append(f'<td class="num warn">{n:,}</td>')
            else:
                cells.append(h.number(n))
        table.append(cells)
    parts = [
        "<h4>Patients/slides per diagnosis</h4>",
        h.table(["diagnosis", *SPLITS], table),
        '<p class="note">An image with no known patient or slide counts as one.</p>',
    ]
    if few:
        items = "".join(
            f"<li>The test accuracy of <i>{h.text(d)}</i> rests on {n} "
            f"{'patient/slide' if n == 1 else 'patients/slides'}.</li>"
            for d, n in few.items()
        )
        parts.append(
            f'<div class="warning"><ul>{items}</ul><p>Fewer than {MIN_TEST_GROUPS} in the '
            "test split: its per-class test figures say little about new patients. Add images "
            "from more patients or slides.</p></div>"
        )
    return "".join(parts)


def _closest_pairs(
    index: DatasetIndex, checked: dict, thumbs: dict[str, dict[str, bytes]], problem: str
) -> str:
    """The closest train/test pairs side by side, to judge the near-duplicate threshold."""
    closest = checked.get("closest") or []
    if not closest:
        return '<p class="note">No closest train/test pairs recorded.</p>'
    leakage = index.leakage or {}
    threshold, recorded = _threshold(leakage, checked)
    rows = []
    for pair in closest:
        distance = pair.get("distance")
        near = threshold is not None and distance is not None and distance <= threshold
        rows.append([
            _pair_image(thumbs.get("train", {}), pair["train_sha256"], pair["train_key"]),
            _pair_image(thumbs.get("test", {}), pair["test_sha256"], pair["test_key"]),
            _distance_cell(distance, near),
        ])  # fmt: skip
    if threshold is None:
        rule = "This version does not record the near-duplicate threshold."
    else:
        whose = "the" if recorded else "this organtrain's (the version records none)"
        rule = (
            f"Pairs at or below {whose} near-duplicate threshold, {threshold:.4g}, count as "
            "copies of one tile and are kept in one split."
        )
    intro = (
        f"The {len(closest)} training/test pairs that look most alike (distance between "
        f"their {h.text(leakage.get('method', '?'))} signatures; 0: indistinguishable). "
        f"{rule} If a pair shows the same tissue tile (rotated, flipped, re-compressed), the "
        "threshold is too low; if none look alike, it is high enough."
    )
    missing = f'<p class="note">{h.text(problem)}</p>' if problem else ""
    table = h.table(["training image", "test image", "distance"], rows, css_class="pairs")
    return f'<h4>Closest train/test pairs</h4><p class="note">{intro}</p>{missing}{table}'


def _threshold(leakage: dict, checked: dict) -> tuple[float | None, bool]:
    """(near-duplicate threshold, whether the version recorded it). Unrecorded, this
    organtrain's threshold applies only if the version used the same signatures."""
    recorded = checked.get("threshold", leakage.get("threshold"))
    if recorded is not None:
        return recorded, True
    from organtrain.data import neardup  # imported here: it loads scikit-learn

    if leakage.get("method") == neardup.SIGNATURE_METHOD:
        return neardup.THRESHOLD, False
    return None, False


def _distance_cell(distance: float | None, near: bool) -> str:
    if distance is None:
        return h.number(None)
    if near:
        return f'<td class="num warn">{distance:.4g}<br>≤ threshold</td>'
    return f'<td class="num">{distance:.4g}</td>'


def _pair_image(thumbs: dict[str, bytes], sha256: str, key: str) -> str:
    picture = (
        h.image(thumbs[sha256], key, mime="image/jpeg")
        if sha256 in thumbs
        else '<span class="note">image not found in the shards</span>'
    )
    return f'<td>{picture}<span class="note">{h.text(key)}</span></td>'


def _thumbnails(
    run: Run, dataset: DatasetView, organ: str, split: str, sha256s: set[str]
) -> tuple[dict[str, bytes], str]:
    """Thumbnails of the wanted images of one split, and why some are missing ("" if
    none is). Only the shards the manifest names for them are read."""
    if not sha256s:
        return {}, ""
    if dataset.index is None:
        return {}, f"{split} images unavailable: {dataset.problem}"
    shards = {
        m["shard"]
        for m in dataset.manifest
        if m["organ"] == organ and m["split"] == split and m["sha256"] in sha256s and m.get("shard")
    }
    try:
        found = thumbnails_from_split(
            run.storage, dataset.index, organ, split, sha256s, shard_keys=shards or None
        )
    except OrgantrainError as err:
        return {}, f"{split} images unavailable: {err}"
    return found, ""


# Columns of trials.parquet that the section's context already says, or that only
# matter to machines (epoch-second timestamps, Ray's 56-digit node ids; node_ip stays).
_TRIAL_COLUMNS_HIDDEN = {"run_id", "organ", "metric", "started", "ended", "node_id"}


def _trials_table(run: Run, organ: OrganRun) -> str:
    """The organ's trials (sweeps write metrics/trials.parquet), best first."""
    rows = read_table(run.storage, run.key(organ.organ, "metrics", "trials.parquet"))
    if not rows:
        return ""
    metric = rows[0].get("metric") or (run.sweep or {}).get("metric")
    value = "best_value" if "best_value" in rows[0] else metric
    if value in rows[0]:
        descending = (run.sweep or {}).get("mode", "max") == "max"
        rows.sort(key=lambda r: _sort_value(r[value], descending))
    headers = [c for c in rows[0] if c not in _TRIAL_COLUMNS_HIDDEN]
    model = _model_name(organ)
    cells = [[_trial_cell(c, r[c], model) for c in headers] for r in rows[:MAX_ROWS]]
    names = [c.removeprefix("config/") for c in headers]
    if value == "best_value" and metric:
        names[headers.index(value)] = f"best {metric}"
    more = len(rows) - MAX_ROWS
    note = f'<p class="note">… and {more} more trials</p>' if more > 0 else ""
    return f"<h3>Trials ({len(rows)})</h3>{h.table(names, cells)}{note}"


def _trial_cell(column: str, value, model: str) -> str:
    if column == "config" and isinstance(value, str) and value.startswith("{"):
        sampled = _applied_trial_config(json.loads(value), model)  # the trial's hyperparameters
        return h.settings_text(sampled)
    if column == "seconds" and isinstance(value, float):
        return h.text(h.duration(value))
    return _value_cell(value)


def _sort_value(value, descending: bool) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return math.inf  # unfinished or errored trials last
    return -value if descending else value


def _value_cell(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f'<td class="num">{h.rounded(value)}</td>'  # learning rates and the like
    if isinstance(value, float):
        return h.number(value, 4)
    if isinstance(value, int) and not isinstance(value, bool):
        return h.number(value)
    return h.text("—" if value is None else value)


def _misclassified(
    run: Run, organ: OrganRun, dataset: DatasetView, facts: OrganFacts, cap: int
) -> str:
    wrong = misclassified(facts.predictions, cap)
    total = sum(p["true_class"] != p["predicted_class"] for p in facts.predictions)
    title = f"<h3>Misclassified test images ({total} of {len(facts.predictions)})</h3>"
    if not wrong:
        return title + '<p class="note">None: every test image was classified correctly.</p>'
    thumbs, problem = _thumbnails(run, dataset, organ.organ, "test", {p["sha256"] for p in wrong})
    cells = []
    for p in wrong:
        picture = (
            h.image(thumbs[p["sha256"]], p["source_key"], mime="image/jpeg")
            if p["sha256"] in thumbs
            else '<p class="note">image not found in the test shards</p>'
        )
        cells.append(
            f'<figure class="thumb">{picture}<figcaption>true: <b>{h.text(p["true_class"])}</b>'
            f"<br>predicted: <b>{h.text(p['predicted_class'])}</b> ({p['confidence']:.2f})"
            f'<br><span class="note">{h.text(p["source_key"])}</span></figcaption></figure>'
        )
    shown = (
        f'<p class="note">The {len(wrong)} most confident mistakes.</p>'
        if total > len(wrong)
        else ""
    )
    note = f'<p class="note">{h.text(problem)}</p>' if problem else ""
    return f'{title}{shown}{note}<div class="thumbs">{"".join(cells)}</div>'


def _left_out(run: Run, dataset: DatasetView) -> str:
    """What the dataset left out beyond the run's organs: files outside any organ, organs
    with one usable diagnosis, diagnoses too small."""
    rows = [r for r in dataset.rejected if r["organ"] not in run.organs]
    excluded = dataset.index.excluded if dataset.index else []
    if not rows and not excluded:
        return ""
    parts = ['<section id="left-out"><h2>Left out of the dataset</h2>']
    if excluded:
        items = "".join(f"<li>{h.text(e.get('reason', e))}</li>" for e in excluded)
        parts.append(f"<ul>{items}</ul>")
    if rows:
        parts.append(f"<h3>Rejected files outside the run's organs ({len(rows)})</h3>")
        parts.append(_rejected_table(rows, dataset))
    return "".join(parts) + "</section>"


def _history(history: pa.Table) -> str:
    """Nightly trend per organ and metric, and the latest rows (promotion decisions)."""
    rows = history.to_pylist()
    parts = ['<section id="history"><h2>History</h2>']
    x = next((c for c in ("night", "date", "run_id") if c in history.column_names), None)
    if x and {"organ", "value"} <= set(history.column_names):
        metrics = sorted({r.get("metric") or "value" for r in rows})
        figures = []
        for metric in metrics:
            series: dict[str, tuple[list[str], list[float]]] = {}
            for r in rows:
                if (r.get("metric") or "value") == metric and r["value"] is not None:
                    labels, values = series.setdefault(r["organ"], ([], []))
                    labels.append(str(r[x]))
                    values.append(float(r["value"]))
            png = plots.metric_trend_png(series, title=metric, ylabel=metric)
            figures.append(h.figure(png, f"{metric} per {x}"))
        parts.append(f'<div class="figures">{"".join(figures)}</div>')
    latest = rows[-MAX_ROWS:]
    if latest:
        headers = list(latest[0])
        parts.append(f"<h3>Latest {len(latest)} rows</h3>")
        parts.append(h.table(headers, [[_value_cell(r[c]) for c in headers] for r in latest]))
    else:
        parts.append('<p class="note">No history yet.</p>')
    return "".join(parts) + "</section>"
