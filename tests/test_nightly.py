"""`organtrain nightly` for real, night after night, on one storage and one image source.

The nights build on each other (module order matters): a first night trains and promotes
both organs; an unchanged night trains nothing; new images in one organ retrain only that
organ (and that night survives a kill); a worse challenger is not promoted while a new
diagnosis is; a second nightly for a night already running is refused.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from organtrain import registry
from organtrain.cli import main
from organtrain.data.dataset import load_dataset
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.nightly import HISTORY, NightLock
from organtrain.storage import LocalStorage

pytestmark = pytest.mark.slow  # real Ray / SLURM / training: minutes

# lung learns enough in a few seconds to beat an untrained model clearly (~0.6 vs ~0.33).
JOB = {
    "name": "nightly",
    "prepare": {"dataset": "lab", "test_fraction": 0.25, "val_fraction": 0.2,
                "min_images_per_diagnosis": 5, "max_image_side": 64, "images_per_shard": 64},
    "input": {"image_size": 64, "batch_size": 16, "shuffle_buffer": 256},
    "augment": {"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                "zoom_range": 0, "brightness_range": None},
    "model": {"name": "simple_cnn", "filters": [16, 32, 64, 64], "dense_units": 0},
    "train": {"epochs": 12, "learning_rate": 3e-3, "early_stopping_patience": 0},
    "search": {"samples": 1, "scheduler": "fifo"},
    "resources": {"local_cpus": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    lung = {"lung": ["adenocarcinoma", "benign", "squamous_cell_carcinoma"]}
    write_synthetic_tree(root / "src", organs=lung, images_per_diagnosis=80, progress=False)
    write_synthetic_tree(root / "src", organs={"colon": ["adenocarcinoma", "benign"]},
                         images_per_diagnosis=30, progress=False)  # fmt: skip
    job = {**JOB, "storage": {"uri": str(root / "store")},
           "prepare": {**JOB["prepare"], "source": str(root / "src")}}  # fmt: skip
    (root / "nightly.yaml").write_text(yaml.safe_dump(job))
    return root


def nightly_command(lab: Path, night: str, *overrides: str) -> list[str]:
    command = [sys.executable, "-m", "organtrain", "nightly", "--config",
               str(lab / "nightly.yaml"), "--date", night, "--no-progress"]  # fmt: skip
    return command + [a for o in overrides for a in ("--set", o)]


def run_nightly(lab: Path, night: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        nightly_command(lab, night, *overrides), capture_output=True, text=True, env=env,
        timeout=420,
    )  # fmt: skip
    return done


def history(lab: Path) -> list[dict]:
    return read_parquet(LocalStorage(lab / "store").get_bytes(HISTORY)).to_pylist()


def night_rows(lab: Path, night: str) -> dict[str, dict]:
    rows = [r for r in history(lab) if r["night"] == night]
    assert len(rows) == len({r["organ"] for r in rows}), "one row per organ per night"
    return {r["organ"]: r for r in rows}


def add_images(lab: Path, organ: str, diagnosis: str, count: int, seed: int, like=None) -> None:
    """New images arrive in the lab's folder (other seed: other pictures); `like`: the
    (organ, diagnosis) the generator draws, for a diagnosis it does not know."""
    fresh = lab / f"fresh-{seed}"
    drawn_organ, drawn = like or (organ, diagnosis)
    write_synthetic_tree(fresh, organs={drawn_organ: [drawn]}, images_per_diagnosis=count,
                         seed=seed, progress=False)  # fmt: skip
    for path in (fresh / drawn_organ / drawn).iterdir():
        target = lab / "src" / organ / diagnosis / f"s{seed}-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def test_first_night_trains_and_promotes_every_organ(lab):
    done = run_nightly(lab, "2026-03-01")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = night_rows(lab, "2026-03-01")
    assert set(rows) == {"colon", "lung"}
    for organ, row in rows.items():
        assert row["changed"] and row["trained"] and row["promoted"], row
        assert row["reason"] == f"first model for {organ}: promoted"
        champion = registry.champion(LocalStorage(lab / "store"), organ)
        assert champion.version == row["champion_after"] == "nightly-2026-03-01"
    version = registry.get_version(LocalStorage(lab / "store"), "lung", "nightly-2026-03-01")
    assert version.classes == ["adenocarcinoma", "benign", "squamous_cell_carcinoma"]
    assert version.dataset == "lab" and version.fingerprint == rows["lung"]["fingerprint"]
    assert version.settings["model"]["filters"] == [16, 32, 64, 64] and version.code_version
    assert version.test_metrics["accuracy"] >= 0.5, "lung's champion must beat chance clearly"
    assert (lab / "store/runs/nightly-2026-03-01/report.html").exists()


def test_unchanged_night_trains_nothing_and_reads_nothing_that_grows(lab, monkeypatch, capsys):
    """The night's cost must not grow with the archive: besides listing the source it
    reads no image, no shard and no manifest (a row per image), and trains nothing.
    Every object it touches in the store and the source is counted (the real local
    storage, wrapped); the command runs in this process to be counted."""
    touched = []
    for method in ("get_bytes", "download", "path"):
        real = getattr(LocalStorage, method)

        def counting(storage, key, *args, _real=real, **kwargs):
            touched.append(key)
            return _real(storage, key, *args, **kwargs)

        monkeypatch.setattr(LocalStorage, method, counting)
    command = nightly_command(lab, "2026-03-02")[3:]  # the arguments after `-m organtrain`
    assert main(command) == 0
    stderr = capsys.readouterr().err
    rows = night_rows(lab, "2026-03-02")
    assert not any(r["changed"] or r["trained"] or r["promoted"] for r in rows.values())
    assert rows["lung"]["reason"] == "not retrained: unchanged since 2026-03-01"
    # No search ran: no sweep plan, no Ray started ("starting a local Ray" is its message).
    assert not (lab / "store/runs/nightly-2026-03-02/sweep.json").exists()
    assert "starting a local Ray" not in stderr
    assert "history.parquet" in {k.rsplit("/", 1)[-1] for k in touched}, "nothing was counted"
    grows = [k for k in touched if k.endswith((".png", ".tfrecord", "manifest.parquet"))]
    assert grows == [], f"an unchanged night read {len(grows)} per-image objects: {grows[:5]}"
    assert len(history(lab)) == 4


def test_new_images_retrain_only_that_organ_and_a_killed_night_completes(lab):
    add_images(lab, "colon", "benign", 12, seed=7)
    night, epochs = "2026-03-03", "train.epochs=40"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        nightly_command(lab, night, epochs), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tune = lab / "store/runs" / f"nightly-{night}" / "tune/colon"
    deadline = time.monotonic() + 300
    try:
        while not list(tune.glob("*/checkpoint_00000[1-9]")):
            assert first.poll() is None, "the night ended before it could be killed"
            assert time.monotonic() < deadline, "no colon checkpoint within 300 s"
            time.sleep(0.3)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (lab / "store/nightly/locks" / f"nightly-{night}.json").exists()  # left behind

    done = run_nightly(lab, night, epochs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"taking over the lock on the nightly for nightly-{night}: its holder stopped"
        in done.stderr
    )
    rows = night_rows(lab, night)
    assert rows["lung"]["trained"] is False and rows["lung"]["changed"] is False
    colon = rows["colon"]
    assert colon["changed"] and colon["trained"]
    assert colon["change"] == "images or diagnoses changed since 2026-03-02"
    # Champion and challenger were scored on the same, current test images.
    store = LocalStorage(lab / "store")
    index = load_dataset(store, "lab")
    decision = json.loads(store.get_bytes(f"runs/nightly-{night}/decisions/colon.json"))
    assert f"on the same {index.split_size('colon', 'test')} test images" in colon["reason"]
    assert 0 <= colon["p_value"] <= 1 and colon["ci_low"] <= colon["diff"] <= colon["ci_high"]
    assert decision["promoted"] == colon["promoted"] == (colon["diff"] >= 0)
    assert len(history(lab)) == 6

    # The same night again: the same outcome, no new rows, nothing retrained.
    again = run_nightly(lab, night, epochs)
    assert again.returncode == 0, again.stderr[-3000:]
    same = json.dumps(night_rows(lab, night), sort_keys=True)  # as text: NaN == NaN
    assert same == json.dumps(rows, sort_keys=True) and len(history(lab)) == 6
    assert "starting a local Ray" not in again.stderr


def test_worse_challenger_is_kept_out_and_a_new_diagnosis_is_promoted(lab):
    add_images(lab, "lung", "benign", 6, seed=8)
    add_images(lab, "colon", "polyp", 30, seed=9, like=("blood", "uninfected"))
    # Tonight's lung models barely train: they must lose to the champion.
    weak = 'search.organ_space={"lung": {"train.epochs": 1, "train.learning_rate": 1e-7}}'
    done = run_nightly(lab, "2026-03-04", weak)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = night_rows(lab, "2026-03-04")
    lung, colon = rows["lung"], rows["colon"]
    assert lung["trained"] and not lung["promoted"], lung
    assert lung["challenger_value"] < lung["champion_value"] and lung["diff"] < 0
    assert lung["reason"].startswith("champion kept: accuracy")
    store = LocalStorage(lab / "store")
    assert registry.champion(store, "lung").version == "nightly-2026-03-01"
    # Its challenger is still registered, for people to look at.
    assert registry.get_version(store, "lung", "nightly-2026-03-04").model == "simple_cnn"

    assert colon["trained"] and colon["promoted"]
    assert "label set changed (new diagnoses polyp)" in colon["reason"]
    assert registry.champion(store, "colon").version == "nightly-2026-03-04"


def test_models_commands_show_promote_and_roll_back(lab, capsys):
    config = ["--config", str(lab / "nightly.yaml")]
    assert main(["models", "list", *config]) == 0
    out = capsys.readouterr().out
    assert (
        "lung: champion nightly-2026-03-01" in out and "colon: champion nightly-2026-03-04" in out
    )
    assert main(["models", "show", "lung", *config]) == 0
    out = capsys.readouterr().out
    assert "* nightly-2026-03-01" in out and "  nightly-2026-03-04" in out
    store = LocalStorage(lab / "store")
    before = registry.champion(store, "colon")
    assert main(["models", "rollback", "colon", *config]) == 0
    assert registry.champion(store, "colon").version == before.previous[-1]
    assert main(["models", "promote", "colon", "nightly-2026-03-04", *config]) == 0
    assert registry.champion(store, "colon").version == "nightly-2026-03-04"
    assert main(["models", "promote", "colon", "no-such-version", *config]) == 2
    assert "colon has no model version 'no-such-version'" in capsys.readouterr().err


def test_a_second_nightly_for_the_same_night_is_refused(lab):
    with NightLock(LocalStorage(lab / "store"), "nightly-2026-03-05", stale_after=600):
        done = run_nightly(lab, "2026-03-05")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "the nightly for nightly-2026-03-05 is locked by another process" in done.stderr
    assert "2026-03-05" not in {r["night"] for r in history(lab)}
