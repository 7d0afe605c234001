"""The run report, built from a tiny REAL run and opened in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from tinyrun import RUN_ID, TINY_ORGANS

from organtrain.data.dataset import DatasetIndex, OrganIndex, load_dataset
from organtrain.data.manifest import parquet_bytes, read_parquet
from organtrain.report import REPORT, RunNotFoundError, build_report
from organtrain.storage import LocalStorage

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
ORGANS = TINY_ORGANS
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def store(tiny_run) -> LocalStorage:
    """A finished `organtrain demo` run of two organs (run id "tiny"), and a sweep-shaped
    run ("sweep") made from it: lung done with trials, colon failed."""
    _, storage = tiny_run
    _sweep_from(storage)
    return storage


def _sweep_from(storage: LocalStorage) -> None:
    """The layout `organtrain sweep` writes, around the real lung results."""
    shutil.copytree(storage.path(f"runs/{RUN_ID}/lung"), storage.path("runs/sweep/lung"))
    result = json.loads(storage.get_bytes("runs/sweep/lung/result.json"))
    # As a search samples it: a learning rate with all its digits, and a model.weights
    # that a simple_cnn does not read (the search space also held a pretrained base).
    config = {"model.name": "simple_cnn", "model.weights": "imagenet",
              "train.learning_rate": 0.0012345678901234567, "model.dense_units": 16}  # fmt: skip
    result["search"] = {
        "trial_id": "t0002",
        "trial_config": config,
        "metric": "val_accuracy",
        "value": 0.75,
        "trials": 3,
    }
    storage.put_bytes("runs/sweep/lung/result.json", json.dumps(result).encode())
    storage.put_bytes(
        "runs/sweep/sweep.json",
        json.dumps(
            {
                "run_id": "sweep",
                "dataset": result["dataset"],
                "dataset_version": result["dataset_version"],
                "organs": ["lung", "colon"],
                "metric": "val_accuracy",
                "mode": "max",
                "started": "2026-01-01T00:00:00Z",
            }
        ).encode(),
    )
    error = "Traceback (most recent call last):\n  ...\nValueError: <boom> & friends"
    storage.put_bytes(
        "runs/sweep/status.json",
        json.dumps(
            {
                "run_id": "sweep",
                "updated": "2026-01-01T01:00:00Z",
                "state": "finished",
                "metric": "val_accuracy",
                "mode": "max",
                "organs": {
                    "lung": {
                        "state": "done",
                        "trials": {
                            "total": 3,
                            "pending": 0,
                            "running": 0,
                            "terminated": 3,
                            "error": 0,
                        },
                        "stopped_early": 1,
                        "best": 0.75,
                        "best_trial": "t0002",
                        "error": None,
                        "test_accuracy": 0.5,
                    },
                    "colon": {
                        "state": "failed",
                        "trials": {
                            "total": 2,
                            "pending": 0,
                            "running": 0,
                            "terminated": 0,
                            "error": 2,
                        },
                        "stopped_early": 0,
                        "best": None,
                        "best_trial": None,
                        "error": error,
                        "test_accuracy": None,
                    },
                },
            }
        ).encode(),
    )
    summary = [
        {
            "organ": "lung",
            "state": "done",
            "model": "simple_cnn",
            "trial_config": json.dumps(config),
            "trials": 3,
            "trials_stopped_early": 1,
            "seconds": 75.0,
            "error": None,
        },
        {
            "organ": "colon",
            "state": "failed",
            "model": None,
            "trial_config": None,
            "trials": 2,
            "trials_stopped_early": 0,
            "seconds": 12.0,
            "error": error,
        },
    ]
    storage.put_bytes("runs/sweep/summary.parquet", parquet_bytes(pa.Table.from_pylist(summary)))
    trials = [  # the columns `organtrain sweep` writes
        {
            "run_id": "sweep",
            "organ": "lung",
            "trial_id": f"t000{i}",
            "status": "terminated",
            "stop_reason": reason,
            "epochs": epochs,
            "epochs_asked": 3,
            "metric": "val_accuracy",
            "best_value": value,
            "best_epoch": epochs,
            "replicas": 1,
            "seconds": 20.0 + i,
            "started": 1.0,
            "ended": 2.0,
            "error": None,
            "config": json.dumps(
                {"train.learning_rate": 10.0 ** -(i + 2) * 1.23456789, "model.weights": "imagenet"}
            ),
        }
        for i, (reason, epochs, value) in enumerate(
            [("completed", 3, 0.5), ("scheduler", 1, 0.4), ("completed", 3, 0.75)]
        )
    ]
    storage.put_bytes(
        "runs/sweep/lung/metrics/trials.parquet", parquet_bytes(pa.Table.from_pylist(trials))
    )


def _chromium() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if found is None:
        message = "headless Chromium not found: `.ci/chromium-up.sh` installs it (Debian)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must check the report in a browser, never skip it
        pytest.skip(message)
    return found


NARROW, WIDE = 480, 1600  # a phone held upright, a large monitor (window widths, px)


def _browser_check(chromium: str, report: Path, tmp_path: Path, width: int = 1280) -> dict:
    """Load a copy of the report in a window `width` px wide, plus a test-only script that
    reports, into the DOM, every image that failed to decode, whether the page is wider
    than the window (it must never scroll sideways: wide tables scroll in their own box),
    and how large each confusion matrix is shown; the shipped report itself has no
    scripts (and its CSP forbids them, hence removed from the copy)."""
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", report.read_text())
    script = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt),
    sections: Array.from(document.querySelectorAll("section.organ")).map((s) => s.id),
    window: window.innerWidth,
    page: document.documentElement.scrollWidth,
    matrices: Array.from(document.querySelectorAll("figure.matrix img")).map(
      (i) => [i.width, i.naturalWidth]),
  });
  document.body.appendChild(out);
});
</script>"""
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", script + "</body>"))
    done = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--window-size={width},2000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check did not run:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def _fits_the_window(chromium: str, report: Path, tmp_path: Path) -> dict:
    """The report at a narrow and a wide window: no broken image, no sideways scrolling,
    confusion matrices at their natural size where the window has room. Returns the
    wide window's check."""
    checks = {width: _browser_check(chromium, report, tmp_path, width) for width in (NARROW, WIDE)}
    for width, check in checks.items():
        assert check["broken"] == [], width
        # Chromium's smallest window is 500 px wide: narrower asks get that.
        assert check["window"] <= max(width, 500) and check["page"] <= check["window"], check
    assert checks[WIDE]["matrices"] and all(
        shown == natural for shown, natural in checks[WIDE]["matrices"]
    ), checks[WIDE]["matrices"]
    return checks[WIDE]


