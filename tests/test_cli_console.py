"""What `organtrain` shows on the terminal (issue #17): quiet by default, more with -v.

The slow test runs `organtrain demo` as a user would, on a tiny synthetic data set, and
matches its output against the expected outline; the others check the parts that make it
quiet (organtrain.console) without starting TensorFlow or Ray.
"""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from organtrain import console
from organtrain.cli import _parser, main
from organtrain.data.manifest import read_parquet

REPO = Path(__file__).resolve().parents[1]

# Lines that must never show without -vv: TensorFlow's start-up log, Ray's token notice,
# boto's credentials message, a traceback.
NOISE = [
    re.compile(p)
    for p in (
        r"oneDNN", r"absl::InitializeLog", r"cpu_feature_guard", r"^[IWE]\d{4} ",
        r"Token authentication", r"Found credentials", r"Traceback", r"gcs_client",
    )
]  # fmt: skip
DEMO_OVERRIDES = {
    "synth.organs": {"colon": ["adenocarcinoma", "benign"], "lung": ["adenocarcinoma", "benign"]},
    "synth.images_per_diagnosis": 16,
    "synth.image_size": 32,
    "prepare.max_image_side": 32,
    "prepare.images_per_shard": 16,
    "prepare.min_images_per_diagnosis": 5,
    "prepare.test_fraction": 0.25,
    "prepare.val_fraction": 0.25,
    "input.image_size": 32,
    "input.batch_size": 4,
    "model.filters": [8, 16],
    "train.epochs": 2,
    "search.samples": 1,
    "search.space": {"train.learning_rate": {"loguniform": [1e-3, 4e-3]}},
    "resources.local_cpus": 2,
}
# The outline of a first demo run, in order; `{}` stands for a duration.
FIRST_RUN = [
    r"synth: 64 images under demo-output/source \({}\)",
    r"prepare: dataset demo version \w+ \(written\): 64 images in 2 organ\(s\), "
    r"0 file\(s\) rejected \({}\)",
    r"  .*/demo-output/store/datasets/demo/\w+",
    r"starting a local Ray \(set RAY_ADDRESS or --address to use a cluster\)",
    r"sweep demo: 2 of 2 organ\(s\) finished \({}\)",
    r"  colon: simple_cnn test accuracy [\d.]+, macro F1 [\d.]+ on \d+ images "
    r"\(best of 1 trials, 0 stopped early; {}\)",
    r"  lung: simple_cnn .*; {}\)",
    r"  results: .*/demo-output/store/runs/demo",
    r"report: .*/demo-output/store/runs/demo/report\.html",
]
DURATION = r"\d+\.\d s|\d+ min \d\d s|\d+ h \d\d min"


