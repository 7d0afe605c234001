"""The nightly schedules in jobs/schedules/: syntax and structure checks that can fail.

Fast (no Ray, no TensorFlow). `sbatch --test-only` runs only where SLURM answers (CI
starts one with .ci/slurm-up.sh); elsewhere that part skips with its reason.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import stat
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from organtrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ROOT / "jobs" / "schedules"
NIGHTLY_CONFIG = "jobs/nightly.yaml"
NIGHTLY_COMMAND = f"organtrain nightly --config {NIGHTLY_CONFIG}"
RESUBMIT = SCHEDULES / "nightly-resubmit.sbatch"
RAY_LAUNCHER = ROOT / "slurm" / "organtrain-ray.sbatch"
# The CI node has 2 CPUs and no GPU: `sbatch --test-only` of the nightly's own resources
# (checked against jobs/nightly.yaml below) is given these instead.
SMALL_NODE = ("--cpus-per-task=1", "--gpus-per-node=0")

# minute, hour, day of month, month, day of week (0 and 7 are Sunday)
CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}), (1, 12, {}), (0, 7, {})]
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
CRON_FIELDS[3] = (1, 12, {m: i + 1 for i, m in enumerate(MONTHS)})
CRON_FIELDS[4] = (0, 7, {d: i for i, d in enumerate(DAYS)})


def _cron_value(text: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names[text.lower()] if text.lower() in names else int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} outside {low}-{high}")
    return value


def validate_cron_schedule(fields: list[str]) -> None:
    """Raise ValueError unless these are 5 valid cron time fields."""
    if len(fields) != 5:
        raise ValueError(f"expected 5 time fields, got {len(fields)}: {fields}")
    for field, (low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise ValueError(f"bad step in {item!r}")
            if base == "*":
                continue
            start, dash, end = base.partition("-")
            first = _cron_value(start, low, high, names)
            if dash and _cron_value(end, low, high, names) < first:
                raise ValueError(f"descending range {item!r}")
            if step and not dash:
                raise ValueError(f"step without a range in {item!r}")


def cron_entries(path: Path) -> list[tuple[list[str], str]]:
    """(time fields, command) of each cron line; comments, blanks, VAR=value skipped."""
    entries = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", text):
            continue
        parts = text.split(None, 5)
        entries.append((parts[:5], parts[5] if len(parts) > 5 else ""))
    return entries


@pytest.mark.parametrize(
    "fields",
    [
        ["0", "2", "*", "*", "*"],
        ["*/15", "8-17/2", "1,15", "jan-mar", "mon-fri"],
        ["0", "0", "1", "1", "7"],
    ],
)
def test_cron_validator_accepts(fields):
    validate_cron_schedule(fields)


@pytest.mark.parametrize(
    "fields",
    [["0", "2", "*", "*"], ["60", "2", "*", "*", "*"], ["0", "24", "*", "*", "*"],
     ["0", "2", "0", "*", "*"], ["0", "2", "*", "13", "*"], ["0", "5-2", "*", "*", "*"],
     ["*/0", "2", "*", "*", "*"], ["x", "2", "*", "*", "*"]],
)  # fmt: skip
def test_cron_validator_rejects(fields):
    with pytest.raises(ValueError):
        validate_cron_schedule(fields)


def test_nightly_config_exists():
    assert (ROOT / NIGHTLY_CONFIG).is_file(), f"every schedule runs {NIGHTLY_CONFIG}"


@pytest.mark.parametrize(
    "name",
    ["scrontab", "crontab", "nightly-resubmit.sbatch", "k8s-cronjob.yaml", "rayjob-nightly.yaml"],
)
def test_every_schedule_names_the_nightly_config(name):
    assert NIGHTLY_CONFIG in (SCHEDULES / name).read_text()


# --- cron and scrontab ---------------------------------------------------------------


def test_crontab_line():
    entries = cron_entries(SCHEDULES / "crontab")
    assert len(entries) == 1
    fields, command = entries[0]
    validate_cron_schedule(fields)
    assert fields[:2] == ["0", "2"]
    assert "RAY_ADDRESS=auto" in command and "RAY_AUTH_MODE=token" in command
    assert "flock -n" in command
    assert "organtrain nightly --config jobs/nightly.yaml" in command
    assert re.search(r">>\s*\S*\$\(date [^)]*\)\S*\.log", command), "a dated log file"
    # cron turns a bare % into a newline
    assert not re.search(r"(?<!\\)%", command), "escape % as \\% in a crontab line"


def _scron_options(path: Path) -> list[str]:
    return [
        line[len("#SCRON") :].strip()
        for line in path.read_text().splitlines()
        if line.startswith("#SCRON")
    ]


def test_scrontab_entry():
    path = SCHEDULES / "scrontab"
    entries = cron_entries(path)
    assert len(entries) == 1
    fields, command = entries[0]
    validate_cron_schedule(fields)
    assert fields[:2] == ["0", "2"]
    assert "sbatch" in command and "slurm/organtrain-ray.sbatch nightly --config" in command
    assert NIGHTLY_CONFIG in command
    assert "squeue" in command, "never stacks: checks for a queued nightly first"
    options = _scron_options(path)
    assert any(o.startswith("--job-name=") for o in options)
    assert any(o.startswith("--chdir=/") for o in options)
    # the #SCRON lines are the last comment block before the entry (they apply to it)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("0 2 ")
    assert all(line.startswith("#SCRON") for line in lines[-1 - len(options) : -1])


def _sbatch_directives(script: Path) -> list[str]:
    return re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M)


def _scrontab_nightly_submission() -> tuple[list[str], str]:
    """The scrontab entry's `sbatch OPTIONS SCRIPT ...`: its options and script."""
    ((_, command),) = cron_entries(SCHEDULES / "scrontab")
    words = shlex.split(command[command.index("sbatch ") :])
    script = next(w for w in words if w.endswith(".sbatch"))
    return words[1 : words.index(script)], script