def _screenshot(chromium: str, report: Path, name: str, width: int = 1280) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--screenshot={shot}",
            f"--window-size={width},4000",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return shot


def _assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:|//)", page) and "url(" not in page
    assert "<link" not in page


@pytest.mark.slow  # Chromium at two widths, twice: about 15 s
def test_train_run_report_opens_in_a_browser(store, tmp_path):
    key = build_report(store, RUN_ID, resamples=200)
    assert key == f"runs/{RUN_ID}/{REPORT}"
    report = store.path(key)
    page = report.read_text()
    _assert_self_contained(page)
    for organ in ORGANS:
        assert f'id="organ-{organ}"' in page
    assert "Class balance" in page and "Misclassified test images" in page
    assert "not_an_image" in page and "broken.png" in page  # lung's rejected file
    assert "bad_layout" in page and "lung/notes.txt" in page  # outside any diagnosis
    # Each organ: its stored plots + the reliability diagram; thumbnails for its mistakes.
    # (the confusion matrix redrawn from confusion.parquet, in place of the stored one).
    stored = sum(1 for organ in ORGANS for _ in store.list(f"runs/{RUN_ID}/{organ}/plots"))
    assert stored >= 2 * 3 and page.count('<figure class="plot') == stored + 2
    assert page.count('<figure class="plot matrix">') == 2
    pair_images = _assert_leakage_parts(store, page)
    assert page.count('<figure class="thumb">') == page.count("data:image/jpeg") - pair_images > 0
    _assert_confusion_counts(store, page)
    _assert_configuration_as_applied(page)

    chromium = _chromium()
    check = _fits_the_window(chromium, report, tmp_path)
    assert check["images"] >= 8
    assert sorted(check["sections"]) == ["organ-colon", "organ-lung"]
    for width in (NARROW, WIDE):
        shot = _screenshot(chromium, report, f"report-train-{width}.png", width)
        assert shot.stat().st_size > 10_000


