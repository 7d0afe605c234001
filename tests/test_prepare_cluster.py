"""`organtrain prepare --address`: checking images and writing shards as Ray tasks on a
cluster of several nodes gives the version a prepare on one machine gives.

The cluster is test_multinode's (its fixtures, imported): a head with no CPUs and two
1-CPU worker nodes, each a `ray start` of its own on this machine, and a real SeaweedFS.
One tree of a few dozen 32-px images, with one truncated file, is prepared twice: on this
machine into a folder, and on the cluster into S3. The tests compare the two versions and
look at where the cluster's tasks ran; one more asks nodes to open folders they lack.
The drivers on the cluster are processes of their own (Ray reads its token settings when
it starts).
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_multinode import BUCKET, _clean_env, cluster, s3_server, s3_vars  # noqa: F401

from organtrain.cli import main
from organtrain.data.dataset import load_dataset, read_manifest
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import LocalStorage, Storage, open_storage

pytestmark = pytest.mark.slow  # a 3-node Ray cluster: about a minute

ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}
DATASET = "clustered"
SETTINGS = {"dataset": DATASET, "test_fraction": 0.25, "val_fraction": 0.25,
            "min_images_per_diagnosis": 5, "max_image_side": 32, "images_per_shard": 4}  # fmt: skip
BROKEN = "lung/benign/broken.png"


@dataclass
class Prepared:
    here: Storage  # prepared on this machine
    there: Storage  # prepared on the cluster
    cluster_run: subprocess.CompletedProcess  # `organtrain prepare --address`


def _prepare_command(source: Path, dest: str) -> list[str]:
    overrides = [arg for k, v in SETTINGS.items() for arg in ("--set", f"prepare.{k}={v}")]
    return ["prepare", str(source), "--dest", dest, "--no-progress", *overrides]


def _driver_env(cluster, s3_vars) -> dict:  # noqa: F811 (fixtures)
    """A driver's environment: Ray reads its token settings when it starts, so the driver
    is a process of its own (as in test_multinode), not this one."""
    return _clean_env() | s3_vars | cluster.auth()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cluster, s3_vars) -> Prepared:  # noqa: F811 (fixtures)
    root = tmp_path_factory.mktemp("prepare-cluster")
    source = root / "src"
    write_synthetic_tree(source, organs=ORGANS, images_per_diagnosis=14, image_size=32,
                         progress=False)  # fmt: skip
    good = next((source / "lung" / "benign").glob("*.png")).read_bytes()
    (source / BROKEN).write_bytes(good[: len(good) // 2])  # a cut-off file: rejected
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)  # on this machine: threads
        assert main(_prepare_command(source, str(root / "here"))) == 0
    there = f"s3://{BUCKET}/prepare-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "organtrain", *_prepare_command(source, there),
               "--address", cluster.address]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=_driver_env(cluster, s3_vars))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return Prepared(LocalStorage(root / "here"), open_storage(there), done)


def _version(storage: Storage):
    index = load_dataset(storage, DATASET)
    prefix = f"datasets/{DATASET}/{index.version}"
    rejected = read_parquet(storage.get_bytes(f"{prefix}/rejected.parquet")).to_pylist()
    return index, read_manifest(storage, index).to_pylist(), rejected


def test_the_cluster_prepares_the_version_one_machine_prepares(prepared):
    here, manifest_here, rejected_here = _version(prepared.here)
    there, manifest_there, rejected_there = _version(prepared.there)
    assert there.version == here.version
    assert sorted(here.organs) == sorted(ORGANS)
    assert manifest_there == manifest_here  # every row, signatures and shard keys included
    assert [(s.key, s.sha256, s.bytes, s.images) for s in there.shards] == [
        (s.key, s.sha256, s.bytes, s.images) for s in here.shards
    ]
    assert len(here.shards) > 8  # enough shard tasks to spread
    # The truncated file is rejected on a node for the reason this machine gives.
    assert rejected_there == rejected_here
    assert [(r["key"], r["reason"]) for r in rejected_there] == [(BROKEN, "truncated")]


def test_the_tasks_ran_on_both_worker_nodes(prepared):
    out = prepared.cluster_run.stdout
    # The head has no CPU, so two nodes are the two workers.
    assert re.search(r"\d+ Ray task\(s\) on 2 node\(s\)", out), out
    assert f"version {load_dataset(prepared.here, DATASET).version} (written)" in out


# Run on the cluster by a driver of its own: a task asked to open a folder its node lacks,
# and a destination folder its node has but that is not the one the driver writes to.
FOLDER_CHECKS = """
import sys, ray
from organtrain.config import PrepareConfig
from organtrain.data import work
from organtrain.data.executors import RayTasks, Reachable
from organtrain.data.scan import Candidate
from organtrain.errors import DataError
from organtrain.storage import LocalStorage

ray.init(address=sys.argv[1], log_to_driver=False)
source = Reachable(LocalStorage(sys.argv[2]), "source")
dest = Reachable(LocalStorage(sys.argv[3]), "destination", holds="prepare.lock")
candidate = Candidate("lung/benign/0.png", "lung", "benign", 100)
for fn, shared, batch in [(work.check_batch, (source, PrepareConfig()), [candidate]),
                          (work.write_one_shard, (dest,), None)]:
    try:
        RayTasks().run(fn, shared, [batch], lambda i, result: print("ran", result))
    except DataError as err:
        print("DataError:", err)
"""


def test_a_node_without_the_folder_fails_naming_it(cluster, s3_vars, tmp_path):  # noqa: F811
    missing, elsewhere = tmp_path / "only-on-the-driver", tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-c", FOLDER_CHECKS, cluster.address, str(missing), str(elsewhere)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env=_driver_env(cluster, s3_vars))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("DataError: ") for line in lines), lines
    said = rf"the source folder {re.escape(str(missing))} does not exist on Ray node \S+ \(\w+\)"
    assert re.search(said + ": with --address.*a shared folder mounted at the same path", lines[0])
    assert f"the destination folder {elsewhere} on Ray node" in lines[1]
    assert "is not the one this prepare writes to" in lines[1]