def demo(cwd: Path, *flags: str, progress: bool = True) -> list[str]:
    """`organtrain [flags] demo` in `cwd`; what a terminal shows at the end, one entry a
    line (a progress bar's last state for the text it redrew with carriage returns)."""
    sets = [a for k, v in DEMO_OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    command = [sys.executable, "-m", "organtrain", *flags, "demo",
               *([] if progress else ["--no-progress"]),
               "--config", str(REPO / "jobs/demo.yaml"), *sets]  # fmt: skip
    done = subprocess.run(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600, env=_without_ray_address(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    return [line.split("\r")[-1] for line in done.stdout.rstrip("\n").split("\n")]


def _without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def assert_outline(lines: list[str], outline: list[str]) -> None:
    """Each pattern matches a whole line, in this order (other lines may come between)."""
    rest = iter(lines)
    for pattern in outline:
        expected = re.compile(pattern.replace("{}", f"(?:{DURATION})"))
        found = any(expected.fullmatch(line) for line in rest)
        assert found, f"no line matching {pattern!r} (in order) in:\n" + "\n".join(lines)


def assert_no_noise(lines: list[str]) -> None:
    noisy = [line for line in lines if any(p.search(line) for p in NOISE)]
    assert not noisy, noisy


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A user's first demo run, progress bars on: (its folder, what the terminal shows)."""
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, demo(cwd)


@pytest.fixture(scope="module")
def reruns(first_run) -> tuple[list[str], list[str]]:
    """The same command twice more on the finished run, without bars: with -v, without."""
    cwd, _ = first_run
    return demo(cwd, "-v", progress=False), demo(cwd, progress=False)


@pytest.mark.slow  # a demo: synth, prepare, a local Ray, 2 organs' searches (~1-2 min)
def test_a_demo_run_shows_one_line_per_stage_and_no_noise(first_run):
    _, lines = first_run
    assert_outline(lines, FIRST_RUN)
    assert_no_noise(lines)
    # Progress bars on the long work, ending full: the images, the shards, the trials.
    bars = [line for line in lines if re.search(r"\d+%\|", line)]
    assert any(line.startswith("synth: 100%") for line in bars), lines
    sweep_bar = [line for line in bars if line.startswith("sweep:")]
    assert sweep_bar and "2/2 [" in sweep_bar[-1] and "2/2 organs done" in sweep_bar[-1], bars
    others = [line for line in lines if line not in bars and line.strip()]
    assert len(others) <= len(FIRST_RUN) + 1, "\n".join(lines)  # + a warning at most


@pytest.mark.slow
def test_an_organs_seconds_agree_in_result_summary_and_console(first_run):
    """result.json used to record the evaluation's 4 s where summary.parquet had the
    organ's 144 s: both are the organ's wall time now, and the console shows it."""
    cwd, lines = first_run
    for organ, (row, result) in organ_records(cwd).items():
        assert result["seconds"] == row["seconds"]
        search = result["search"]
        # Tune's fit < the organ's start of evaluation < the organ's whole time.
        assert 0 < search["search_seconds"] < search["seconds_before_evaluation"]
        assert search["seconds_before_evaluation"] < result["seconds"]
        assert_console_shows(lines, organ, row["seconds"])


@pytest.mark.slow
def test_verbose_shows_more_and_a_resumed_run_keeps_its_seconds(first_run, reruns):
    cwd, _ = first_run
    verbose, quiet = reruns
    assert_no_noise(quiet)
    assert_no_noise(verbose)
    assert "already finished in run demo: colon, lung" in quiet  # a notice: shown anyway
    assert len(quiet) <= 10, "\n".join(quiet)
    # -v adds lines and takes none away (durations aside).
    same = lambda lines: [re.sub(DURATION, "…", line) for line in lines]  # noqa: E731
    assert set(same(quiet)) <= set(same(verbose))
    assert len(verbose) > len(quiet) + 2, "\n".join(verbose)
    assert "  colon: adenocarcinoma, benign" in verbose  # prepare's organs, with -v only
    assert "  colon: adenocarcinoma, benign" not in quiet
    # The finished organs' rows were rebuilt from result.json: the same seconds.
    for organ, (row, result) in organ_records(cwd).items():
        assert row["seconds"] == result["seconds"]
        for lines in reruns:
            assert_console_shows(lines, organ, row["seconds"])


def organ_records(cwd: Path) -> dict[str, tuple[dict, dict]]:
    """organ -> (its summary.parquet row, its result.json)."""
    run = cwd / "demo-output/store/runs/demo"
    rows = read_parquet((run / "summary.parquet").read_bytes()).to_pylist()
    return {r["organ"]: (r, json.loads((run / r["organ"] / "result.json").read_text()))
            for r in rows}  # fmt: skip


def assert_console_shows(lines: list[str], organ: str, seconds: float) -> None:
    (line,) = [x for x in lines if x.startswith(f"  {organ}: simple_cnn")]
    assert line.endswith(f"; {console.duration(seconds)})"), (line, seconds)


def write_package(root: Path, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(body))


NATIVE = """
    import logging, os, warnings
    os.write(2, b"I0000 native start-up line\\n")  # as a C++ library writes, on fd 2
    warnings.warn("a warning of the package's own")
    logging.getLogger("organtrain.noisy").warning("a warning logged while it loads")
"""


def test_a_quiet_import_mutes_native_output_and_keeps_python_warnings(tmp_path):
    """In a process of its own, as the command runs: stderr is the terminal's (fd 2)."""
    write_package(tmp_path, "noisy_pkg", NATIVE)
    script = textwrap.dedent("""
        import logging, sys
        from organtrain import console
        with console.configured(0):
            ours = logging.getLogger().handlers[-1]
            sys.meta_path.insert(0, console._QuietImport("noisy_pkg", ours))
            import noisy_pkg
            logging.getLogger("organtrain").warning("a warning after the import")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "native start-up line" not in done.stderr
    assert "UserWarning: a warning of the package's own" in done.stderr
    assert "a warning logged while it loads" in done.stderr
    assert "a warning after the import" in done.stderr


def test_a_failed_quiet_import_shows_what_it_wrote(tmp_path, monkeypatch, capfd):
    write_package(tmp_path, "broken_pkg", NATIVE + "    raise ImportError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = console._QuietImport("broken_pkg", logging.StreamHandler())
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    with pytest.raises(ImportError, match="broken"), pytest.warns(UserWarning):
        import broken_pkg  # noqa: F401
    assert "I0000 native start-up line" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("argv", "verbosity"),
    [
        (["status", "r"], 0),
        (["-v", "status", "r"], 1),
        (["status", "r", "-v"], 1),
        (["-vv", "status", "r"], 2),
        (["synth", "--out", "x", "--verbose"], 1),
        (["models", "list", "-v"], 1),
    ],
)
def test_verbose_flag_before_or_after_the_command(argv, verbosity):
    assert _parser().parse_args(argv).verbose == verbosity


def test_a_command_leaves_logging_as_it_found_it(tmp_path, capsys):
    root, ours = logging.getLogger(), logging.getLogger("organtrain")
    before = (root.level, ours.level, list(root.handlers), list(sys.meta_path))
    assert main(["status", "no-such-run", "--storage", str(tmp_path)]) == 2
    assert "organtrain: error: no run 'no-such-run'" in capsys.readouterr().err
    assert (root.level, ours.level, list(root.handlers), list(sys.meta_path)) == before


def test_notices_show_by_default_and_details_with_v(capsys):
    log = logging.getLogger("organtrain.test_console")
    for verbosity, shown in ((0, ["a notice", "a warning"]),
                             (1, ["a detail", "a notice", "a warning"])):  # fmt: skip
        with console.configured(verbosity):
            log.info("a detail")
            console.notice(log, "a notice")
            log.warning("a warning")
            logging.getLogger("botocore.credentials").info("Found credentials in env")
        assert capsys.readouterr().err.splitlines() == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(4.14, "4.1 s"), (59.94, "59.9 s"), (130.2, "2 min 10 s"), (3899, "1 h 04 min")],
)
def test_durations_read_as_a_person_says_them(seconds, shown):
    assert console.duration(seconds) == shown