def _assert_confusion_counts(store, page: str) -> None:
    """Each organ's count table holds every cell of its stored confusion.parquet, with a
    hover title saying what the cell counts."""
    for organ in ORGANS:
        section = page[page.index(f'id="organ-{organ}"') :]
        table = section[section.index('<table class="counts">') :]
        table = table[: table.index("</table>")]
        key = f"runs/{RUN_ID}/{organ}/metrics/confusion.parquet"
        rows = read_parquet(store.get_bytes(key)).to_pylist()
        assert len(rows) == len(ORGANS[organ]) ** 2
        cells = re.findall(r'<td class="num[^"]*" title="([^"]*)"[^>]*>([0-9,]+)</td>', table)
        assert len(cells) == len(rows)
        for row, (title, count) in zip(rows, cells, strict=True):
            assert int(count) == row["count"]
            assert html.unescape(title).startswith(
                f"true: {row['true_class']} · predicted: {row['predicted_class']} · "
                f"{row['count']} of "
            )


def _assert_configuration_as_applied(page: str) -> None:
    """A simple_cnn has no pretrained weights: the page never says it had (issue 17)."""
    assert "weights=" not in page and "fine_tune_layers=" not in page
    assert page.count("<summary>Configuration that trained this model</summary>") == 2
    assert "filters=[8, 16]" in page and "learning_rate=0.001<" in page


def _assert_leakage_parts(store, page: str) -> int:
    """Each organ's leakage check as dataset.json holds it; returns how many pair images."""
    index = load_dataset(store, "tiny")
    assert index.leakage and index.leakage["clean"]
    images = 0
    for organ in ORGANS:
        section = page[page.index(f'id="organ-{organ}"') :]
        section = section[: section.index("</section>")]
        part = section[section.index("<h3>Leakage check</h3>") :]
        method = html.escape(index.leakage["method"])
        assert f"near-duplicate pair straddles two splits (checked by {method})" in part
        assert "near-duplicate clusters" in part and "Patients/slides per diagnosis" in part
        test_images = index.split_size(organ, "test")
        assert f'<tr><td>test</td><td class="num">{test_images}</td>' in part
        closest = index.leakage["organs"][organ]["closest"]
        assert closest, "the check records the closest train/test pairs"
        pairs = part[part.index('<table class="pairs">') :]
        pairs = pairs[: pairs.index("</table>")]
        sources = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', pairs)
        assert len(sources) == 2 * len(closest)  # every train and test side found
        for encoded in sources:
            with Image.open(io.BytesIO(base64.b64decode(encoded))) as thumb:
                thumb.load()
                assert thumb.size[0] > 0
        assert closest[0]["train_key"] in pairs and closest[0]["test_key"] in pairs
        assert re.search(r"Pairs at or below [^,]* near-duplicate threshold, [0-9.]+,", part)
        images += len(sources)
    return images


