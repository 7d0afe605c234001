"""`organtrain sweep` on a Ray cluster that grows: Ray's fake multi-node autoscaler.

The cloud configs (cluster/*.yaml, the KubeRay RayCluster) start with a head that offers
no CPUs and zero workers; the autoscaler adds workers when trials wait for room. Here the
same thing runs on one machine: `ray start --head --autoscaling-config=...` with Ray's
`fake_multinode` provider, whose "nodes" are extra raylets on this machine. It is what
`ray.cluster_utils.AutoscalingCluster` does, done by hand for two reasons: Ray 2.60's wheel
lacks the `fake_multi_node/example.yaml` that class reads (FileNotFoundError in its
constructor), and its start() and shutdown() run `ray stop --force`, which would kill every
other Ray on the machine (other tests' included). This cluster has its own ports, temp
folder and token, and is stopped by its own process ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_sweep import JOB as SWEEP_JOB

from organtrain.cli import main
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.search.capacity import (
    Cluster,
    NodeType,
    describe_activity,
    never_fits,
    share_per_organ,
    slots_at_most,
)
from organtrain.storage import LocalStorage

WORKER_TYPE = "cpu1"
# One fake worker of 1 CPU at most: a lean cluster on a 2-core machine, and enough for
# a sweep of one organ. The object store is kept small (each node reserves it in /dev/shm).
WORKER_TYPES = {
    WORKER_TYPE: {
        "resources": {"CPU": 1, "object_store_memory": 200 * 2**20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    }
}
# The sweep tests' tiny job, one epoch of one trial with one replica.
JOB = {
    **SWEEP_JOB,
    "name": "grow",
    "train": {"epochs": 1, "early_stopping_patience": 0, "cpu_replicas": 1},
    "search": {"samples": 1},
    "resources": {"cpus_per_trial": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class FakeAutoscalingCluster:
    """A Ray head with no CPUs and an autoscaler that adds `worker_types` on demand."""

    def __init__(self, worker_types: dict, *, idle_timeout_minutes: float = 2.0):
        import ray._private.services

        self.root = Path(tempfile.mkdtemp(prefix="ot-as-", dir="/tmp"))  # short: socket paths
        self.port = _free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        self.token = secrets.token_hex(32)
        self.config = self.root / "autoscaling.json"
        self.config.write_text(json.dumps(self._config(worker_types, idle_timeout_minutes)))
        self.log = self.root / "head.log"
        self.head: subprocess.Popen | None = None

    def _config(self, worker_types: dict, idle_timeout_minutes: float) -> dict:
        head = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "fake", "max_workers": 8, "head_node_type": "ray.head.default",
            "available_node_types": {**worker_types, "ray.head.default": head},
            # gcs_address: the fake provider's workers join this head, not :6379.
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": self.address},
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }  # fmt: skip

    def env(self) -> dict:
        """What a driver of this cluster needs (token authentication stays on)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self) -> FakeAutoscalingCluster:
        bin_dir = Path(sys.executable).parent
        command = [
            str(bin_dir / "ray"), "start", "--head", "--block", f"--port={self.port}",
            "--num-cpus=0", "--num-gpus=0", f"--object-store-memory={200 * 2**20}",
            f"--autoscaling-config={self.config}", f"--temp-dir={self.root / 'ray'}",
            "--include-dashboard=false", f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}", "--disable-usage-stats",
        ]  # fmt: skip
        env = os.environ | self.env() | {
            "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to run without it
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }  # fmt: skip
        env.pop("RAY_ADDRESS")
        with self.log.open("w") as log:
            # --block keeps `ray start` running; its own session holds every process of
            # this cluster (the fake workers are started by its autoscaler), for stop().
            self.head = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake autoscaling head did not start:\n{self.tail()}")
            time.sleep(0.5)
        return self

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def processes(self) -> list[int]:
        """This cluster's live processes: in the head's session, or naming its GCS
        address. Zombies are left out: they are dead, only not yet reaped."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, UnicodeDecodeError, IndexError):
                continue
            state, session = fields[0], int(fields[3])
            if state != "Z" and (session == self.head.pid or self.address in cmdline):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """The head's `ray start --block` first (it stops its own processes in seconds),
        then whatever is left, the fake workers' raylets among them, by process id."""
        if self.head is not None:
            rounds = ((signal.SIGTERM, 20, True), (signal.SIGTERM, 10, False),
                      (signal.SIGKILL, 10, False))  # fmt: skip
            for sig, wait, head_only in rounds:
                for pid in [self.head.pid] if head_only else self.processes():
                    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                        os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and (
                    self.head.poll() is None if head_only else self.processes()
                ):
                    time.sleep(0.5)
                if not self.processes():
                    break
            self.head.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


# --- the fair share, in plain numbers -------------------------------------------------


