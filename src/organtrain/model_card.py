"""A model card per registry version: MODEL_CARD.md beside entry.json, and in each export.

What a person deciding whether to use a model needs on one page: what it is for, which
organ and diagnoses, what it was trained and tested on (images and patient/slide groups
per split and diagnosis), its test metrics with 95 % bootstrap intervals, balanced
accuracy, calibration, how it was chosen, its training configuration, and its limits.
Every figure comes from what the run stored: the dataset index and the run's
metrics/predictions.parquet, so the card can be written again at any time.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from organtrain import evaluate, stats
from organtrain.errors import DataError, ObjectNotFoundError
from organtrain.storage import Storage, join_key

CARD = "MODEL_CARD.md"  # the same name as registry.CARD
SMALL_TEST_SET = 100  # below this, say plainly that the test figures are rough
SPLITS = ("train", "val", "test")


def run_predictions(storage: Storage, run_id: str, organ: str) -> pa.Table | None:
    """The run's test-split predictions of `organ`, or None when the run kept none."""
    from organtrain.data.manifest import read_parquet

    key = join_key("runs", run_id, organ, "metrics", "predictions.parquet")
    try:
        return read_parquet(storage.get_bytes(key))
    except ObjectNotFoundError:
        return None


def render_card(entry, *, index=None, predictions: pa.Table | None = None) -> str:
    """MODEL_CARD.md for a registry entry (registry.ModelVersion); `index` is the dataset
    version it was trained on (DatasetIndex), `predictions` its test predictions."""
    lines = [
        f"# Model card: {entry.organ} — version {entry.version}",
        "",
        *_intended_use(entry),
        *_training_data(entry, index),
        *_performance(entry, predictions),
        *_how_chosen(entry),
        *_configuration(entry),
        *_limits(entry, index, predictions),
        "## Provenance",
        "",
        f"- registered {entry.created} by organtrain {entry.code_version}",
        f"- run `{entry.run_id}` ({entry.source})",
        f"- model file sha256 `{entry.model_sha256 or 'recorded on registration'}`",
        f"- dataset fingerprint of {entry.organ}'s images: `{entry.fingerprint}`",
        "",
    ]
    return "\n".join(lines)


def _intended_use(entry) -> list[str]:
    diagnoses = ", ".join(f"`{c}`" for c in entry.classes)
    return [
        "## Intended use",
        "",
        f"Classifies microscope images of **{entry.organ}** tissue into one of "
        f"{len(entry.classes)} diagnoses: {diagnoses}. It assists a pathologist, who makes "
        "the diagnosis; it is not a diagnostic device. Images of other organs, stains, "
        "magnifications or scanners than those it was trained on are outside its intended "
        "use: its output for them is unreliable. Use `organtrain predict` or the exported "
        "SavedModel so new images are decoded, cropped and resized as its training images "
        "were.",
        "",
        f"Model: `{entry.model}`; input: RGB images, centre square resized to "
        f"{entry.settings.get('input', {}).get('image_size', '?')} pixels.",
        "",
    ]