@pytest.mark.slow  # Chromium at two widths, twice: about 15 s
def test_sweep_report_shows_trials_failures_and_history(store, tmp_path):
    history = pa.Table.from_pylist(
        [
            {
                "night": f"2026-01-0{d}",
                "organ": organ,
                "metric": "test_accuracy",
                "value": 0.8 + 0.01 * d,
                "decision": "promoted" if d == 3 else "kept",
            }
            for d in (1, 2, 3)
            for organ in ("lung", "colon")
        ]
    )
    page = store.path(build_report(store, "sweep", history=history, resamples=200)).read_text()
    _assert_self_contained(page)
    assert "search metric: val_accuracy (max)" in page
    assert "3 (1)" in page  # trials (stopped early)
    # Settings rounded to 4 significant digits (the stored tables keep them all), and
    # only those the chosen model reads: no model.weights for a simple_cnn.
    assert "train.learning_rate=0.001235<" in page and "0.0012345" not in page
    assert "train.learning_rate=0.0001235<" in page and "model.weights" not in page
    assert "<h3>Trials (3)</h3>" in page
    assert page.index("t0002") < page.index("t0000") < page.index("t0001")  # best first
    colon = page[page.index('id="organ-colon"') :]
    assert "state-failed" in colon
    assert "ValueError: &lt;boom&gt; &amp; friends" in colon  # escaped, whole
    assert '<tr class="failed">' in page
    assert '<section id="history">' in page and "promoted" in page

    chromium = _chromium()
    check = _fits_the_window(chromium, store.path("runs/sweep/report.html"), tmp_path)
    assert check["sections"] == ["organ-lung", "organ-colon"]
    _screenshot(chromium, store.path("runs/sweep/report.html"), "report-sweep.png")


def test_report_intervals_match_the_stored_metrics(store):
    from organtrain.report.build import _organ_facts
    from organtrain.report.run import load_run

    run = load_run(store, RUN_ID)
    lung = run.organs["lung"]
    facts = _organ_facts(run, lung, resamples=100)
    accuracy = facts.intervals["accuracy"]
    assert accuracy.value == pytest.approx(lung.result["test_accuracy"])
    assert facts.intervals["macro_f1"].value == pytest.approx(lung.result["test_macro_f1"])
    assert accuracy.low <= accuracy.value <= accuracy.high
    assert 0 <= facts.reliability.ece <= 1
    assert facts.reliability.count.sum() == lung.result["test_images"]
    assert np.isfinite(facts.intervals["macro_roc_auc"].value)


def test_missing_run_is_a_clear_error(store):
    with pytest.raises(RunNotFoundError, match=r"no run 'nope': .*runs/nope/ holds no"):
        build_report(store, "nope")
    with pytest.raises(RunNotFoundError, match=r"invalid run id '\.\.'"):
        build_report(store, "..")


def test_report_from_s3(store, s3_uri, tmp_path, monkeypatch):
    """The same run in a real S3 server (SeaweedFS): the report is written beside it."""
    from organtrain.storage import open_storage

    monkeypatch.setenv("ORGANTRAIN_CACHE_DIR", str(tmp_path / "cache"))  # shards come from S3
    s3 = open_storage(s3_uri)
    for info in store.list():
        if info.key.startswith((f"runs/{RUN_ID}/", "datasets/")):
            s3.put_bytes(info.key, store.get_bytes(info.key))
    key = build_report(s3, RUN_ID, resamples=100)
    page = s3.get_bytes(key).decode()
    _assert_self_contained(page)
    assert 'id="organ-lung"' in page and 'id="organ-colon"' in page
    pair_images = _assert_leakage_parts(s3, page)  # train and test shards read from S3
    assert page.count('<figure class="thumb">') == page.count("data:image/jpeg") - pair_images > 0
    assert s3_uri in page  # the storage line names where the run lives


# --- The leakage part, from hand-made dataset.json figures --------------------------------


def _jpeg(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="JPEG")
    return out.getvalue()


