"""One organ's search: a Ray Tune experiment, then the chosen model's one test evaluation.

`search_organ` runs in a Ray actor (`OrganSearch`: no CPUs of its own, it only
drives Tune), one per organ, so the organs' searches run side by side and share the
cluster. Tune's experiment state and checkpoints live in the run's storage,
`runs/<run_id>/tune/<organ>/`: when the search starts and finds them, it restores the
experiment — finished trials stay finished, running ones continue from their last epoch —
instead of starting again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import ray
from ray import tune

from organtrain.data.dataset import load_dataset
from organtrain.data.manifest import parquet_bytes
from organtrain.errors import OrgantrainError
from organtrain.search import results
from organtrain.search.job import MODEL_FILE, STATE_FILE, SweepJob, progress_key, trial_prefix
from organtrain.search.space import organ_space, pbt_mutations, sampling_seed, trial_config
from organtrain.storage import join_key


class OrganFailed(OrgantrainError):
    """No trial of an organ finished with a usable metric: nothing to evaluate. `counts`
    (trials, trials_stopped_early, trials_errored) go into the organ's summary row."""

    def __init__(self, message: str, counts: dict | None = None):
        super().__init__(message)
        self.counts = counts or {}


def tune_experiment(job: SweepJob, organ: str):
    """(path, filesystem) of the organ's Tune experiment in the run's storage."""
    path, fs = job.storage().tune_location(join_key("runs", job.run_id, "tune"))
    return f"{path}/{organ}", fs


class OrganSearch:
    """The Ray actor that drives one organ's search (`search_organ`).

    An actor, so that the driver sees a lost controller (its process or node gone) as
    such, says so, and starts a new one that restores the organ's search. The lost
    controller's trial placement groups would outlive it (Ray ends a group when both its
    creating actor and job are dead, and the job is the sweep's driver): the driver
    removes them before the new controller starts (remove_placement_groups_created_by)."""

    def search(self, job: SweepJob, organ: str) -> dict:
        return search_organ(job, organ)


def remove_placement_groups_created_by(actor_id: str) -> list[str]:
    """Run as a task on the cluster (there it also works for a driver connected through
    Ray Client): remove every placement group that actor `actor_id` (hex) created and
    that is not removed yet; returns their ids (hex). Ray's public placement_group_table()
    does not say who created a group; the GCS's own table does."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if group.creator_actor_id.hex() != actor_id:
            continue
        if group.state == gcs_pb2.PlacementGroupTableData.REMOVED:
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
        removed.append(group.placement_group_id.hex())
    return removed


def search_organ(job: SweepJob, organ: str) -> dict:
    """Search, choose, evaluate. Returns the organ's summary row."""
    # Tune saves its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S seconds;
    # a driver killed between saves would redo the epochs since. The state is small.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "2"
    _keep_credentials_out_of_trial_runtime_env()
    cfg, search = job.cfg, job.cfg.search
    # The organ's wall time starts here; evaluate_trial, maybe on another node, ends it
    # (time.time(): the clock both can read).
    started_at = time.time()
    trainable = tune.with_resources(
        organ_trainable(job, organ),
        {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial},
    )
    experiment, fs = tune_experiment(job, organ)
    space = organ_space(cfg, organ)
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=fs,
        )  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: dim.to_tune() for key, dim in space.items()},
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                num_samples=search.samples,
                scheduler=_scheduler(job, space),
                # The organ's share of the cluster is the generator's max_concurrent:
                # Tune ignores TuneConfig.max_concurrent_trials when search_alg is a
                # SearchGenerator ("will be ignored" in the controller's log), and every
                # organ then queued all its trials at once.
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=sampling_seed(search.seed, organ),
                    max_concurrent=search.max_concurrent_trials or 0,
                ),
                # A trial's worker process starts Python, Ray and TensorFlow (seconds on a
                # small machine); the organ's next trial reuses it (bench/RESULTS.md).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=organ,
                storage_path=experiment.rsplit("/", 1)[0],
                storage_filesystem=fs,
                # Every checkpoint is kept while the search runs: Tune's experiment state
                # (saved every few seconds) names a trial's latest checkpoint, and one
                # deleted in between (num_to_keep) would make a restored trial start over.
                # prune_checkpoints keeps each trial's best and latest once it is done.
                checkpoint_config=tune.CheckpointConfig(
                    checkpoint_score_attribute=search.metric,
                    checkpoint_score_order=search.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                # Each trial's own output (log_to_file) in its folder of the run's storage;
                # TensorBoard logs are published by the trial itself (tensorboard.py).
                sync_config=tune.SyncConfig(sync_artifacts=True),
                callbacks=[ProgressCallback(job, organ)],
                log_to_file=True,  # each trial's output in its folder, not on the terminal
                verbose=0,
            ),
        )
    fit_started = time.monotonic()
    grid = tuner.fit()
    fit_seconds = time.monotonic() - fit_started
    prune_checkpoints(grid, search.metric, search.mode)

    identities = trial_identities(grid)
    rows = results.trial_rows(
        grid, identities, run_id=job.run_id, organ=organ, metric=search.metric,
        mode=search.mode, epochs=cfg.train.epochs,
    )  # fmt: skip
    out = job.storage().sub(trial_prefix(job.run_id, organ))
    out.put_bytes("metrics/trials.parquet", parquet_bytes(results.trials_table(rows)))
    best = choose_trial(grid, search.metric, search.mode)
    kinds = {key: dim.kind for key, dim in space.items()}
    out.put_bytes(
        "plots/sweep.png",
        results.sweep_png(
            rows, organ=organ, metric=search.metric, space_kinds=kinds,
            chosen=identities[Path(best.path).name].trial_id if best is not None else None,
        ),
    )  # fmt: skip
    counts = {
        "trials": len(rows),
        "trials_stopped_early": sum(r["stop_reason"] in ("patience", "scheduler") for r in rows),
        "trials_errored": sum(r["status"] == "error" for r in rows),
    }
    if best is None:
        raise OrganFailed(failure_message(organ, rows, search.metric, experiment), counts)
    identity = identities[Path(best.path).name]
    chosen = {
        "trial_id": identity.trial_id,
        "trial_config": identity.config,
        "metric": search.metric,
        "value": _best_value(best, search.metric, search.mode),
        "search_seconds": fit_seconds,  # Tune's fit, this invocation (bench/sweep.py)
        **counts,
    }
    evaluate = ray.remote(evaluate_trial).options(
        num_cpus=cfg.resources.cpus_per_trial, num_gpus=cfg.resources.gpus_per_trial
    )
    result = ray.get(
        evaluate.remote(
            job, organ, identity.config, best.get_best_checkpoint(search.metric, search.mode),
            best.checkpoint, int(best.metrics.get("replicas", 1)), chosen,
            organ_started_at=started_at,
        )
    )  # fmt: skip
    return summary_row(job, organ, result)


