"""`organtrain predict` and `models register`, on a tiny REAL `train` run of two organs.

The run (tests/tinyrun.py) trains lung and colon on synthetic 32-pixel images; its source
tree also holds a truncated PNG and a text file, which predict must list and skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tinyrun import RUN_ID, TINY_ORGANS

from organtrain import registry
from organtrain.cli import main
from organtrain.config import load_config
from organtrain.data.manifest import read_parquet
from organtrain.errors import ConfigError
from organtrain.predict import PREDICTIONS, REJECTED, SUMMARY, predict
from organtrain.search.sweep import sweep
from organtrain.storage import LocalStorage, open_storage

ORGANS = TINY_ORGANS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # every test here stands on a real training run


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run  # (root, storage) of this module's copy of the session's tiny run


def _table(where, name):
    return read_parquet(open_storage(where).get_bytes(name)).to_pylist()


def _reference(storage, organ):
    """What `train` wrote about its test images: metrics/predictions.parquet."""
    key = f"runs/{RUN_ID}/{organ}/metrics/predictions.parquet"
    return read_parquet(storage.get_bytes(key)).to_pylist()


def test_predict_reproduces_the_runs_test_predictions(tiny, tmp_path):
    root, storage = tiny
    reference = _reference(storage, "lung")
    keys = [r["source_key"] for r in reference]
    outcome = predict(
        root / "src", tmp_path / "out", models=storage, organ="lung", run=RUN_ID, keys=keys
    )
    assert (outcome.images, outcome.classified, outcome.rejected) == (len(keys), len(keys), 0)
    got = {r["key"]: r for r in _table(tmp_path / "out", PREDICTIONS)}
    classes = ORGANS["lung"]
    for ref in reference:
        row = got[ref["source_key"]]
        assert row["predicted_class"] == ref["predicted_class"]
        assert row["model_version"] == f"run:{RUN_ID}"
        probs = [row[f"p_{c}"] for c in classes]
        np.testing.assert_allclose(probs, ref["probabilities"], atol=1e-5)

    # the command line, with the keys in a file, writes the same table
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    argv = ["predict", str(root / "src"), "--out", str(tmp_path / "cli"), "--organ", "lung",
            "--run", RUN_ID, "--keys", str(tmp_path / "keys.txt"), "--storage", storage.uri,
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert _table(tmp_path / "cli", PREDICTIONS) == _table(tmp_path / "out", PREDICTIONS)


def test_registered_champions_classify_a_two_organ_tree_and_bad_files_are_listed(
    tiny, tmp_path, capsys
):
    root, storage = tiny
    for organ in ORGANS:
        assert (
            main(["models", "register", RUN_ID, organ, "--promote", "--storage", str(storage.uri)])
            == 0
        )
    entry = registry.get_version(storage, "lung", RUN_ID)
    assert entry.preprocessing == {"max_image_side": 32, "encoding": "png", "jpeg_quality": 95}
    assert entry.test_metrics.keys() == {"accuracy", "macro_f1", "macro_roc_auc"}
    card = storage.get_bytes(f"models/lung/versions/{RUN_ID}/MODEL_CARD.md").decode()
    for needed in (
        "## Intended use",
        "| adenocarcinoma |",
        "95 % interval",
        "balanced accuracy",
        "ECE",
        "## How it was chosen",
        "## Known limits",
        "only 13 images",
    ):
        assert needed in card, needed

    out = tmp_path / "out"
    command = ["predict", str(root / "src"), "--out", str(out), "--storage", str(storage.uri)]
    assert main([*command, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "lung (model tiny)" in printed and "colon (model tiny)" in printed
    rows = _table(out, PREDICTIONS)
    images = [p for p in (root / "src").rglob("*.png") if p.name != "broken.png"]
    assert len(rows) == len(images)
    assert {r["organ"] for r in rows} == {"lung", "colon"}
    assert all(r["model_version"] == RUN_ID and r["key"].startswith(r["organ"] + "/") for r in rows)
    # each organ's own model: its test images get the run's probabilities for that organ
    by_key = {r["key"]: r for r in rows}
    for organ in ORGANS:
        for ref in _reference(storage, organ)[:3]:
            row = by_key[ref["source_key"]]
            np.testing.assert_allclose(
                [row["p_adenocarcinoma"], row["p_benign"]], ref["probabilities"], atol=1e-5
            )
    rejected = {r["key"]: r["reason"] for r in _table(out, REJECTED)}
    assert rejected == {
        "lung/adenocarcinoma/broken.png": "not_an_image",
        "lung/notes.txt": "unsupported_extension",
    }
    assert "unreadable: 1 not_an_image, 1 unsupported_extension" in printed

    # the same command again: nothing redone
    assert main([*command, "--no-progress"]) == 0
    assert "(already done)" in capsys.readouterr().out


def test_bad_requests_get_clear_errors(tiny, tmp_path):
    root, storage = tiny
    empty = LocalStorage(tmp_path / "no-models")
    with pytest.raises(
        ConfigError, match=r"'colon' has no champion model.*models register RUN colon"
    ):
        predict(root / "src", tmp_path / "o1", models=empty)
    with pytest.raises(ConfigError, match="give --organ"):
        predict(root / "src" / "lung" / "benign", tmp_path / "o2", models=storage, run=RUN_ID)
    with pytest.raises(ConfigError, match="no finished model"):
        predict(root / "src", tmp_path / "o3", models=storage, run="no-such-run")
    with pytest.raises(ConfigError, match="holds no finished model"):
        registry.register_run(storage, "no-such-run", "lung")


KILLED_RUN = """
import os, signal, sys
from organtrain.predict import predict
done = []
def on_chunk(chunk):
    done.append(chunk.index)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as a preempted node would stop
