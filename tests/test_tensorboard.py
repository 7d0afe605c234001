"""TensorBoard logs read back with TensorBoard's own reader: every epoch, numbered as in
metrics/history.parquet, for `organtrain train` (here, on S3, resumed) and for every
trial of a sweep (`assert_every_epoch_logged`, called by the sweep runs of test_sweep.py
on local storage and on S3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from organtrain.cli import main
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import LocalStorage, Storage, open_storage
from organtrain.tensorboard import download_logs, split_and_tag

ORGANS = {"lung": ["adenocarcinoma", "benign"]}
JOB = {
    "name": "tb",
    "storage": {"uri": "set-by-the-test"},
    "prepare": {"dataset": "tiny", "test_fraction": 0.25, "val_fraction": 0.25,
                "min_images_per_diagnosis": 5, "max_image_side": 32, "images_per_shard": 8},
    "input": {"image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
    "model": {"name": "simple_cnn", "filters": [8], "dense_units": 8},
    "train": {"epochs": 2, "early_stopping_patience": 0},
}  # fmt: skip


def scalars(folder: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(split, tag) -> [(step, value), ...] of the event files in folder/{train,validation},
    as TensorBoard loads them (tf.summary writes scalars as tensors)."""
    found = {}
    for split in ("train", "validation"):
        if not (folder / split).is_dir():
            continue
        events = EventAccumulator(str(folder / split), size_guidance={"tensors": 0})
        events.Reload()
        for tag in events.Tags()["tensors"]:
            found[(split, tag)] = [
                (e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)
            ]
    return found


def history_by_tag(storage: Storage, organ_prefix: str) -> dict[tuple[str, str], list]:
    """metrics/history.parquet in the same shape: (split, tag) -> [(epoch, value), ...]."""
    rows = read_parquet(storage.get_bytes(f"{organ_prefix}/metrics/history.parquet"))
    table: dict[tuple[str, str], list] = {}
    for row in sorted(rows.to_pylist(), key=lambda r: r["epoch"]):
        table.setdefault(split_and_tag(row["metric"]), []).append((row["epoch"], row["value"]))
    return table


def assert_same_epochs(logged: dict, expected: dict) -> None:
    assert set(logged) == set(expected), (sorted(logged), sorted(expected))
    for key, points in expected.items():
        assert [step for step, _ in logged[key]] == [epoch for epoch, _ in points], key
        assert [value for _, value in logged[key]] == pytest.approx(
            [value for _, value in points], rel=1e-6
        ), key


def assert_every_epoch_logged(storage: Storage, run_id: str, organ: str, local: Path) -> None:
    """Every trial of a sweep's organ logged each epoch it ran (trials.parquet), steps
    1..epochs; the chosen trial's figures are those of the organ's history.parquet.
    The logs are read from `local` after download_logs, as a user of S3 storage would."""
    download_logs(storage, run_id, local)
    prefix = f"runs/{run_id}/{organ}"
    trials = read_parquet(storage.get_bytes(f"{prefix}/metrics/trials.parquet")).to_pylist()
    assert trials
    for trial in trials:
        logged = scalars(local / organ / "tensorboard" / trial["trial_id"])
        steps = list(range(1, trial["epochs"] + 1))
        assert logged, f"no TensorBoard logs for trial {trial['trial_id']}"
        for key, points in logged.items():
            assert [step for step, _ in points] == steps, (trial["trial_id"], key, points)
    chosen = read_parquet(storage.get_bytes(f"runs/{run_id}/summary.parquet")).to_pylist()
    (row,) = [r for r in chosen if r["organ"] == organ]
    assert_same_epochs(
        scalars(local / organ / "tensorboard" / row["trial_id"]), history_by_tag(storage, prefix)
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tensorboard")
    write_synthetic_tree(
        root / "src", organs=ORGANS, images_per_diagnosis=16, image_size=32, progress=False
    )
    job = {**JOB, "storage": {"uri": str(root / "local-store")},
           "prepare": {**JOB["prepare"], "source": str(root / "src")}}  # fmt: skip
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return root


@pytest.mark.slow
def test_train_on_s3_resumed_logs_every_epoch_once(source, s3_uri, tmp_path):
    """`organtrain train --storage s3://...` (the job names a local folder), stopped after
    2 epochs and continued to 3 by the same command: the event files in the bucket, brought
    down by `organtrain tensorboard`, hold epochs 1, 2, 3 once each, as history.parquet."""
    config = ["--config", str(source / "job.yaml"), "--no-progress"]
    assert main(["prepare", "--dest", s3_uri, *config]) == 0
    train = ["train", "--organ", "lung", "--run-id", "tb", "--storage", s3_uri, *config]
    assert main(train) == 0
    storage = open_storage(s3_uri)
    storage.delete("runs/tb/lung/result.json")  # as if killed after its second epoch
    assert main([*train, "--set", "train.epochs=3"]) == 0
    assert not (source / "local-store").exists(), "--storage must replace storage.uri"

    out = tmp_path / "logs"
    assert main(["tensorboard", "tb", "--storage", s3_uri, "--out", str(out), *config]) == 0
    folder = out / "lung" / "tensorboard"
    # The resumed process wrote epochs 1-2 again and removed the first process's file.
    for split in ("train", "validation"):
        assert len(list((folder / split).glob("events.out.tfevents.*"))) == 1, split
    expected = history_by_tag(storage, "runs/tb/lung")
    assert [epoch for epoch, _ in expected[("train", "epoch_loss")]] == [1, 2, 3]
    assert {("validation", "epoch_loss"), ("train", "epoch_accuracy")} <= set(expected)
    assert_same_epochs(scalars(folder), expected)


def test_download_logs_copies_event_files_and_drops_replaced_ones(tmp_path):
    """Only event files under an organ's tensorboard/ folder are copied; a file the run
    no longer has (a resumed run replaced it) leaves the copy too."""
    store = LocalStorage(tmp_path / "store")
    store.put_bytes("runs/r/lung/metrics/history.parquet", b"not an event file")
    store.put_bytes("runs/r/lung/tensorboard/train/events.out.tfevents.1.host", b"x")
    got = download_logs(store, "r", tmp_path / "out")
    assert got == [tmp_path / "out/lung/tensorboard/train/events.out.tfevents.1.host"]
    assert got[0].read_bytes() == b"x"
    # A file the run replaced (a resumed run's new event file) goes from the copy too.
    store.delete("runs/r/lung/tensorboard/train/events.out.tfevents.1.host")
    store.put_bytes("runs/r/lung/tensorboard/train/events.out.tfevents.2.host", b"yy")
    got = download_logs(store, "r", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out/lung/tensorboard/train").iterdir()] == [
        "events.out.tfevents.2.host"
    ]