# The variables Ray Tune would copy into each trial's runtime_env.
_CREDENTIAL_VARS = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
}  # fmt: skip


def _keep_credentials_out_of_trial_runtime_env() -> None:
    """Ray Tune copies the AWS credential variables of the process that drives it (this
    task) into every trial actor's runtime_env (ray.tune.execution.class_cache), and
    Ray's runtime_env agent writes each runtime_env into its log, readable by anyone on
    the node. Trials need no such copy: a Ray started by organtrain passes its
    environment on to them, and on a cluster each node has its own identity. (The
    credentials test fails if a Ray upgrade brings the copy back another way.)"""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update(_CREDENTIAL_VARS)


def organ_trainable(job: SweepJob, organ: str):
    """The trainable of one organ's trials, named after the organ. Tune registers
    trainables cluster-wide by name: organs searched at once under one name (as
    tune.with_parameters would give them) would overwrite each other's parameters."""

    def trainable(config: dict) -> None:
        # Imported here, in the trial's worker: the organ's search process, which pickles
        # this function, never loads TensorFlow (organtrain.search.job).
        from organtrain.search.trial import run_trial

        run_trial(config, job, organ)

    trainable.__name__ = trainable.__qualname__ = f"train_{organ}"
    trainable.__mixins__ = (WaitForPreviousTrial,)
    return trainable


# Seconds a reused worker waits for its previous trial's training thread to end.
REUSE_WAIT_S = 300


class WaitForPreviousTrial:
    """Mixed into the organ's trainable (Tune's `__mixins__` hook), so that the organ's
    next trial can reuse a worker whose previous trial Tune has just stopped.

    Tune stops a function trial by releasing its training thread into a SystemExit, then
    waits TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s unless set) for the thread to end before
    handing the worker to the next trial; if it has not ended, that next trial fails with
    "Trainable runner reuse requires reset_config()". Unwinding model.fit (cancelling the
    input pipeline's reader threads, freeing the model) took 2.2 and 8.1 s on 2 busy
    cores, so on a loaded node trials failed at random. The wait stays bounded: a thread
    that never ends still fails the trial, with Tune's error.
    """

    def reset_config(self, new_config):
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_WAIT_S))
        return super().reset_config(new_config)


