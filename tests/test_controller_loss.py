"""An organ's search controller lost mid-sweep (issue 15): its trial's placement group
must not outlive it.

Ray ends a placement group once both the actor and the job that created it are dead. A
lost controller (`ray::OrganSearch`, SIGKILLed here as an OOM kill or a lost node would)
leaves the groups of its trials reserved while the sweep's driver (their job) lives. On
a 1-CPU cluster with one organ, the controller started again then waits for ever: its
trial needs the CPU the dead controller's group holds. The driver removes them before
the retry; this test shows the retry finishing, and watches Ray's placement group table
from a second driver: each group of the dead controller is removed while the sweep runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from seaweedfs import free_ports
from test_multinode import RayNode
from test_sweep import JOB

from organtrain.cli import main
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import LocalStorage

pytestmark = pytest.mark.slow  # a Ray node and a sweep whose controller is killed: ~1 min

ORGAN, RUN = "lung", "lost-controller"
VENV_BIN = Path(sys.executable).parent
# The sweep takes about a minute on 2 busy cores; without the fix it never ends.
SWEEP_TIMEOUT_S = 240
# A second driver on the cluster writes Ray's placement group table (the GCS's, which
# names each group's creator and whether it is dead) as one JSON line every 0.3 s.
WATCH_GROUPS = """
import json, sys, time
import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2

ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
with open(sys.argv[2], "a") as out:
    while True:
        groups = []
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            g = gcs_pb2.PlacementGroupTableData.FromString(raw)
            groups.append({
                "id": g.placement_group_id.hex(), "creator": g.creator_actor_id.hex(),
                "creator_dead": g.creator_actor_dead, "job_dead": g.creator_job_dead,
                "state": gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(g.state),
            })
        out.write(json.dumps({"at": time.time(), "groups": groups}) + "\\n")
        out.flush()
        time.sleep(0.3)
"""


@pytest.fixture(scope="module")
def cluster():
    """One `ray start --head` node with one CPU, token authentication on (Ray's default)."""
    # A short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ot-cl-", dir="/tmp"))
    ports = iter(free_ports(9))
    address = f"127.0.0.1:{next(ports)}"
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={address.rsplit(':')[1]}",
        "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
        "--include-dashboard=false", f"--dashboard-port={next(ports)}",
        f"--ray-client-server-port={next(ports)}", f"--temp-dir={root / 'ray'}",
        f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
        f"--dashboard-agent-listen-port={next(ports)}",
        f"--dashboard-agent-grpc-port={next(ports)}",
        f"--runtime-env-agent-port={next(ports)}", f"--metrics-export-port={next(ports)}",
        "--object-store-memory=200000000", "--disable-usage-stats",
    ]  # fmt: skip
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth
    node = RayNode("head", command, env, root / "head.log")
    try:
        node.start()
        node.wait_started(time.monotonic() + 120)
        yield node, address, env, root
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """One organ, one trial of 16 short epochs (1 CPU): the kill lands mid-trial."""
    root = tmp_path_factory.mktemp("controller-loss")
    write_synthetic_tree(root / "src", organs={ORGAN: ["adenocarcinoma", "benign"]},
                         images_per_diagnosis=24, image_size=32, progress=False)  # fmt: skip
    spec = {
        **JOB, "name": RUN, "storage": {"uri": str(root / "store")},
        "prepare": {**JOB["prepare"], "source": str(root / "src")},
        "train": {**JOB["train"], "epochs": 16},
        "search": {"samples": 1, "scheduler": "fifo", "max_failures": 1},
        "resources": {"cpus_per_trial": 1},
    }  # fmt: skip
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    return path


class ControllerKiller(threading.Thread):
    """SIGKILLs the organ's search controller (its `ray::OrganSearch` process, on this
    test's node only) as soon as its trial has written a checkpoint: the trial holds its
    placement group, and has epochs left to run."""

    def __init__(self, node: RayNode, tune_folder: Path):
        super().__init__(daemon=True)
        self.node, self.tune_folder = node, tune_folder
        self.done = threading.Event()
        self.killed: int | None = None

    def run(self) -> None:
        while not self.done.wait(0.2) and self.killed is None:
            if any(self.tune_folder.glob("*/checkpoint_*")):
                self.killed = self._kill_controller()

    def _kill_controller(self) -> int | None:
        for pid in self.node.processes():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::OrganSearch"):
                    os.kill(pid, signal.SIGKILL)
                    return pid
        return None


def test_a_lost_controllers_placement_group_is_removed_and_the_retry_finishes(cluster, job):
    node, address, env, root = cluster
    store = LocalStorage(yaml.safe_load(job.read_text())["storage"]["uri"])
    table = root / "groups.jsonl"
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCH_GROUPS, address, str(table)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    killer = ControllerKiller(node, Path(store.root) / "runs" / RUN / "tune" / ORGAN)
    killer.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "organtrain", "sweep", "--config", str(job),
             "--address", address, "--no-progress"],
            capture_output=True, text=True, env=env, timeout=SWEEP_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"the sweep did not finish in {SWEEP_TIMEOUT_S} s (controller {killer.killed} "
            "killed): does its retry wait for the CPU the lost controller's placement group "
            f"holds?\n{(err.stderr or b'')[-3000:]!r}"
        )
    finally:
        killer.done.set()
        killer.join()
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(timeout=30)
    assert killer.killed, "no checkpoint and controller seen together: nothing was killed"
    assert done.returncode == 0, done.stderr[-4000:]
    assert "its search's controller was lost" in done.stderr, done.stderr[-4000:]
    summary = read_parquet(store.get_bytes(f"runs/{RUN}/summary.parquet")).to_pylist()
    assert [(r["organ"], r["state"]) for r in summary] == [(ORGAN, "done")]

    # The dead controller's groups: created by an actor that died while the sweep's driver
    # (their job) lived. Each was seen reserved after its creator died, then removed while
    # the driver still lived: by the driver, not by the sweep's end.
    snapshots = [json.loads(line) for line in table.read_text().splitlines()]
    orphaned = {g["id"] for s in snapshots for g in s["groups"]
                if g["creator_dead"] and not g["job_dead"] and g["state"] != "REMOVED"}  # fmt: skip
    assert orphaned, "no placement group of the killed controller was seen"
    removed_in_run = {g["id"] for s in snapshots for g in s["groups"]
                      if g["state"] == "REMOVED" and not g["job_dead"]}  # fmt: skip
    assert orphaned <= removed_in_run, (orphaned - removed_in_run, snapshots[-1])
    assert f"removed {len(orphaned)} placement group(s) of its lost controller" in done.stderr
