"""What every task of a sweep shares, importable without TensorFlow.

An organ's search task (a Tune controller, one per organ) imports this and
`organtrain.search.organ`, never Keras: TensorFlow alone costs ~0.5 GiB and ~5 s per
process (bench/RESULTS.md, "Organs at once"). Only trial and evaluation workers load it.
"""

from __future__ import annotations

from dataclasses import dataclass

from organtrain.config import RunConfig
from organtrain.storage import Storage, join_key, open_storage

# A trial's checkpoint folder holds these two files.
MODEL_FILE = "model.keras"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class SweepJob:
    """What every task of a sweep needs; put in Ray's object store once."""

    cfg: RunConfig  # the job's configuration, storage.uri made absolute
    run_id: str
    dataset_version: str  # pinned when the sweep started: a resumed sweep uses the same
    expected_replicas: int  # what each trial's MirroredStrategy must span

    def storage(self) -> Storage:
        s = self.cfg.storage
        return open_storage(s.uri, endpoint_url=s.endpoint_url, region=s.region)


def trial_prefix(run_id: str, organ: str) -> str:
    """Where one organ's results of a run live: runs/<run_id>/<organ>/."""
    return join_key("runs", run_id, organ)


def progress_key(run_id: str, organ: str) -> str:
    """Where an organ's search publishes its progress (organ.ProgressCallback) for the
    driver and `organtrain status`."""
    return join_key("runs", run_id, "progress", f"{organ}.json")


def expected_replicas(cfg: RunConfig) -> int:
    """GPUs per trial when trials get GPUs (a fraction shares one), else cpu_replicas."""
    gpus = cfg.resources.gpus_per_trial
    return max(1, int(gpus)) if gpus > 0 else cfg.train.cpu_replicas
