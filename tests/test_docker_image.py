"""cluster/Dockerfile and .dockerignore, read as Docker reads them (no Docker daemon here).

Fast: the build's layer order, the dependency list the Dockerfile computes (its own command,
run on this pyproject.toml), and what .dockerignore keeps out of the build context.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip()
    ]


def _copy_sources(arguments: str) -> list[str]:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]
    return words[:-1]  # the last is the destination


def _dependency_install() -> int:
    """Index of the RUN that installs the dependencies (pip install, not --no-deps)."""
    (index,) = [
        i
        for i, (name, arguments) in enumerate(_instructions())
        if name == "RUN" and "pip install" in arguments and "--no-deps" not in arguments
    ]
    return index


def test_dependencies_are_installed_before_the_source_is_copied():
    """A source edit must not rebuild the dependency layer (TensorFlow, CUDA: gigabytes):
    before that RUN only pyproject.toml is copied; the source, and organtrain's own
    install without dependencies, come after it."""
    instructions = _instructions()
    install = _dependency_install()
    copied_before = [
        source
        for name, arguments in instructions[:install]
        if name in {"COPY", "ADD"}
        for source in _copy_sources(arguments)
    ]
    assert copied_before == ["pyproject.toml"]
    copied_after = [
        source
        for name, arguments in instructions[install:]
        if name == "COPY"
        for source in _copy_sources(arguments)
    ]
    assert {"src", "README.md", "jobs"} <= set(copied_after)
    last_name, last_arguments = instructions[-1]
    assert last_name == "RUN" and "pip install" in last_arguments
    assert "--no-deps" in last_arguments


def test_the_dependency_list_is_the_projects_with_the_gpu_and_cluster_extras(tmp_path):
    """The Dockerfile's own command, run by sh as Docker does, on this pyproject.toml."""
    _, arguments = _instructions()[_dependency_install()]
    listing = arguments.split("&&")[0].strip()  # python -c ... >/tmp/requirements.txt
    output = tmp_path / "requirements.txt"
    assert "/tmp/requirements.txt" in listing
    listing = listing.replace("/tmp/requirements.txt", str(output))
    listing = re.sub(r"^python\b", shlex.quote(sys.executable), listing)
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    subprocess.run(["sh", "-c", listing], cwd=tmp_path, check=True, timeout=60)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as in the image
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expected = project["dependencies"] + extras["gpu"] + extras["cluster"]
    assert output.read_text().splitlines() == expected
    assert any(line.startswith("tensorflow[and-cuda]") for line in expected)
    # The head pod serves `ray job submit` (cluster/kuberay): Ray's dashboard, not minimal.
    assert any(line.startswith("ray[default]") for line in expected)


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is an exception "!", regex), with Docker's meaning: `*` and `?`
    stay within one path segment, `**` spans any number of them."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def _ignored(path: str, patterns) -> bool:
    """Docker's rule: the last pattern matching the path, or a folder above it, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for exception, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not exception
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/tensorflow/__init__.py",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "src/organtrain/__pycache__/cli.cpython-311.pyc",
        "src/organtrain.egg-info/PKG-INFO",
        "tests/data/README.md",
        "data/bccd-cells/README.md",
        "logs/organtrain-organtrain-ray-42.out",
        "runs/demo/summary.parquet",
        "bench/RESULTS.md",
        "build/lib/organtrain/cli.py",
    ],
)
def test_dockerignore_keeps_out(path):
    assert _ignored(path, _ignore_patterns())


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    """Every tracked file under what the Dockerfile COPYs reaches the build."""
    patterns = _ignore_patterns()
    sources = [
        source
        for name, arguments in _instructions()
        if name == "COPY"
        for source in _copy_sources(arguments)
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *sources], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "src/organtrain/cli.py" in tracked and "jobs/nightly.yaml" in tracked
    assert not [path for path in tracked if _ignored(path, patterns)]