predict(sys.argv[1], sys.argv[2], models=sys.argv[3], run="tiny", chunk_images=5,
        on_chunk=on_chunk)
"""


def test_a_killed_predict_continues_without_redoing_finished_chunks(tiny, tmp_path):
    root, storage = tiny
    src = tmp_path / "src"
    shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("broken.png", "*.txt"))
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(src), str(out), storage.uri],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / SUMMARY).exists()
    assert len(list((out / "parts").glob("chunk-*.parquet"))) == 2

    redone = []
    outcome = predict(
        src,
        out,
        models=storage,
        run=RUN_ID,
        chunk_images=5,
        on_chunk=lambda c: redone.append(c.index),
    )
    assert outcome.chunks_reused == 2
    assert len(redone) == outcome.chunks - 2 and not {0, 1} & set(redone)
    assert outcome.classified == len(list(src.rglob("*.png")))
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())

    # the result equals an uninterrupted run's
    straight = predict(src, tmp_path / "straight", models=storage, run=RUN_ID, chunk_images=5)
    a = sorted(_table(out, PREDICTIONS), key=lambda r: r["key"])
    b = sorted(_table(tmp_path / "straight", PREDICTIONS), key=lambda r: r["key"])
    assert a == b and straight.chunks_reused == 0


def test_predict_from_and_to_s3_on_ray_workers_matches_in_process(tiny, tmp_path, s3_uri):
    import ray

    root, storage = tiny
    s3 = open_storage(s3_uri)
    lung = [p for p in (root / "src" / "lung").rglob("*.png") if p.name != "broken.png"]
    for path in lung:
        s3.put_file("images/" + path.relative_to(root / "src" / "lung").as_posix(), path)
    here = predict(
        f"{s3_uri}/images",
        f"{s3_uri}/here",
        models=storage,
        organ="lung",
        run=RUN_ID,
        chunk_images=8,
    )
    try:
        ray.init(num_cpus=2, include_dashboard=False)
        on_ray = predict(
            f"{s3_uri}/images",
            f"{s3_uri}/ray",
            models=storage,
            organ="lung",
            run=RUN_ID,
            chunk_images=8,
            workers=2,
        )
    finally:
        ray.shutdown()
    assert (here.workers, on_ray.workers) == (0, 2)
    a = sorted(_table(f"{s3_uri}/here", PREDICTIONS), key=lambda r: r["key"])
    b = sorted(_table(f"{s3_uri}/ray", PREDICTIONS), key=lambda r: r["key"])
    assert len(a) == len(lung) and [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["predicted_class"] == y["predicted_class"]
        assert abs(x["p_benign"] - y["p_benign"]) < 1e-5


def test_models_export_writes_the_next_tf_serving_version_with_the_card(tiny, tmp_path, capsys):
    _, storage = tiny
    version = registry.register_run(storage, RUN_ID, "lung")  # idempotent: already there
    registry.promote(storage, "lung", version.version, reason="test")
    out = tmp_path / "serving" / "lung"
    for n in (1, 2):
        assert main(["models", "export", "lung", "--out", str(out),
                     "--storage", storage.uri]) == 0  # fmt: skip
        assert (out / str(n) / "saved_model.pb").is_file()
    assert f"SavedModel written to {out / '2'}" in capsys.readouterr().out
    card = storage.get_bytes(f"models/lung/versions/{RUN_ID}/MODEL_CARD.md")
    assert (out / "2" / "assets.extra" / "MODEL_CARD.md").read_bytes() == card
    exported = json.loads((out / "2" / "assets.extra" / "organtrain.json").read_text())
    assert exported["classes"] == ORGANS["lung"] and exported["version"] == RUN_ID
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_sweep_is_refused_in_a_run_id_that_train_wrote(tiny):
    """A sweep used to take the `train` results as finished organs and fail on their
    missing search record; now it says so before writing anything."""
    root, storage = tiny
    cfg = load_config(root / "tiny.yaml")
    with pytest.raises(ConfigError, match="already holds `organtrain train` results for"):
        sweep(cfg, run_id=RUN_ID, progress=False, report=False)
    assert not storage.exists(f"runs/{RUN_ID}/sweep.json")
    assert not list(storage.list("locks"))  # the run's locks were released