def test_a_growable_clusters_share_follows_what_it_can_become():
    """A head with no CPUs and a worker type of 4 CPUs, up to 3 nodes: 2-CPU trials have
    no slot now, 6 once the cluster has grown; three organs get 2 each (the share sized
    from today's cluster gave 1 each, for ever)."""
    grows = Cluster(
        nodes=({"CPU": 0.0, "memory": 1e9},),
        node_types=(NodeType("cpu4", {"CPU": 4.0}, max_count=3),),
        growable=True,
        source="test",
    )
    assert slots_at_most(grows, cpus=2, gpus=0) == 6
    assert share_per_organ(slots_at_most(grows, cpus=2, gpus=0), organs=3) == 2
    # The autoscaler's limit on all its workers bounds the sum of the node types'.
    capped = Cluster(
        nodes=grows.nodes,
        node_types=(NodeType("cpu4", {"CPU": 4.0}, 3), NodeType("cpu8", {"CPU": 8.0}, 3)),
        max_workers=2,
        growable=True,
        source="test",
    )
    assert slots_at_most(capped, cpus=2, gpus=0) == 8  # two 8-CPU nodes, the larger type
    # GPUs count per node: a 1-GPU type holds one 1-GPU trial per node, whatever its CPUs.
    gpu = Cluster(
        nodes=grows.nodes,
        node_types=(NodeType("g5", {"CPU": 8.0, "GPU": 1.0}, max_count=8),),
        growable=True,
        source="test",
    )
    assert slots_at_most(gpu, cpus=4, gpus=1) == 8
    # A node type that holds no such trial adds nothing, even without a limit.
    cpu_too = Cluster(
        nodes=grows.nodes, node_types=(*gpu.node_types, NodeType("c5", {"CPU": 96.0}, None)),
        growable=True, source="test",
    )  # fmt: skip
    assert slots_at_most(cpu_too, cpus=4, gpus=1) == 8
    # No limit known (unlimited type, or sizes the launcher fills in at start): no cap;
    # the organs' pending trials drive the autoscaler.
    unlimited = Cluster(
        nodes=grows.nodes, node_types=(NodeType("cpu4", {"CPU": 4.0}, None),), growable=True,
        source="test",
    )  # fmt: skip
    unknown = Cluster(
        nodes=grows.nodes, node_types=(NodeType("g5", None, 8),), growable=True, source="test"
    )
    assert slots_at_most(unlimited, cpus=1, gpus=0) is None
    assert slots_at_most(unknown, cpus=1, gpus=0) is None
    assert share_per_organ(None, organs=3) is None


def test_the_wait_says_what_the_autoscaler_is_doing():
    """A progress line from the v1 autoscaler's summary (the shape `ray status` reads)."""
    report = {
        "pending_launches": {"gpu": 1},
        "pending_nodes": [["10.0.0.7", "gpu", "setting-up"]],
        "failed_nodes": [["10.0.0.9", "gpu"]],
        "node_availability_summary": {"node_availabilities": {"gpu": {
            "is_available": False, "unavailable_node_information": {
                "category": "InstanceLimitExceeded", "description": "quota of 0 g5 reached"}}}},
    }  # fmt: skip
    assert describe_activity(report) == (
        "; launching 2 gpu; failed to start 1 gpu; unavailable: gpu: quota of 0 g5 reached"
    )
    assert describe_activity({}) == ""


def test_a_fixed_cluster_keeps_its_share_and_refuses_what_no_node_holds():
    fixed = Cluster(nodes=({"CPU": 4.0}, {"CPU": 2.0}), node_types=(), growable=False, source="")
    assert slots_at_most(fixed, cpus=2, gpus=0) == 3
    assert share_per_organ(3, organs=2) == 2
    assert share_per_organ(0, organs=2) == 1
    assert not never_fits(fixed, cpus=4, gpus=0)
    # 6 CPUs in all, but a trial runs on one node: no node holds 5.
    assert never_fits(fixed, cpus=5, gpus=0)
    assert never_fits(fixed, cpus=1, gpus=1)
    # A cluster that can grow refuses only when every node type's size is known.
    grows = Cluster(
        nodes=({"CPU": 0.0},), node_types=(NodeType("cpu1", {"CPU": 1.0}, 2),), growable=True,
        source="test",
    )  # fmt: skip
    assert not never_fits(grows, cpus=1, gpus=0)
    assert never_fits(grows, cpus=2, gpus=0)
    unknown = Cluster(
        nodes=({"CPU": 0.0},), node_types=(NodeType("g5", None, 2),), growable=True, source="t"
    )
    assert not never_fits(unknown, cpus=64, gpus=8)


# --- node types from Ray's GCS --------------------------------------------------------

GCS_PROBE = """
import json, time, ray
from ray.core.generated.autoscaler_pb2 import ClusterConfig
from organtrain.search import capacity

ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="ERROR")
report = None
for _ in range(60):  # the autoscaler's first status comes within seconds
    report = capacity._autoscaler_report()
    if report:
        break
    time.sleep(0.5)
own = capacity._names_node_types_of_its_own(report)
print(json.dumps({"before": capacity.discover().growable, "own_types": own}))
config = ClusterConfig()
group = config.node_group_configs.add(name="gpu", min_count=0, max_count=4)
group.resources["CPU"], group.resources["GPU"] = 8, 1
# What an autoscaler that reports its node groups does (Ray's own test of this channel).
ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
cluster = capacity.discover()
print(json.dumps({
    "growable": cluster.growable, "source": cluster.source,
    "types": [[t.name, dict(t.resources), t.max_count] for t in cluster.node_types],
    "slots": capacity.slots_at_most(cluster, 4, 1),
    "refused": capacity.never_fits(cluster, 16, 1),
}))
"""