def trial_identities(grid) -> dict[str, results.TrialIdentity]:
    """Each trial's id and configuration as Tune's saved experiment state records them, by
    trial folder name. A Result's metrics (and the config Tune derives from them) are not
    enough: when a trial fails to start on a reused worker, Tune hands it the worker's
    previous result, i.e. another trial's id and configuration."""
    analysis = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return {
        Path(t.path).name: results.TrialIdentity(t.trial_id, dict(t.config))
        for t in analysis.trials
    }


def prune_checkpoints(grid, metric: str, mode: str) -> None:
    """Delete every trial checkpoint but its best (by the search metric) and its latest:
    the search is over, so nothing will resume from the others."""
    for result in grid:
        if not result.best_checkpoints:
            continue
        keep = {result.checkpoint.path}
        with contextlib.suppress(RuntimeError):  # no checkpoint with the metric
            keep.add(result.get_best_checkpoint(metric, mode).path)
        for checkpoint, _ in result.best_checkpoints:
            if checkpoint.path not in keep:
                with contextlib.suppress(FileNotFoundError, OSError):
                    checkpoint.filesystem.delete_dir(checkpoint.path)


def choose_trial(grid, metric: str, mode: str):
    """The finished trial with the best value of `metric` over its epochs, or None.

    A trial that errored (an exception, a killed or lost worker) is never chosen, however
    good its last reported epoch: it stopped half-trained, and its checkpoint may be one
    the failure interrupted.

    Equal values (common for accuracy-like metrics on small validation sets) go to the
    trial created first, by its folder name, so the choice never depends on which trial
    happened to finish first."""
    finished = [r for r in grid if r.error is None and math.isfinite(_best_value(r, metric, mode))]
    if not finished:
        return None
    pick = min if mode == "min" else max
    finished.sort(key=lambda r: Path(r.path).name)
    return pick(finished, key=lambda r: _best_value(r, metric, mode))


def failure_message(organ: str, rows: list[dict], metric: str, experiment: str) -> str:
    """Why an organ has no trial to evaluate: its trials' errors, each once, counted."""
    errored = [r for r in rows if r["status"] == "error"]
    errors: dict[str, int] = {}
    for row in errored:
        text = (row["error"] or "unknown error")[:300]
        errors[text] = errors.get(text, 0) + 1
    reasons = "; ".join(f"{n}x {text}" if n > 1 else text for text, n in errors.items())
    what = f"{len(errored)} of {len(rows)} trial(s) failed" + (f" ({reasons})" if reasons else "")
    unscored = len(rows) - len(errored)
    if unscored:
        what += f"; {unscored} finished without a finite {metric}"
    return f"{organ}: no trial finished: {what}. Each trial's log: {experiment}/<trial>/"


def _best_value(result, metric: str, mode: str) -> float:
    frame = result.metrics_dataframe
    if frame is None or metric not in frame:
        return math.nan
    values = frame[metric].replace([math.inf, -math.inf], math.nan).dropna()
    if values.empty:
        return math.nan
    return float(values.min() if mode == "min" else values.max())


def _scheduler(job: SweepJob, space: dict):
    search, epochs = job.cfg.search, job.cfg.train.epochs
    max_epochs = max([epochs, *[int(v) for v in _epoch_values(space)]])
    if search.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",  # one report per epoch
            max_t=max_epochs,
            grace_period=min(search.grace_period, max_epochs),
            reduction_factor=search.reduction_factor,
        )
    if search.scheduler == "pbt":  # config.check_space made sure there is a mutation
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=search.perturbation_interval,
            hyperparam_mutations=pbt_mutations(space),
        )
    return tune.schedulers.FIFOScheduler()


def _epoch_values(space: dict):
    dim = space.get("train.epochs")
    return dim.extremes() if dim is not None else ()