def _view(leakage: dict | None, test_groups: dict[str, int], **index_fields):
    from organtrain.report.build import DatasetView

    diagnoses = sorted(test_groups)
    organ = OrganIndex(
        diagnoses=diagnoses,
        counts={s: dict.fromkeys(diagnoses, 20) for s in ("train", "val", "test")},
        groups={"train": dict.fromkeys(diagnoses, 30), "val": dict.fromkeys(diagnoses, 8),
                "test": test_groups},
    )  # fmt: skip
    index = DatasetIndex(
        "tiny", "v2", "", "", {}, {"lung": organ}, [], leakage=leakage, **index_fields
    )
    return DatasetView(index=index)


def _organ_figures(**changes) -> dict:
    figures = {
        "organ": "lung",
        "images": 100,
        "groups": {"train": 60, "val": 16, "test": 14},
        "clusters": {"train": 3, "val": 1, "test": 1},
        "cross_split_groups": 0,
        "cross_split_copies": 0,
        "cross_split_pairs": 0,
        "leaks": [],
        "closest": [
            {"train_key": "lung/benign/a.png", "train_sha256": "a" * 64,
             "test_key": "lung/benign/b.png", "test_sha256": "b" * 64, "distance": 0.05},
            {"train_key": "lung/benign/c.png", "train_sha256": "c" * 64,
             "test_key": "lung/benign/d.png", "test_sha256": "d" * 64, "distance": 0.31},
        ],
    }  # fmt: skip
    return figures | changes


def test_leakage_part_names_the_leaks_as_a_warning():
    from organtrain.report.build import _leakage_part

    leaks = [
        {"kind": "group", "what": "group 'patient <7>' in test and train"},
        {"kind": "near_duplicate", "what": "lung/benign/x.png (train) ≈ lung/benign/y.png (test)"},
    ]
    figures = _organ_figures(cross_split_groups=1, cross_split_pairs=2, leaks=leaks)
    leakage = {"method": "dhash-16", "clean": False, "threshold": 0.1, "organs": {"lung": figures}}
    view = _view(leakage, {"adenocarcinoma": 9, "benign": 7})
    thumbs = {"train": {"a" * 64: _jpeg("red")}, "test": {"b" * 64: _jpeg("blue")}}
    part = _leakage_part(view, "lung", thumbs)

    assert "straddles two splits (checked by" not in part  # no pass line
    assert '<div class="warning"><p><b>Leakage found</b> (checked by dhash-16): ' in part
    assert "1 patient/slide group(s), 0 identical file(s) and 2 near-duplicate pair(s)" in part
    assert "The first 2 of 3:" in part  # the counts are complete, the list is not
    assert "<li>patient/slide group: group &#x27;patient &lt;7&gt;&#x27; in test and train" in part
    assert "<li>near-duplicate pair: lung/benign/x.png (train) ≈ lung/benign/y.png" in part
    # The closest pairs: side by side, the one under the threshold flagged, a missing image said.
    assert "Pairs at or below the near-duplicate threshold, 0.1, count as copies" in part
    assert part.count("data:image/jpeg") == 2
    assert '<td class="num warn">0.05<br>≤ threshold</td>' in part
    assert '<td class="num">0.31</td>' in part
    assert part.count("image not found in the shards") == 2  # c (train) and d (test)
    assert "rests on" not in part  # enough test patients for both diagnoses


def test_leakage_part_flags_a_diagnosis_with_few_test_groups():
    from organtrain.report.build import _leakage_part

    leakage = {"method": "dhash-16", "clean": True, "organs": {"lung": _organ_figures()}}
    view = _view(leakage, {"adenocarcinoma": 3, "benign": 12})
    part = _leakage_part(view, "lung", {}, "train images unavailable: shard gone")

    passed = (
        '<p class="pass">✔ No patient/slide group, identical file or near-duplicate pair '
        "straddles two splits (checked by dhash-16).</p>"
    )
    assert passed in part
    assert "The test accuracy of <i>adenocarcinoma</i> rests on 3 patients/slides." in part
    assert "<i>benign</i> rests on" not in part
    assert '<td class="num warn">3</td>' in part and '<td class="num">12</td>' in part
    assert "does not record the near-duplicate threshold" in part
    assert "train images unavailable: shard gone" in part
    assert part.count("image not found in the shards") == 4