def _resources(options: list[str]) -> dict[str, str]:
    """sbatch options as {name: value}, a later one overriding an earlier (as sbatch does
    with the command line over #SBATCH lines)."""
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in options)


def _gpus_per_node(resources: dict[str, str]) -> int:
    if "--gpus-per-node" in resources:
        return int(resources["--gpus-per-node"].rsplit(":", 1)[-1])
    if resources.get("--gres", "").startswith("gpu"):
        return int(resources["--gres"].rsplit(":", 1)[-1])
    return 0


@pytest.mark.parametrize("schedule", ["scrontab", "nightly-resubmit.sbatch"])
def test_the_nightly_gets_the_resources_of_one_trial_of_its_job_file(schedule):
    """The nightly's allocation holds one trial of jobs/nightly.yaml: with fewer CPUs or
    GPUs than a trial asks, the sweep refuses and the nightly exits 2 every night."""
    wanted = load_config(ROOT / NIGHTLY_CONFIG).resources
    if schedule == "scrontab":  # sbatch OPTIONS slurm/organtrain-ray.sbatch: both count
        options, script = _scrontab_nightly_submission()
        assert script == "slurm/organtrain-ray.sbatch"
        resources = _resources(_sbatch_directives(RAY_LAUNCHER) + options)
    else:  # it runs the launcher inside its own allocation: its #SBATCH lines count
        resources = _resources(_sbatch_directives(RESUBMIT))
    assert resources.get("--nodes", "1") == "1"  # one node: the CPUs below are per node
    assert int(resources["--cpus-per-task"]) >= math.ceil(wanted.cpus_per_trial), resources
    assert _gpus_per_node(resources) >= math.ceil(wanted.gpus_per_trial), resources


# --- sbatch scripts ------------------------------------------------------------------


def test_resubmit_script_syntax():
    subprocess.run(["bash", "-n", str(RESUBMIT)], check=True)
    assert RESUBMIT.stat().st_mode & stat.S_IXUSR


def test_resubmit_script_options():
    text = RESUBMIT.read_text()
    options = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    known = {
        "--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--requeue",
        "--signal", "--open-mode", "--output", "--time", "--partition", "--gpus-per-node",
    }  # fmt: skip
    assert {o.split("=")[0] for o in options} <= known
    assert "--job-name=organtrain-nightly" in options
    assert "--requeue" in options and "--open-mode=append" in options
    assert re.search(r"sbatch .*--begin=", text.replace("\\\n", " "))
    assert "squeue" in text
    assert re.search(r'^exec bash "\$ROOT/slurm/organtrain-ray.sbatch" nightly', text, re.M)


