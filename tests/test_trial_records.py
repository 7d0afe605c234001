"""Worker reuse and honest trial records, on a real local Ray Tune (issue 18).

The trials here are plain functions, not TensorFlow, so that the one thing under test is
exact: a stopped trial whose training thread takes longer than Tune's 2 s to end (as
model.fit's unwinding did, 2-8 s on 2 busy cores), and the worker Tune then reuses.
"""

import json
import os
import time
from pathlib import Path

import pytest
import ray
from ray import tune

from organtrain.search import results
from organtrain.search.organ import WaitForPreviousTrial, choose_trial, trial_identities

pytestmark = pytest.mark.slow  # a local Ray and two Tune experiments: ~40 s

SLOW_UNWIND_S = 3.0  # longer than Tune's default TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s)


@pytest.fixture(scope="module")
def local_ray():
    # One CPU: every trial after the first runs on the worker its predecessor leaves. The
    # workers import this module to run its trial functions.
    here = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    ray.init(
        num_cpus=1, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": env},
    )  # fmt: skip
    yield
    ray.shutdown()


def slowly_unwinding_trial(config: dict) -> None:
    for epoch in range(1, 5):
        time.sleep(0.3)
        try:
            tune.report({"score": config["x"] * epoch, "epoch": epoch, "trained_organ": "lung"})
        except SystemExit:  # Tune stopping this trial: take as long as model.fit did
            time.sleep(SLOW_UNWIND_S)
            raise


def search(tmp_path: Path, name: str, trainable):
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"x": tune.grid_search([3, 0, 1, 2])},
        tune_config=tune.TuneConfig(
            metric="score", mode="max", reuse_actors=True,
            # Stops every trial that trails at epoch 1: most trials end stopped.
            scheduler=tune.schedulers.ASHAScheduler(
                time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=4
            ),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0),
    )  # fmt: skip
    return tuner.fit()


def rows_of(grid) -> list[dict]:
    return results.trial_rows(
        grid, trial_identities(grid), run_id="r", organ="lung", metric="score", mode="max",
        epochs=4,
    )  # fmt: skip


def own_reports(grid) -> dict[str, list[dict]]:
    """What each trial wrote itself, by trial id: the result.json lines in its folder."""
    reports = {}
    for result in grid:
        lines = Path(result.path, "result.json")
        entries = [json.loads(x) for x in lines.read_text().splitlines()] if lines.exists() else []
        for entry in entries:
            reports.setdefault(entry["trial_id"], []).append(entry)
    return reports


def test_a_stopped_trial_that_unwinds_slowly_hands_its_worker_on(local_ray, tmp_path):
    def trainable(config):
        slowly_unwinding_trial(config)

    trainable.__mixins__ = (WaitForPreviousTrial,)
    grid = search(tmp_path, "patient", trainable)

    rows = rows_of(grid)
    assert [r["status"] for r in rows] == ["terminated"] * 4, rows
    assert sum(r["stop_reason"] == "scheduler" for r in rows) >= 2, rows
    reports = own_reports(grid)
    for row in rows:
        (config,) = {json.dumps(e["config"], sort_keys=True) for e in reports[row["trial_id"]]}
        assert row["config"] == config
        assert row["epochs"] == max(e["epoch"] for e in reports[row["trial_id"]])


def test_a_trial_that_cannot_get_its_worker_keeps_its_own_id_and_config(local_ray, tmp_path):
    """Without the patient reset, Tune's 2 s wait runs out and the trial that was to reuse
    the worker fails; Tune then gives its Result the worker's previous trial's metrics
    (its id and configuration). The trials table must not take them."""

    def trainable(config):
        slowly_unwinding_trial(config)

    grid = search(tmp_path, "impatient", trainable)

    rows = rows_of(grid)
    failed = [r for r in rows if r["status"] == "error"]
    assert failed, "the reuse failure did not happen: the test no longer reproduces it"
    assert "reset_config" in failed[0]["error"]
    # Tune's own Result is relabelled: the failed trial carries another trial's id.
    assert any(
        r.error is not None and r.metrics.get("trial_id") not in (None, Path(r.path).name)
        and r.metrics.get("trial_id") != trial_identities(grid)[Path(r.path).name].trial_id
        for r in grid
    )  # fmt: skip
    # The table does not: one row per trial, each under its own id and configuration.
    identities = trial_identities(grid)
    assert sorted(r["trial_id"] for r in rows) == sorted(i.trial_id for i in identities.values())
    reports = own_reports(grid)
    for row in failed:
        assert row["trial_id"] not in reports  # it never ran: no figures of its own
        assert row["epochs"] == 0 and row["trained_organ"] is None
        x = json.loads(row["config"])["x"]
        assert all(e["config"]["x"] != x for runs in reports.values() for e in runs)
    for row in rows:
        if row["status"] != "error":
            (config,) = {json.dumps(e["config"], sort_keys=True) for e in reports[row["trial_id"]]}
            assert row["config"] == config


def test_equal_best_values_go_to_the_trial_created_first():
    """Balanced accuracy on a small validation split ties often: the choice is the first
    trial's, whichever order Tune's results come back in; an errored trial never wins."""
    import pandas as pd

    class Result:
        def __init__(self, name, values, error=None):
            self.path = f"/exp/organ/{name}"
            self.metrics_dataframe = pd.DataFrame({"val_acc": values})
            self.error = error

    first = Result("run_trial_a1b2c_00000_0_x=1", [0.5, 0.75])
    second = Result("run_trial_a1b2c_00001_1_x=2", [0.75, 0.5])
    failed = Result("run_trial_a1b2c_00002_2_x=3", [0.9], error=RuntimeError("lost"))
    for grid in ([first, second, failed], [failed, second, first]):
        assert choose_trial(grid, "val_acc", "max") is first
    worse = Result("run_trial_a1b2c_00003_3_x=4", [0.25])
    assert choose_trial([second, worse], "val_acc", "min") is worse
    assert choose_trial([failed], "val_acc", "max") is None