def test_leakage_part_of_a_version_prepared_before_the_check():
    from organtrain.report.build import _leakage_part, _split_changes

    changes = {"from_version": "v1", "images": 12, "of": 200, "reason": "groups changed"}
    view = _view(None, {"adenocarcinoma": 6, "benign": 1}, split_changes=changes)
    part = _leakage_part(view, "lung", {})
    assert "prepared by an older organtrain, before leakage checks" in part
    assert "<code>organtrain leakage --dataset tiny --version v2</code>" in part
    assert "The test accuracy of <i>benign</i> rests on 1 patient/slide." in part
    assert "Closest train/test pairs" not in part
    note = _split_changes(view)
    assert note.startswith('<p class="warning">12 of the 200 images of dataset version ')
    assert "<code>v1</code> changed split in this version (groups changed)" in note
    assert _split_changes(_view(None, {"benign": 6})) == ""


# --- Confusion counts and rounded settings, from hand-made inputs --------------------------


@pytest.mark.parametrize("k", [2, 10, 25])
def test_confusion_count_table_holds_every_count(k):
    """Below the figure, every cell's count with a hover title; folded while the figure
    writes the counts in its cells, open once it has too many classes to."""
    from organtrain import plots
    from organtrain.report.build import _confusion_counts

    classes = [f"diagnosis_{i}" for i in range(k)]
    matrix = np.arange(k * k, dtype=np.int64).reshape(k, k) * 37  # every count distinct
    part = _confusion_counts(matrix, classes)
    assert part.startswith("<details open>" if k > plots.CELL_NUMBERS_MAX_CLASSES else "<details>")
    assert '<div class="scroll"><table class="counts">' in part  # scrolls, never the page
    cells = re.findall(r'<td class="num[^"]*" title="([^"]*)"[^>]*>([0-9,]+)</td>', part)
    assert [int(count.replace(",", "")) for _, count in cells] == list(matrix.ravel())
    row = k - 1
    total = int(matrix[row].sum())
    assert cells[row * k + 1][0] == html.escape(
        f"true: diagnosis_{row} · predicted: diagnosis_1 · {matrix[row, 1]:,} of {total:,} "
        f"test images ({matrix[row, 1] / total:.0%})"
    )
    assert part.count('class="num diagonal"') == k
    assert re.findall(r'<td class="num">([0-9,]+)</td>', part) == [
        f"{t:,}" for t in matrix.sum(axis=1)
    ]  # row totals


def test_settings_are_rounded_for_display_only():
    from organtrain.report import html as h

    assert h.rounded(0.0012345678901234567) == 0.001235
    assert h.rounded([0.1 + 0.2, 64, "imagenet", None]) == [0.3, 64, "imagenet", None]
    assert h.rounded(float("nan")) != h.rounded(float("nan"))  # NaN stays NaN
    assert h.rounded(True) is True
    shown = h.settings_text({"train.learning_rate": 3.0000000000000004e-05, "dropout": 0.3})
    assert "train.learning_rate=3e-05<" in shown and "dropout=0.3<" in shown


def test_trial_settings_show_only_what_the_trials_model_reads():
    from organtrain.report.build import _applied_trial_config

    sampled = {"model.weights": "imagenet", "model.filters": [8, 16], "train.learning_rate": 0.1}
    assert _applied_trial_config(sampled, "simple_cnn") == {
        "model.filters": [8, 16],
        "train.learning_rate": 0.1,
    }
    assert _applied_trial_config({**sampled, "model.name": "vgg16"}, "simple_cnn") == {
        "model.weights": "imagenet",
        "train.learning_rate": 0.1,
        "model.name": "vgg16",
    }
    assert _applied_trial_config(sampled, "—") == sampled  # model unknown: all shown