def _slurm_answers() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (CI runs .ci/slurm-up.sh)"
    try:
        subprocess.run(["sinfo", "-h"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as error:
        return f"no SLURM controller answers: {error}"
    return None


def _test_only(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", "--test-only", *args, str(script)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


def test_sbatch_accepts_the_options(tmp_path):
    reason = _slurm_answers()
    if reason:
        pytest.skip(reason)
    result = _test_only(RESUBMIT, *SMALL_NODE)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr
    # the next run's submission
    result = _test_only(RESUBMIT, *SMALL_NODE, "--begin=now+86400", "--dependency=singleton")
    assert result.returncode == 0, result.stderr
    # the nightly the scrontab entry submits
    options, script = _scrontab_nightly_submission()
    result = _test_only(ROOT / script, *options, *SMALL_NODE)
    assert result.returncode == 0, result.stderr
    # the scrontab entry's #SCRON lines are sbatch options: same check
    script = tmp_path / "scron.sh"
    options = [o.replace("/path/to/organtrain", str(tmp_path)) for o in _scron_options(
        SCHEDULES / "scrontab")]  # fmt: skip
    script.write_text("#!/bin/sh\n" + "".join(f"#SBATCH {o}\n" for o in options) + "true\n")
    result = _test_only(script)
    assert result.returncode == 0, result.stderr


def _fake_slurm(tmp_path: Path, queued: str) -> tuple[Path, dict[str, str]]:
    """A submit dir whose launcher and sbatch/squeue only record how they were called."""
    root = tmp_path / "checkout"
    (root / "slurm").mkdir(parents=True)
    (root / "jobs" / "schedules").mkdir(parents=True)
    shutil.copy(RESUBMIT, root / "jobs" / "schedules" / RESUBMIT.name)
    calls = tmp_path / "calls"
    (root / "slurm" / "organtrain-ray.sbatch").write_text(f'echo "launcher $*" >>{calls}\nexit 3\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "squeue": f'echo "squeue $*" >>{calls}\nprintf "%s" "{queued}"\n',
        "sbatch": f'echo "sbatch $*" >>{calls}\necho 4242\n',
    }.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "100",
        "SLURM_JOB_NAME": "organtrain-nightly",
        "SLURM_SUBMIT_DIR": str(root),
        "ORGANTRAIN_NIGHTLY_DATE": "2031-01-02",
    }
    return calls, env


@pytest.mark.parametrize("queued", ["100\n", "100\n101\n"])
def test_resubmit_queues_the_next_run_once(tmp_path, queued):
    calls, env = _fake_slurm(tmp_path, queued)
    result = subprocess.run(
        ["bash", str(RESUBMIT), "--set", "search.samples=2"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 3, "organtrain's exit status is the job's"
    log = calls.read_text().splitlines()
    submits = [line for line in log if line.startswith("sbatch ")]
    if queued == "100\n":  # only this job: queue the next
        assert len(submits) == 1
        assert "--dependency=singleton" in submits[0]
        # relative to now (unambiguous whatever the clocks do), a day ahead at most
        begin = re.search(r"--begin=now\+(\d+) ", submits[0])
        assert begin and 60 < int(begin[1]) <= 86400 + 3600, submits[0]
        assert "--job-name=organtrain-nightly" in submits[0]
        assert re.search(r"ORGANTRAIN_NIGHTLY_DATE=\d{4}-\d\d-\d\d", submits[0])
        assert submits[0].endswith("nightly-resubmit.sbatch --set search.samples=2")
    else:  # job 101 is already queued: never multiply
        assert submits == []
    assert log[-1] == (
        "launcher nightly --config jobs/nightly.yaml --date 2031-01-02 --set search.samples=2"
    )


# --- the next run's start, across daylight-saving changes ------------------------------


def _next_start(tz: str, now: str, at: str) -> subprocess.CompletedProcess:
    """The resubmit script's own next_start (sourcing it defines it and runs nothing), under
    the time zone `tz`, for the instant `now` (ISO 8601 with its UTC offset)."""
    epoch = int(datetime.fromisoformat(now).timestamp())
    return subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(RESUBMIT))} && next_start {epoch} {at}"],
        env={**os.environ, "TZ": tz}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tz", "now", "at", "expected"),
    [
        # The day before the clocks skip 02:00 (`date -d "tomorrow 02:00"` failed, and the
        # chain with it): the next run starts as they jump, 03:00 CEST.
        ("Europe/Berlin", "2026-03-28T02:00:05+01:00", "02:00", "2026-03-29T03:00:00+02:00"),
        ("Europe/Berlin", "2026-03-28T02:30:05+01:00", "02:30", "2026-03-29T03:30:00+02:00"),
        ("America/New_York", "2026-03-07T02:00:05-05:00", "02:00", "2026-03-08T03:00:00-04:00"),
        # The run of that day (`date -d "today 02:00"` failed): tomorrow's 02:00.
        ("Europe/Berlin", "2026-03-29T03:00:05+02:00", "02:00", "2026-03-30T02:00:00+02:00"),
        # The clocks go back over 02:00 (Berlin) or 01:30 (New York): the first of the two,
        # and the run at the first is not followed by another at the second, an hour later.
        ("Europe/Berlin", "2026-10-24T02:00:05+02:00", "02:00", "2026-10-25T02:00:00+02:00"),
        ("Europe/Berlin", "2026-10-25T02:00:05+02:00", "02:00", "2026-10-26T02:00:00+01:00"),
        ("America/New_York", "2026-10-31T01:30:05-04:00", "01:30", "2026-11-01T01:30:00-04:00"),
        ("America/New_York", "2026-11-01T01:30:05-04:00", "01:30", "2026-11-02T01:30:00-05:00"),
        # Ordinary days: started in the evening, and a minute before the hour.
        ("America/New_York", "2026-06-15T20:00:00-04:00", "02:00", "2026-06-16T02:00:00-04:00"),
        ("UTC", "2026-01-01T01:59:30+00:00", "02:00", "2026-01-02T02:00:00+00:00"),
    ],
)
def test_next_start_across_daylight_saving_changes(tz, now, at, expected):
    result = _next_start(tz, now, at)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == datetime.fromisoformat(expected).timestamp()


@pytest.mark.parametrize("at", ["2:00", "24:00", "02:60", "2am", ""])
def test_next_start_refuses_a_malformed_time(at):
    result = _next_start("UTC", "2026-01-01T12:00:00+00:00", shlex.quote(at))
    assert result.returncode == 2 and not result.stdout
    assert f"ORGANTRAIN_NIGHTLY_AT={at}: give the local time of the nightly as HH:MM" in (
        result.stderr
    )


# --- Kubernetes ----------------------------------------------------------------------


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((SCHEDULES / name).read_text()) if d]


