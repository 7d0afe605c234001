"""A sweep whose results and secrets can be trusted, checked on one real run on S3.

One `organtrain sweep` (run "guarded") on SeaweedFS with the marker credentials, its own
local Ray and its own Ray temp folder; while it runs:
- the lock left by a dead sweep of the same run id is taken over;
- a second `sweep`, and a `train` of one of its organs, with the same run id exit 3
  naming the running sweep;
- lung's only trial is killed (SIGKILL, as the OOM killer does) after it has written
  checkpoints: lung must be `failed`, not evaluated from the half-trained trial, and the
  sweep exits 1 while colon finishes.
Afterwards every object of the bucket, every file of the Ray temp folder and every
command's output are searched for the credentials.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from seaweedfs import MARKER_ACCESS_KEY, MARKER_SECRET_KEY
from test_sweep import JOB as SWEEP_JOB
from test_sweep import ORGANS

from organtrain.data.manifest import read_parquet
from organtrain.data.synth import write_synthetic_tree
from organtrain.storage import S3Storage

pytestmark = pytest.mark.slow  # real Ray, real training: a minute or two

RUN_ID = "guarded"
JOB = {
    **SWEEP_JOB,  # the sweep tests' tiny two-organ job
    "name": RUN_ID,
    "train": {"epochs": 2, "early_stopping_patience": 0},
    # lung's trial runs long enough to be killed mid-training; a killed trial is not retried.
    "search": {"samples": 1, "scheduler": "fifo", "max_failures": 0,
               "organ_space": {"lung": {"train.epochs": 400}}},
}  # fmt: skip
SECRETS = (MARKER_SECRET_KEY, MARKER_ACCESS_KEY)


@dataclass
class Command:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class GuardedRun:
    storage: S3Storage
    ray_tmp: Path
    sweep: Command  # the sweep that ran
    second_sweep: Command  # the same run id, started while the first one ran
    second_train: Command
    stale_pid: int  # the dead holder of the lock found at the start
    commands: list[Command]


def organtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "organtrain", *args]


def run(args: list[str], env: dict, timeout: float = 300) -> Command:
    """Run a command in its own session; on timeout kill it and whatever it started."""
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # recorded, for the test that expected it to exit
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        err += f"\n[killed after {timeout} s]"
    return Command(args, process.returncode, out, err)


def wait_for(what: str, check, process: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert process.poll() is None, f"the sweep ended before {what}"
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout} s")


def lung_trial_result(storage: S3Storage) -> dict | None:
    """The last result lung's trial reported, once it has written two checkpoints."""
    keys = [i.key for i in storage.list(f"runs/{RUN_ID}/tune/lung")]
    if not any("/checkpoint_000001/" in k for k in keys):
        return None
    found = [k for k in keys if k.endswith("/result.json")]
    if len(found) != 1:
        return None
    key = found[0]
    body = storage.client.get_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}")
    lines = body["Body"].read().decode().strip().splitlines()  # Tune writes it in batches
    return json.loads(lines[-1]) if lines else None


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, seaweedfs) -> GuardedRun:
    root = tmp_path_factory.mktemp("integrity")
    write_synthetic_tree(
        root / "src", organs=ORGANS, images_per_diagnosis=24, image_size=32, progress=False
    )
    bucket = f"integrity-{uuid.uuid4().hex[:8]}"  # a bucket of its own: all of it is searched
    seaweedfs.client(MARKER_ACCESS_KEY, MARKER_SECRET_KEY).create_bucket(Bucket=bucket)
    job = {**JOB, "storage": {"uri": f"s3://{bucket}/store"},
           "prepare": {**JOB["prepare"], "source": str(root / "src")}}  # fmt: skip
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    # A short path: Ray's socket paths under it must stay within the 107-byte limit.
    ray_tmp = Path(tempfile.mkdtemp(prefix="otray-", dir="/tmp"))
    try:
        yield _guarded_run(seaweedfs, bucket, config, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _guarded_run(seaweedfs, bucket: str, config: Path, ray_tmp: Path) -> GuardedRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env |= {"AWS_ACCESS_KEY_ID": MARKER_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": MARKER_SECRET_KEY,
            "AWS_ENDPOINT_URL": seaweedfs.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_TMPDIR": str(ray_tmp)}  # fmt: skip
    storage = S3Storage(bucket, "store", client=seaweedfs.client(MARKER_ACCESS_KEY,
                                                                  MARKER_SECRET_KEY))  # fmt: skip
    commands = [run(organtrain("prepare", "--config", str(config), "--no-progress"), env)]
    assert commands[0].returncode == 0, commands[0].stderr[-3000:]

    # A sweep of this run id died without releasing its lock (its process is gone).
    stale_pid = _dead_pid()
    storage.put_bytes(f"locks/runs/{RUN_ID}.json", json.dumps({
        "what": f"run {RUN_ID}", "host": socket.gethostname(), "pid": stale_pid,
        "heartbeat": time.time(),
    }).encode())  # fmt: skip

    sweep_args = organtrain("sweep", "--config", str(config), "--no-progress")
    logs = config.parent / "sweep-out"
    with open(f"{logs}.stdout", "w+") as out, open(f"{logs}.stderr", "w+") as err:
        first = subprocess.Popen(sweep_args, env=env, stdout=out, stderr=err,
                                 start_new_session=True)  # fmt: skip
        try:
            result = wait_for("lung checkpoints", lambda: lung_trial_result(storage), first)
            second_sweep = run(sweep_args, env, timeout=90)
            second_train = run(organtrain("train", "--config", str(config), "--organ", "lung",
                                          "--no-progress"), env, timeout=90)  # fmt: skip
            assert first.poll() is None, "the sweep ended before its trial could be killed"
            assert result["hostname"] == socket.gethostname()
            os.kill(result["pid"], signal.SIGKILL)  # lung's trial, in this sweep's own Ray
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
        out.seek(0), err.seek(0)
        sweep = Command(sweep_args, first.returncode, out.read(), err.read())
    commands += [sweep, second_sweep, second_train]
    return GuardedRun(storage, ray_tmp, sweep, second_sweep, second_train, stale_pid, commands)


def _dead_pid() -> int:
    """The id of a process of this host that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def table(storage, key: str) -> list[dict]:
    return read_parquet(storage.get_bytes(key)).to_pylist()


def test_organ_whose_only_trial_crashed_is_failed(guarded):
    sweep = guarded.sweep
    assert sweep.returncode == 1, sweep.stderr[-3000:]
    run = guarded.storage.sub(f"runs/{RUN_ID}")
    summary = {r["organ"]: r for r in table(run, "summary.parquet")}
    assert summary["colon"]["state"] == "done"
    lung = summary["lung"]
    assert lung["state"] == "failed", lung
    assert lung["trial_id"] is None and lung["trials"] == 1 and lung["trials_errored"] == 1
    # The error says what happened to the trial, not just that the organ failed.
    assert "1 trial" in lung["error"] and "died" in lung["error"].lower(), lung["error"]
    # The half-trained trial was not evaluated or published as lung's model.
    assert not run.exists("lung/result.json") and not run.exists("lung/model.keras")
    (trial,) = table(run, "lung/metrics/trials.parquet")
    assert trial["status"] == "error" and trial["stop_reason"] == "error"
    status = json.loads(run.get_bytes("status.json"))
    assert status["state"] == "failed" and status["organs"]["lung"]["state"] == "failed"
    assert "lung: FAILED" in sweep.stdout and "colon: simple_cnn" in sweep.stdout


def test_one_writer_per_run_id(guarded):
    for second in (guarded.second_sweep, guarded.second_train):
        assert second.returncode == 3, second.stderr[-3000:]
    pid = str(_sweep_pid(guarded))
    for second in (guarded.second_sweep, guarded.second_train):
        assert f"run {RUN_ID}" in second.stderr and f"pid {pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    # The dead sweep's lock was taken over, and the finished sweep released its own.
    assert "taking over the lock" in guarded.sweep.stderr
    assert f"'pid': {guarded.stale_pid}" in guarded.sweep.stderr
    assert not guarded.storage.exists(f"locks/runs/{RUN_ID}.json")


def _sweep_pid(guarded: GuardedRun) -> int:
    """The first sweep's process id, as the second one saw it in the lock."""
    message = guarded.second_sweep.stderr
    return int(message.split("pid ", 1)[1].split(" ", 1)[0])


def test_credentials_reach_no_storage_log_or_output(guarded):
    storage = guarded.storage
    client = storage.client
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=storage.bucket) for o in page.get("Contents", [])]  # fmt: skip
    assert any(k.endswith("tuner.pkl") for k in keys)  # Tune's pickles are among them
    assert any("basic-variant-state" in k for k in keys)
    leaks = []
    for key in keys:
        data = client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()
        leaks += [f"s3://{storage.bucket}/{key}" for s in SECRETS if s.encode() in data]
    ray_files = [p for p in guarded.ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "runtime_env_agent.log" for p in ray_files)  # the session's logs
    for path in ray_files:
        data = path.read_bytes()
        leaks += [str(path) for s in SECRETS if s.encode() in data]
    for command in guarded.commands:
        for stream in (command.stdout, command.stderr):
            leaks += [" ".join(command.args[2:4]) for s in SECRETS if s in stream]
    assert not leaks, "credentials found in:\n" + "\n".join(sorted(set(leaks)))