def evaluate_trial(
    job: SweepJob,
    organ: str,
    values: dict,
    best_checkpoint,
    latest_checkpoint,
    replicas: int,
    chosen: dict,
    organ_started_at: float | None = None,
) -> dict:
    """The chosen model's one look at the test split; publishes the organ's results.

    result.json's `seconds` is the organ's wall time in this invocation, from the start of
    its search (`organ_started_at`, time.time()) to its published result: the number the
    summary and the console show too. Its `search` part says where the time went:
    `search_seconds` (Tune's fit) and `seconds_before_evaluation` (so the evaluation took
    seconds - seconds_before_evaluation)."""
    # Counted from the organ's start: finish() measures `seconds` from `started`.
    before = 0.0 if organ_started_at is None else max(0.0, time.time() - organ_started_at)
    started = time.monotonic() - before
    chosen = {**chosen, "seconds_before_evaluation": before}
    import keras

    from organtrain.checkpoint import TrainingState
    from organtrain.train import finish

    cfg = trial_config(job.cfg, values, source=f"chosen trial of {organ}")
    storage = job.storage()
    index = load_dataset(storage, cfg.prepare.dataset, job.dataset_version)
    with best_checkpoint.as_directory() as folder:
        model = keras.models.load_model(Path(folder, MODEL_FILE))
        best_state = TrainingState(**json.loads(Path(folder, STATE_FILE).read_text()))
    with latest_checkpoint.as_directory() as folder:
        state = TrainingState(**json.loads(Path(folder, STATE_FILE).read_text()))
    state.best_epoch = best_state.epoch  # the epoch evaluated: best by the search metric
    result = finish(
        cfg, storage, trial_prefix(job.run_id, organ), job.run_id, organ, index,
        index.diagnoses(organ), model, state, replicas, cfg.input.batch_size * replicas,
        started, search=chosen,
    )  # fmt: skip
    return dataclasses.asdict(result)


def summary_row(job: SweepJob, organ: str, result: dict) -> dict:
    """The organ's row of summary.parquet, from its result.json: the same numbers
    (`seconds` too) whether the organ finished in this invocation or an earlier one."""
    search = result["search"]
    metrics = _test_metrics(job, organ)
    return {
        "run_id": job.run_id,
        "organ": organ,
        "state": "done",
        "model": result["model"],
        "trial_id": search["trial_id"],
        "trial_config": json.dumps(search["trial_config"], sort_keys=True),
        "metric": search["metric"],
        "val_value": search["value"],
        "test_accuracy": result["test_accuracy"],
        "test_macro_f1": result["test_macro_f1"],
        "test_macro_roc_auc": metrics.get("macro_roc_auc", math.nan),
        "test_images": result["test_images"],
        "trials": search["trials"],
        "trials_stopped_early": search["trials_stopped_early"],
        "trials_errored": search["trials_errored"],
        "seconds": result["seconds"],
        "error": None,
    }


def _test_metrics(job: SweepJob, organ: str) -> dict:
    from organtrain.data.manifest import read_parquet

    key = join_key(trial_prefix(job.run_id, organ), "metrics/metrics.parquet")
    rows = read_parquet(job.storage().get_bytes(key)).to_pylist()
    return {r["metric"]: r["value"] for r in rows if r["class_name"] is None}


class ProgressCallback(tune.Callback):
    """Publishes the organ's trial counts and best value so far, every few seconds, to
    `runs/<run_id>/progress/<organ>.json`: the sweep driver and `organtrain status`
    read it, wherever on the cluster this search runs."""

    def __init__(self, job: SweepJob, organ: str):
        self.job, self.organ = job, organ
        self.best: float | None = None
        self.best_trial: str | None = None
        self.last_write = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.job.cfg.search.metric)
        if value is None or not math.isfinite(value):
            return
        better = min if self.job.cfg.search.mode == "min" else max
        if self.best is None or better(value, self.best) != self.best:
            self.best, self.best_trial = float(value), trial.trial_id

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_write >= 2.0:
            self.publish(trials)

    def on_experiment_end(self, trials, **info):
        self.publish(trials)

    def publish(self, trials):
        self.last_write = time.monotonic()
        counts = {"pending": 0, "running": 0, "terminated": 0, "error": 0}
        stopped = 0
        for t in trials:
            status = t.status.lower()
            counts[status if status in counts else "pending"] += 1
            epochs = int(t.config.get("train.epochs", self.job.cfg.train.epochs))
            last = t.last_result or {}
            if t.status == "TERMINATED" and int(last.get("epoch", epochs)) < epochs:
                stopped += 1
        progress = {
            "organ": self.organ,
            "updated": time.time(),
            "trials": {"total": len(trials), **counts},
            "stopped_early": stopped,
            "best": self.best,
            "best_trial": self.best_trial,
        }
        key = progress_key(self.job.run_id, self.organ)
        # Progress is for people: a storage hiccup must not stop the search.
        with contextlib.suppress(OrgantrainError):
            self.job.storage().put_bytes(key, json.dumps(progress).encode())

    def get_state(self):
        return {"best": self.best, "best_trial": self.best_trial}

    def set_state(self, state):
        self.best, self.best_trial = state.get("best"), state.get("best_trial")
