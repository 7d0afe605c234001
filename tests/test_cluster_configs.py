"""The cloud launchers: Ray cluster launcher configs against Ray's own schema, and the
KubeRay manifests' structure (no cloud or Kubernetes cluster needed)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from organtrain.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml"]
SECRETS = re.compile(
    r"AKIA[0-9A-Z]{16}|aws_secret|secret_?access|access_?key|private_key|BEGIN [A-Z ]*PRIVATE"
    r"|RAY_AUTH_TOKEN\s*[:=]\s*[^\s$]",  # a literal token (not a $(...) lookup)
    re.IGNORECASE,
)


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name):
    config = _load(name)
    jsonschema.validate(config, _ray_schema())  # as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` fills and checks it


def test_rays_schema_catches_a_misspelt_field():
    config = _load("aws-gpu.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_has_gpu_workers_autoscaling_and_installs_organtrain(name):
    config = _load(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and types[head]["resources"].get("CPU") == 0  # no trials on the head
    workers = {k: v for k, v in types.items() if k != head}
    assert workers
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        node = node_type["node_config"]
        if config["provider"]["type"] == "aws":
            assert re.match(r"(g|p)\d", node["InstanceType"]), node["InstanceType"]
        else:
            assert node["guestAccelerators"][0]["acceleratorCount"] >= 1
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    installs = " ".join(config["setup_commands"])
    # gpu: TensorFlow's CUDA build; cluster: Ray's dashboard on the head, which
    # `ray job submit` and `ray dashboard` need (ray[tune] alone starts it minimal).
    assert "pip install" in installs and "organtrain[gpu,cluster]" in installs
    # The repository is mounted where setup_commands install it from.
    (repo_mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert f"{repo_mount}[gpu,cluster]" in installs
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in command or "RAY_AUTH_MODE=token" in command


def test_aws_nodes_boot_a_maintained_gpu_image_that_tensorflow_installs_on():
    """Ray 2.60 turns `latest_dlami` into a 2021 Ubuntu 18.04 / CUDA 11.2 image (Python
    3.6): TensorFlow 2.21 needs Python >= 3.10. The config looks up AWS's current base
    GPU DLAMI (Ubuntu 22.04, current driver) at launch, through its public SSM parameter."""
    from ray.autoscaler._private.aws import config as ray_aws

    assert "18.04" in ray_aws.DEFAULT_AMI_NAME  # what latest_dlami would have meant
    config = _load("aws-gpu.yaml")
    for node_type in config["available_node_types"].values():
        image = node_type["node_config"]["ImageId"]
        assert image.lower() != "latest_dlami"
        assert re.fullmatch(
            r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id",
            image,
        ), image


def test_gcp_workers_start_ray_only_once_the_gpu_driver_answers(tmp_path):
    """Deep Learning VM images install the driver at first boot, possibly after SSH is up;
    Ray started before it would offer a GPU that TensorFlow cannot see. The wait really
    waits: run it with an `nvidia-smi` that fails, then one that answers."""
    config = _load("gcp-gpu.yaml")
    (wait,) = [c for c in config["worker_setup_commands"] if "nvidia-smi" in c]
    assert config["worker_setup_commands"].index(wait) == 0
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    quick = wait.replace("timeout 900", "timeout 2").replace("sleep 10", "sleep 0.2")
    failed = subprocess.run(["bash", "-c", quick], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "no NVIDIA driver" in failed.stderr
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert subprocess.run(["bash", "-c", quick], env=env).returncode == 0


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_takes_credentials_from_the_clouds_identity(name):
    text = (CLUSTER / name).read_text()
    assert not SECRETS.search(text), SECRETS.search(text)
    config = yaml.safe_load(text)
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        if config["provider"]["type"] == "aws":
            assert node["IamInstanceProfile"]["Name"]
        else:
            assert node["serviceAccounts"][0]["email"].endswith(".iam.gserviceaccount.com")


def _pod_specs(doc: dict) -> dict[str, dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_structure(name):
    text = (CLUSTER / name).read_text()
    assert not SECRETS.search(text), SECRETS.search(text)
    (doc,) = list(yaml.safe_load_all(text))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == ray.__version__  # the Ray the project pins
    assert spec["authOptions"]["mode"] == "token"
    gpus = {}
    for group, pod in _pod_specs(doc).items():
        assert pod["serviceAccountName"]  # object-store access from the pod's identity
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert limits["cpu"] and limits["memory"] and requests["cpu"]
            gpus[group] = int(limits.get("nvidia.com/gpu", 0))
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
    assert gpus.pop("head") == 0 and gpus and all(n >= 1 for n in gpus.values())


def test_rayjob_entrypoint_runs_a_sweep_on_a_job_file_of_this_repo():
    doc = _load("kuberay/rayjob-sweep.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["organtrain", "sweep"]
    config = argv[argv.index("--config") + 1]
    # The image (cluster/Dockerfile) holds the repository's jobs/ under its WORKDIR.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE).group(1)
    assert re.search(r"^COPY .*\bjobs\b", dockerfile, re.MULTILINE)
    local = REPO / Path(config).relative_to(workdir)
    assert local.is_file(), local
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    cfg = load_config(local, overrides)  # loads, with the entrypoint's overrides applied
    assert cfg.resources.gpus_per_trial >= 1
    assert cfg.storage.uri.startswith("s3://")


DOCUMENTED_SUBMITS = ["README.md", "cluster/README.md", "cluster/aws-gpu.yaml",
                      "cluster/gcp-gpu.yaml", "cluster/kuberay/raycluster.yaml"]  # fmt: skip


@pytest.mark.parametrize("name", DOCUMENTED_SUBMITS)
def test_documented_job_submissions_start_a_command(name):
    """`ray job submit -- ARGS` runs shlex.join(ARGS) in a shell: an entrypoint quoted as
    one word ('cd dir && organtrain ...') is looked up as a single command name and exits
    127. Each documented entrypoint must start with a command word (e.g. `bash -c '...'`)."""
    text = (REPO / name).read_text()
    entrypoints = re.findall(r"ray job submit [^\n]*-- \\\n#?\s*(\S+)", text)
    assert entrypoints, f"no `ray job submit ... -- \\` found in {name}"
    for first in entrypoints:
        assert not first.startswith(("'", '"')), f"{name}: quoted entrypoint {first}..."