@pytest.mark.slow
def test_node_types_reported_in_rays_gcs_make_a_local_cluster_growable():
    """Ray 2.60's autoscalers do not report their node groups to the GCS (later ones,
    and hosted Ray, do): this reports one by hand to a real local Ray, in its own process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", GCS_PROBE], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = (json.loads(line) for line in done.stdout.splitlines()[-2:])
    # A local Ray is fixed (today's behaviour): its autoscaler, without a config, only
    # mirrors the live nodes.
    assert before == {"before": False, "own_types": False}
    assert after["growable"] and "GCS" in after["source"]
    assert after["types"] == [["gpu", {"CPU": 8.0, "GPU": 1.0}, 4]]
    assert after["slots"] == 4  # the 1-CPU head holds no 1-GPU trial; four GPU nodes do
    assert after["refused"]  # 16 CPUs: no node type has them


# --- a real sweep on a cluster that starts with zero workers ---------------------------


@pytest.fixture(scope="module")
def autoscaling_cluster():
    cluster = FakeAutoscalingCluster(WORKER_TYPES)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        assert not cluster.processes(), "a process of the fake cluster outlived stop()"


@pytest.fixture(scope="module")
def prepared_job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("autoscaling")
    write_synthetic_tree(
        root / "src", organs={"lung": ["adenocarcinoma", "benign"]}, images_per_diagnosis=24,
        image_size=32, progress=False,
    )  # fmt: skip
    job = {**JOB, "storage": {"uri": str(root / "store")}}
    job["prepare"] = {**JOB["prepare"], "source": str(root / "src")}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    return path


def run_sweep(job: Path, cluster: FakeAutoscalingCluster, *overrides: str, timeout=480):
    command = [sys.executable, "-m", "organtrain", "sweep", "--config", str(job)]
    command += [arg for o in overrides for arg in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | cluster.env()
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


FAKE_PROBE = """
import json, time, ray
from organtrain.search import capacity

ray.init(logging_level="ERROR")
for _ in range(60):  # the autoscaler's first status comes within seconds
    if capacity._autoscaler_report():
        break
    time.sleep(0.5)
cluster = capacity.discover()
print(json.dumps({
    "source": cluster.source, "growable": cluster.growable,
    "types": [[t.name, dict(t.resources), t.max_count] for t in cluster.node_types],
    "own_types": capacity._names_node_types_of_its_own(capacity._autoscaler_report() or {}),
}))
"""


@pytest.mark.slow
def test_a_driver_on_the_head_reads_the_autoscalers_node_types(autoscaling_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", FAKE_PROBE], capture_output=True, text=True, timeout=180,
        env=env | autoscaling_cluster.env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["source"] == f"the autoscaler's config {autoscaling_cluster.config}"
    assert seen["growable"]
    assert seen["types"] == [[WORKER_TYPE, {"CPU": 1.0, "object_store_memory": 200 * 2**20}, 1]]
    # Where the config is out of sight (KubeRay's autoscaler runs in its own container),
    # the autoscaler's status still tells that it has node types of its own.
    assert seen["own_types"] is True


@pytest.mark.slow
def test_a_trial_larger_than_any_node_type_is_refused_at_once(autoscaling_cluster, prepared_job):
    started = time.monotonic()
    too_big = ("name=too-big", "resources.cpus_per_trial=2")
    done = run_sweep(prepared_job, autoscaling_cluster, *too_big)
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-3000:]
    assert "resources.cpus_per_trial is 2" in done.stderr
    assert WORKER_TYPE in done.stderr and "Traceback" not in done.stderr
    assert seconds < 90  # no waiting for an autoscaler that can never help


@pytest.mark.slow
def test_a_sweep_on_a_cluster_with_zero_workers_scales_up_and_finishes(
    autoscaling_cluster, prepared_job
):
    done = run_sweep(prepared_job, autoscaling_cluster, "name=grown")
    assert done.returncode == 0, done.stderr[-4000:] + autoscaling_cluster.tail()
    # It waited for the autoscaler (the cluster had no CPU), saying so, instead of exit 2.
    assert "waiting for the Ray autoscaler" in done.stderr, done.stderr[-3000:]
    assert WORKER_TYPE in done.stderr
    # Its share per organ came from what the cluster can become (one cpu1 worker).
    assert "up to 1 trial(s) at once, 1 per organ" in done.stderr
    run = LocalStorage(str(prepared_job.parent / "store")).sub("runs/grown")
    summary = read_parquet(run.get_bytes("summary.parquet")).to_pylist()
    assert [(r["organ"], r["state"], r["trials"]) for r in summary] == [("lung", "done", 1)]
    assert 0 <= summary[0]["test_accuracy"] <= 1
    assert run.exists("lung/result.json")
