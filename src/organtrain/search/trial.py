"""One Ray Tune trial: train one organ's model with one point of the search space.

The trial reads only the train and validation splits. Every epoch it reports its Keras
metrics to Tune together with a checkpoint (the model with its optimizer state, and the
TrainingState), so ASHA can stop it, PBT can clone it, and a trial restarted after a
failure, a killed driver or a preempted node continues from its last epoch.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import keras

from organtrain.checkpoint import TrainingState
from organtrain.data.dataset import load_dataset
from organtrain.data.pipeline import InputPlan
from organtrain.search.capacity import node_slots
from organtrain.search.job import MODEL_FILE, STATE_FILE, SweepJob, trial_prefix
from organtrain.search.space import trial_config
from organtrain.stain import training_reference
from organtrain.strategy import make_strategy
from organtrain.tensorboard import EpochLog, trial_log_prefix
from organtrain.train import compiled_model, fit, training_data, trial_settings


def run_trial(config: dict, job: SweepJob, organ: str) -> None:
    """One trial, run by the organ's Tune trainable (`organ.organ_trainable`) in its worker."""
    from ray import tune

    cfg = trial_config(job.cfg, config, source=f"trial of {organ}")
    _limit_threads(job.cfg.resources.cpus_per_trial)
    keras.backend.clear_session()  # this worker may have run another trial before
    storage = job.storage()
    index = load_dataset(storage, cfg.prepare.dataset, job.dataset_version)
    classes = index.diagnoses(organ)
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = make_strategy(cfg.train.cpu_replicas, job.expected_replicas)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.input.batch_size * replicas
    has_val = bool(index.shards_for(organ, "val"))

    checkpoint = tune.get_checkpoint()
    with strategy.scope():
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = TrainingState(**json.loads(Path(folder, STATE_FILE).read_text()))
                model = keras.models.load_model(Path(folder, MODEL_FILE))
            # Population based training may hand this trial a new learning rate.
            model.optimizer.learning_rate.assign(cfg.train.learning_rate)
        else:
            monitor = "val_loss" if has_val else "loss"
            state = TrainingState(index.version, monitor=monitor, settings=trial_settings(cfg))
            reference = training_reference(cfg, storage, index, organ)  # None: not used
            model = compiled_model(cfg, len(classes), reference)
    if state.epoch >= cfg.train.epochs or state.stopped_early:
        return  # finished before the restart; its results are already reported
    state.started = state.started or time.time()
    state.starts.append(state.epoch)  # a resumed trial shows where it picked up
    # The epochs still to run; epoch k's batches and dropout depend only on (seed, k).
    sharing = trials_per_node(job.cfg.resources.cpus_per_trial, job.cfg.resources.gpus_per_trial)
    with training_data(cfg, storage, index, organ, global_batch, state.epoch,
                       trials_per_node=sharing) as (train_ds, val_ds, plan):  # fmt: skip
        logs = trial_log_prefix(trial_prefix(job.run_id, organ), tune.get_context().get_trial_id())
        callbacks = [
            # Before the report: Tune may end this thread inside the report of the last
            # epoch (ASHA's max_t, a stopped trial), and nothing after it would run.
            EpochLog(storage, logs, state.history),
            ReportToTune(state, cfg.train.early_stopping_patience, replicas, organ, plan),
        ]
        fit(model, cfg, index, organ, global_batch, train_ds, val_ds, state.epoch, callbacks,
            verbose=0)  # fmt: skip


def trials_per_node(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials this node holds side by side, so they divide its memory budget
    (input.memory_budget_mb): its CPUs / resources.cpus_per_trial, GPUs likewise."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
    return max(1, node_slots(resources, cpus_per_trial, gpus_per_trial))


class ReportToTune(keras.callbacks.Callback):
    """Each epoch: metrics and a checkpoint to Tune; patience-based early stopping."""

    def __init__(
        self, state: TrainingState, patience: int, replicas: int, organ: str, plan: InputPlan
    ):
        super().__init__()
        self.state, self.patience, self.replicas, self.organ = state, patience, replicas, organ
        self.plan = plan

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        import ray
        from ray import tune

        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.state.end_epoch(epoch, logs, f"epoch-{epoch + 1:04d}", self.patience)
        self.model.stop_training = self.state.stopped_early
        metrics = {
            **{k: v if math.isfinite(v) else float("nan") for k, v in logs.items()},
            "epoch": self.state.epoch,
            "replicas": self.replicas,  # num_replicas_in_sync, checked against the request
            "stopped_early": self.state.stopped_early,
            "trial_started": self.state.started,
            "trained_organ": self.organ,  # whose images this trial trained on
            # Which Ray node ran this epoch (Tune adds its IP, node_ip): a trial resumed
            # elsewhere after a lost node shows both, and a misbehaving node is found.
            "node_id": ray.get_runtime_context().get_node_id(),
            # Where its images were cached and how much the budget let it shuffle.
            "input_cache": self.plan.cache,
            "input_shuffle_buffer": self.plan.shuffle_buffer,
            "input_budget_mb": round(self.plan.budget_bytes / 2**20, 1),
        }
        with tempfile.TemporaryDirectory() as folder:
            self.model.save(Path(folder, MODEL_FILE))
            Path(folder, STATE_FILE).write_text(self.state.to_json().decode())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _limit_threads(cpus: float) -> None:
    """Keep TensorFlow to the CPUs Ray gave this trial: by default it sizes its thread
    pools to the whole machine, and trials sharing a node would oversubscribe it."""
    import tensorflow as tf

    threads = max(1, int(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already started in this worker: it keeps its pools