def check_shell_syntax(script: str) -> None:
    """`sh -n`: the script parses (nothing runs)."""
    done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_k8s_cronjob():
    (cronjob,) = _documents("k8s-cronjob.yaml")
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["kind"] == "CronJob"
    spec = cronjob["spec"]
    validate_cron_schedule(spec["schedule"].split())
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int)
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    # The submitter pattern: a night's job named after its date (fixed at submission),
    # submitted without waiting, then followed; the pod's status is the job's.
    assert re.search(r"address=http://\S+-head-svc:8265", command)
    assert re.search(
        r'ray job submit --address "\$address" --no-wait --submission-id "\$id"', command
    )
    assert 'id="organtrain-nightly-$night"' in command and "night=$(date -u +%F)" in command
    assert f"{NIGHTLY_COMMAND} --date $night" in command
    assert 'ray job logs --address "$address" --follow "$id"' in command
    assert "*\"Job '$id' succeeded\"*) exit 0" in command  # what `ray job status` says
    # Ray 2.60's `ray job submit` has no --wait option (it waits unless --no-wait).
    assert " --wait" not in command
    check_shell_syntax(container["command"][-1])
    # The head service and the token Secret are the ones KubeRay makes for the shipped
    # RayCluster: <name>-head-svc, and (authOptions: token) a Secret named <name> holding
    # the token under auth_token (KubeRay's raycluster_controller createAuthSecret).
    (raycluster,) = yaml.safe_load_all((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    name = raycluster["metadata"]["name"]
    assert raycluster["spec"]["authOptions"] == {"mode": "token"}
    assert f"address=http://{name}-head-svc:8265" in command
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (secret["name"], secret["key"]) == (name, "auth_token")
    text = (SCHEDULES / "k8s-cronjob.yaml").read_text()
    assert not re.search(r"(?i)aws_secret_access_key|secretKey:|access_key", text)


def test_rayjob():
    (rayjob,) = _documents("rayjob-nightly.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"].get("generateName"), "a fresh RayJob each night"
    spec = rayjob["spec"]
    assert NIGHTLY_COMMAND in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head.get("serviceAccountName"), "storage access from the pod's identity"
    text = (SCHEDULES / "rayjob-nightly.yaml").read_text()
    assert not re.search(r"(?i)aws_secret_access_key|secretKey:|access_key", text)