def _training_data(entry, index) -> list[str]:
    lines = [
        "## Training data",
        "",
        f"Dataset `{entry.dataset}` version `{entry.dataset_version}`.",
    ]
    organ = index.organs.get(entry.organ) if index is not None else None
    if organ is None:
        return [*lines, "(The dataset index could not be read: no counts.)", ""]
    lines += [
        "Images (patient/slide groups) per split and diagnosis. A group's images are all "
        "in one split, so the test images come from patients the model never saw.",
        "",
        "| diagnosis | " + " | ".join(SPLITS) + " |",
        "| --- |" + " --- |" * len(SPLITS),
    ]
    for diagnosis in entry.classes:
        cells = []
        for split in SPLITS:
            images = organ.counts.get(split, {}).get(diagnosis, 0)
            groups = organ.groups.get(split, {}).get(diagnosis)
            cells.append(f"{images} ({groups})" if groups is not None else str(images))
        lines.append(f"| {diagnosis} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def performance_figures(entry, predictions: pa.Table | None) -> dict | None:
    """Test metrics with 95 % intervals, balanced accuracy and ECE, from the predictions."""
    if predictions is None or predictions.num_rows == 0:
        return None
    y_true = np.asarray(predictions.column("label").to_pylist(), dtype=np.int64)
    y_prob = np.asarray(predictions.column("probabilities").to_pylist(), dtype=np.float64)
    intervals = stats.bootstrap_metrics(y_true, y_prob, entry.classes)
    rows = evaluate.evaluate_predictions(y_true, y_prob, entry.classes)
    per_class = {(r.metric, r.class_name): r.value for r in rows}
    return {
        "n": int(y_true.size),
        "intervals": intervals,
        # balanced accuracy is the mean of the per-class recalls
        "balanced_accuracy": per_class[("macro_recall", None)],
        "ece": evaluate.reliability(y_true, y_prob).ece,
        "per_class": {
            c: {m: per_class[(m, c)] for m in ("precision", "recall", "f1", "support")}
            for c in entry.classes
        },
    }


def _performance(entry, predictions) -> list[str]:
    figures = performance_figures(entry, predictions)
    lines = ["## Test performance", ""]
    if figures is None:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry.test_metrics.items())
        return [
            *lines,
            f"{metrics} on {entry.test_images} test images (the run kept no "
            "per-image predictions, so there are no intervals).",
            "",
        ]
    lines += [
        f"On the {figures['n']} images of the fixed test split, never used to train or "
        "choose the model. Intervals: 95 % percentile bootstrap over the test images.",
        "",
        "| metric | value | 95 % interval |",
        "| --- | --- | --- |",
    ]
    for metric, iv in figures["intervals"].items():
        lines.append(f"| {metric} | {iv.value:.3f} | {iv.low:.3f} – {iv.high:.3f} |")
    lines += [
        f"| balanced accuracy | {figures['balanced_accuracy']:.3f} | |",
        f"| calibration error (ECE, 10 bins) | {figures['ece']:.3f} | |",
        "",
        "ECE is 0 when a confidence of p means right a fraction p of the time.",
        "",
        "| diagnosis | precision | recall | F1 | test images |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c, m in figures["per_class"].items():
        lines.append(
            f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{int(m['support'])} |"
        )
    return [*lines, ""]


def _how_chosen(entry) -> list[str]:
    lines = ["## How it was chosen", ""]
    if entry.search:
        lines.append(
            f"The best trial of a search (run `{entry.run_id}`), chosen on the "
            "validation split; the test split was opened once, for this model:"
        )
        lines += ["", "```json", json.dumps(entry.search, indent=2, default=str), "```"]
    else:
        lines.append(
            f"A single `organtrain train` run (`{entry.run_id}`), no search; the "
            "epoch kept is the best on the validation split."
        )
    return [*lines, ""]


def _configuration(entry) -> list[str]:
    return [
        "## Training configuration",
        "",
        "```json",
        json.dumps(entry.settings, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]


def _limits(entry, index, predictions) -> list[str]:
    n = predictions.num_rows if predictions is not None else entry.test_images
    limits = []
    if n < SMALL_TEST_SET:
        limits.append(
            f"The test split has only {n} images: the figures above can move by "
            "several points with another draw of patients; read the intervals."
        )
    organ = index.organs.get(entry.organ) if index is not None else None
    if organ is not None:
        tests = organ.counts.get("test", {})
        thin = [d for d in entry.classes if tests.get(d, 0) < 10]
        if thin:
            limits.append(
                "Fewer than 10 test images for: " + ", ".join(thin) + "; their "
                "per-class figures are unreliable."
            )
        groups = organ.groups.get("test", {})
        if groups and sum(groups.values()) < 20:
            limits.append(
                f"The test images come from {sum(groups.values())} patient/slide "
                "groups: performance on new patients is measured on few of them."
            )
    limits += [
        "Only the diagnoses listed are known: an image of another diagnosis is still given "
        "one of them.",
        "Trained on one dataset's images: a different stain, scanner or lab needs its own "
        "validation before use.",
    ]
    return ["## Known limits", "", *[f"- {x}" for x in limits], ""]


def card_text(storage: Storage, organ: str, version: str) -> str:
    """The version's stored MODEL_CARD.md, or, for a version registered before cards
    existed, one rendered now from what is stored."""
    from organtrain import registry
    from organtrain.data.dataset import load_dataset

    key = join_key(registry.version_prefix(organ, version), CARD)
    try:
        return storage.get_bytes(key).decode()
    except ObjectNotFoundError:
        pass
    entry = registry.get_version(storage, organ, version)
    try:
        index = load_dataset(storage, entry.dataset, entry.dataset_version)
    except DataError:
        index = None
    return render_card(
        entry, index=index, predictions=run_predictions(storage, entry.run_id, organ)
    )
