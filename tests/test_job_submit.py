"""The documented `ray job submit` commands, run for real (issue 15): a local head started
with `ray start --head` (token authentication on, Ray's default, and the dashboard's HTTP
server, which job submission talks to), then

- the README's cloud command (its words; only the address and the checkout's path
  substituted), submitting a tiny `organtrain sweep` written as `jobs/sweep-gpu.yaml`;
- the Kubernetes CronJob's script (jobs/schedules/k8s-cronjob.yaml: `--no-wait
  --submission-id` named after the night, then follow the job and exit with its real
  status), twice, the second time as a retried pod that must follow the first job;

each job must SUCCEED and leave its outputs, and a secret in the environments of the
submitter and of the node (AWS_SECRET_ACCESS_KEY) must appear in no job's runtime_env, no
job information the dashboard serves, and no file of the Ray session.

The dashboard needs ray[default]'s extra packages; they are not in .venv (they slowed
every other test's Ray start by 2-4 s), but in build/ray-dashboard/site (`make
ray-dashboard-deps`, which `make test` runs), on the PYTHONPATH of this head only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
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

pytestmark = pytest.mark.slow  # a Ray head with its dashboard, a sweep and a nightly

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_DEPS = Path(os.environ.get("RAY_DASHBOARD_DEPS", REPO / "build/ray-dashboard")) / "site"
VENV_BIN = Path(sys.executable).parent
SECRET = f"ot-job-submit-secret-{uuid.uuid4().hex}"
ORGANS = {"lung": ["adenocarcinoma", "benign"]}
# The documented address and checkout, replaced by this test's.
README_ADDRESS, README_CHECKOUT = "http://127.0.0.1:8265", "~/organtrain"
CRONJOB_ADDRESS, CRONJOB_CHECKOUT = "http://organtrain-head-svc:8265", "/organtrain"


def require_dashboard_deps() -> None:
    if not (DASHBOARD_DEPS.parent / ".installed").exists():  # the Makefile's stamp
        message = (
            f"Ray's dashboard packages are not in {DASHBOARD_DEPS}: run `make "
            "ray-dashboard-deps` (`make test` does)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must submit the documented jobs, never skip them
        pytest.skip(message)


class Head:
    """`ray start --head --block` with the dashboard on its own ports and temp folder, as
    a cluster's head runs: its environment is the node's (its own AWS identity)."""

    def __init__(self, root: Path):
        ports = iter(free_ports(10))
        self.token = secrets.token_hex(32)
        self.dashboard = f"http://127.0.0.1:{next(ports)}"
        self.temp = root / "ray"
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={next(ports)}",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
            f"--ray-client-server-port={next(ports)}", f"--temp-dir={self.temp}",
            f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
            f"--dashboard-agent-listen-port={next(ports)}",
            f"--dashboard-agent-grpc-port={next(ports)}",
            f"--runtime-env-agent-port={next(ports)}", f"--metrics-export-port={next(ports)}",
            "--object-store-memory=200000000", "--disable-usage-stats",
        ]  # fmt: skip
        env = base_env() | self.auth() | {"AWS_SECRET_ACCESS_KEY": SECRET}
        self.node = RayNode("head", command, env, root / "head.log")

    def auth(self) -> dict:
        # The token in the environment, not ~/.ray/auth_token: the user's file stays as is.
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self) -> Head:
        deadline = time.monotonic() + 120
        self.node.start()
        self.node.wait_started(deadline)
        while not self._dashboard_answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not answer:\n{self.node.tail()}")
            time.sleep(0.5)
        return self

    def _dashboard_answers(self) -> bool:
        try:
            self.get("/api/version")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str) -> str:
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.read().decode()

    def stop(self) -> None:
        self.node.stop()


def base_env() -> dict:
    """This process's environment as on a machine with `organtrain[cluster]` installed:
    the venv's `ray` and `organtrain` first on PATH, ray[default]'s packages (the job CLI
    needs them too) on PYTHONPATH; no RAY_ADDRESS (another test's Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    pythonpath = os.pathsep.join(filter(None, [str(DASHBOARD_DEPS), env.get("PYTHONPATH")]))
    return env | {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": pythonpath}


@pytest.fixture(scope="module")
def head():
    require_dashboard_deps()
    # A short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ot-js-", dir="/tmp"))
    head = Head(root)
    try:
        yield head.start()
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """Tiny synthetic images of one organ, prepared into lab/store (the nightly prepares
    them again: unchanged, the same version)."""
    root = tmp_path_factory.mktemp("job-submit")
    write_synthetic_tree(root / "src", organs=ORGANS, images_per_diagnosis=16, image_size=32,
                         progress=False)  # fmt: skip
    prepared = checkout(root, "prepare", "prepare.yaml", tiny_job(root, "prepare"))
    assert main(["prepare", "--config", str(prepared / "jobs/prepare.yaml"), "--no-progress"]) == 0
    return root


def tiny_job(lab: Path, name: str) -> dict:
    """One trial of one epoch (1 CPU), storage and source at absolute paths: the job runs
    in a folder of Ray's own (its working_dir), not here."""
    return {
        **JOB, "name": name, "storage": {"uri": str(lab / "store")},
        "prepare": {**JOB["prepare"], "source": str(lab / "src")},
        "train": {**JOB["train"], "epochs": 1},
        "search": {"samples": 1, "scheduler": "fifo"},
    }  # fmt: skip


def checkout(root: Path, name: str, job_file: str, job: dict) -> Path:
    """A folder standing for the checkout the documented command runs in, with the job
    file under the name the documentation uses."""
    folder = root / name
    (folder / "jobs").mkdir(parents=True)
    (folder / "jobs" / job_file).write_text(yaml.safe_dump(job))
    return folder


def substituted(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the documented command:\n{text}"
        text = text.replace(old, new)
    return text


def readme_submission() -> str:
    """The README's `ray job submit` command for a cluster-launcher cluster, as written."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"^RAY_AUTH_MODE=token ray job submit .*\\\n(?:.*\\\n)*.*\n", text, re.M)
    assert found, "README.md: the cloud section's `RAY_AUTH_MODE=token ray job submit` is gone"
    return found[0]


def cronjob_script() -> str:
    """The submitter pod's script in the Kubernetes CronJob, as written."""
    cronjob = yaml.safe_load((REPO / "jobs/schedules/k8s-cronjob.yaml").read_text())
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["/bin/sh", "-c"], container["command"]
    return container["command"][2]


def run_shell(shell: str, script: str, head: Head) -> subprocess.CompletedProcess:
    """The documented command as a user (or the pod) runs it: the token and a secret of
    their own in the environment."""
    env = base_env() | head.auth() | {"AWS_SECRET_ACCESS_KEY": SECRET}
    return subprocess.run([shell, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def ray_job(head: Head, *args: str) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "ray"), "job", *args, "--address", head.dashboard],
        capture_output=True, text=True, env=base_env() | head.auth(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def summary(lab: Path, run_id: str) -> list[dict]:
    key = f"runs/{run_id}/summary.parquet"
    return read_parquet(LocalStorage(lab / "store").get_bytes(key)).to_pylist()


def assert_no_secret(head: Head) -> None:
    """The secret of the submitter's and the node's environment: in no job's runtime_env
    or information (the CLI's and the dashboard's REST API's), no file of the Ray session."""
    listed, served = ray_job(head, "list"), head.get("/api/jobs/")
    assert "runtime_env" in listed and "runtime_env" in served, served  # what is searched
    assert SECRET not in listed and SECRET not in served
    leaked = [p for p in head.temp.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the secret is in Ray's session files: {leaked}"


@pytest.fixture(scope="module")
def submitted(head, lab) -> dict[str, subprocess.CompletedProcess]:
    """The README's submission and the CronJob's script, run at the same time (each job's
    trial takes one of the head's two CPUs): the two jobs take little more than one."""
    sweep = checkout(lab, "organtrain", "sweep-gpu.yaml", tiny_job(lab, "submitted"))
    nightly = checkout(lab, "organtrain-k8s", "nightly.yaml", tiny_job(lab, "nightly"))
    readme = {README_ADDRESS: head.dashboard, README_CHECKOUT: str(sweep)}
    cronjob = {CRONJOB_ADDRESS: head.dashboard, CRONJOB_CHECKOUT: str(nightly)}
    commands = {
        "readme": ("bash", substituted(readme_submission(), readme)),
        "cronjob": ("sh", substituted(cronjob_script(), cronjob)),
    }
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        running = {name: pool.submit(run_shell, *args, head) for name, args in commands.items()}
        done = {name: future.result() for name, future in running.items()}
    return done | {"cronjob_script": commands["cronjob"][1]}


def test_the_head_requires_its_token(head):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(head.dashboard + "/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)


def test_readme_submission_runs_a_sweep(head, lab, submitted):
    done = submitted["readme"]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    submission = re.search(r"Job '(raysubmit_\w+)' succeeded", output)
    assert submission, output[-4000:]
    assert f"Job '{submission[1]}' succeeded" in ray_job(head, "status", submission[1])
    assert json.loads(head.get(f"/api/jobs/{submission[1]}"))["status"] == "SUCCEEDED"
    assert "sweep submitted: 1 of 1 organ(s) finished" in ray_job(head, "logs", submission[1])
    assert [(r["organ"], r["state"]) for r in summary(lab, "submitted")] == [("lung", "done")]
    assert_no_secret(head)


def test_cronjob_submits_the_night_once_and_follows_it(head, lab, submitted):
    first = submitted["cronjob"]
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    night = re.search(r"Job 'organtrain-nightly-(\d{4}-\d\d-\d\d)' succeeded", first.stdout)
    assert night, first.stdout[-4000:]
    job_id = f"organtrain-nightly-{night[1]}"
    assert json.loads(head.get(f"/api/jobs/{job_id}"))["status"] == "SUCCEEDED"
    rows = summary(lab, f"nightly-{night[1]}")
    assert [(r["organ"], r["state"]) for r in rows] == [("lung", "done")]
    # A retried pod (backoffLimit) submits nothing: Ray refuses the night's submission id
    # a second time, and the pod follows the first job to its status.
    again = run_shell("sh", submitted["cronjob_script"], head)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"{job_id}: not submitted again (a retried pod?): following it" in again.stdout
    assert f"Job '{job_id}' succeeded" in again.stdout, again.stdout
    assert ray_job(head, "list").count(f"submission_id='{job_id}'") == 1
    assert_no_secret(head)
