"""S3 credentials: rejected ones are named as such, and they never travel through Ray.

(The whole-sweep check that no secret reaches storage, Ray's logs or the output is in
test_run_integrity.py.)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from seaweedfs import ACCESS_KEY, MARKER_ACCESS_KEY, MARKER_SECRET_KEY, SECRET_KEY

from organtrain.cli import main
from organtrain.errors import StorageError
from organtrain.storage import open_storage

JOB = {
    "name": "creds",
    "prepare": {"dataset": "tiny"},
    "model": {"name": "simple_cnn", "filters": [8], "dense_units": 8},
    "resources": {"local_cpus": 1, "cpus_per_trial": 1},
}


def write_job(tmp_path: Path, storage_uri: str, source: str) -> Path:
    path = tmp_path / "job.yaml"
    job = {**JOB, "storage": {"uri": storage_uri}, "prepare": {**JOB["prepare"], "source": source}}
    path.write_text(yaml.safe_dump(job))
    return path


def assert_says_credentials_rejected(message: str, code: str) -> None:
    assert f"rejected the credentials ({code})" in message, message
    assert "access denied" not in message, message
    # Where credentials come from, so the user knows what to fix.
    for source in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "role"):
        assert source in message, message
    assert SECRET_KEY not in message


def test_wrong_secret_on_a_head_request_is_named(s3_uri, monkeypatch):
    """HEAD answers 403 with no body, which alone reads as 'access denied'."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    storage = open_storage(s3_uri)
    with pytest.raises(StorageError) as err:
        storage.exists("runs/x/sweep.json")
    assert_says_credentials_rejected(str(err.value), "SignatureDoesNotMatch")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError) as err:
        open_storage(s3_uri).stat("k")
    assert_says_credentials_rejected(str(err.value), "InvalidAccessKeyId")


@pytest.mark.parametrize("command", [["sweep"], ["train", "--organ", "lung"]])
def test_wrong_secret_on_train_and_sweep_says_credentials_rejected(
    command, s3_uri, monkeypatch, tmp_path, capsys
):
    job = write_job(tmp_path, s3_uri, str(tmp_path / "src"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    assert main([*command, "--config", str(job), "--no-progress"]) == 2
    assert_says_credentials_rejected(capsys.readouterr().err, "SignatureDoesNotMatch")


def test_missing_source_bucket_names_prepare_source(s3_env, tmp_path, capsys):
    job = write_job(tmp_path, str(tmp_path / "store"), "s3://no-such-source-bucket/images")
    assert main(["prepare", "--config", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-source-bucket' does not exist" in err, err
    assert "prepare.source" in err and "storage.uri" not in err, err


TASK_SCRIPT = """
import json, os, sys
import ray
from organtrain.config import load_config
from organtrain.search.sweep import _connect

_connect(None, load_config(sys.argv[1]))

@ray.remote
def seen():
    return {"runtime_env": ray.get_runtime_context().runtime_env,
            "environ": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}}

print(json.dumps(ray.get(seen.remote())))
"""


@pytest.mark.slow  # starts a local Ray (~10 s)
def test_no_secret_in_the_runtime_env_of_a_task(seaweedfs, tmp_path):
    """The Ray a sweep starts passes no credential through runtime_env (Ray logs and
    stores it); its tasks still get them, inherited from the driver's environment."""
    job = write_job(tmp_path, "s3://bucket/x", str(tmp_path / "src"))
    # A short path: Ray's socket paths under it must stay within the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="otray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env |= {"AWS_ACCESS_KEY_ID": MARKER_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": MARKER_SECRET_KEY,
            "AWS_SESSION_TOKEN": "marker-token", "AWS_ENDPOINT_URL": seaweedfs.endpoint_url,
            "RAY_TMPDIR": ray_tmp}  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-c", TASK_SCRIPT, str(job)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    text = json.dumps(seen["runtime_env"])
    for secret in (MARKER_SECRET_KEY, MARKER_ACCESS_KEY, "marker-token"):
        assert secret not in text, seen["runtime_env"]
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_SESSION_TOKEN" not in text
    # Not secret, and what a trial needs to find the storage: still passed.
    assert seen["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == seaweedfs.endpoint_url
    assert seen["environ"]["AWS_SECRET_ACCESS_KEY"] == MARKER_SECRET_KEY  # inherited


def test_marker_identity_is_accepted(seaweedfs):
    """The marker pair the leak tests search for is a working identity."""
    assert MARKER_ACCESS_KEY != ACCESS_KEY
    seaweedfs.client(MARKER_ACCESS_KEY, MARKER_SECRET_KEY).list_buckets()
