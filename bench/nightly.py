"""A no-change `organtrain nightly` on synthetic trees (issue 13: "a no-change `nightly`
under 60 s at 30,000 images").

    .venv/bin/python bench/nightly.py --out bench/nightly_results.json   # ~10 min, 2 cores
    .venv/bin/python bench/nightly.py --sizes 300                        # smoke test, < 2 min

Per tree size (64 px images, bench/prepare.py's mosaics of synthetic tiles: 3 organs, 2-3
diagnoses each, distinct files):

1. night 1 (`organtrain nightly` in a subprocess) prepares the tree cold and gives every
   organ a champion, as cheaply as the real path allows: a one-block CNN on 16 px inputs,
   1 epoch, 1 trial. Only its total is recorded; the point is the nights after it.
2. night 2, the measured one: the same source, unchanged, a new `--date`, run as a user
   runs it: `organtrain nightly --config ... --date ... -v` in a subprocess. Its wall time
   is the whole command (Python and library start-up included); its CPU time is the
   child's (user + system, all threads). Each line it logs is stamped on arrival, so the
   gaps between its stage lines say where the time went.
3. night 3, the breakdown: another unchanged night, by the `nightly()` function in this
   process (modules imported beforehand), with wall and CPU time per phase (prepare,
   fingerprints, decisions and history, report) and the reads and
   writes it makes in the storage and the source, by kind of object. A no-change night
   should read no shard and no image, and train nothing.

A least-squares line, seconds = a + b × images, is fitted to night 2's wall and CPU time
and night 3's phases, and extrapolated to 1,000,000 images (as bench/prepare.py does).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import collections
import contextlib
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from prepare import fit, render_pools, timed, write_images  # bench/prepare.py

import organtrain.data.prepare
import organtrain.report.build
from organtrain import nightly as nightly_module
from organtrain import registry
from organtrain.config import load_config
from organtrain.data.manifest import read_parquet
from organtrain.storage import LocalStorage

PX = 64
NIGHTS = ("2026-01-01", "2026-01-02", "2026-01-03")  # first, measured, breakdown
PHASE_COLUMNS = ("prepare", "fingerprints", "decide and append history", "report")

# The cheapest night 1 that still runs the real path: prepare as a lab would (shards at the
# tree's own 64 px), a model that trains in seconds.
JOB = {
    "name": "bench-nightly",
    "prepare": {"dataset": "bench", "max_image_side": PX},
    "input": {"image_size": 16, "batch_size": 32, "shuffle_buffer": 256},
    "augment": {"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                "zoom_range": 0, "brightness_range": None, "horizontal_flip": False,
                "vertical_flip": False},
    "model": {"name": "simple_cnn", "filters": [8], "dense_units": 0},
    "train": {"epochs": 1, "early_stopping_patience": 0},
    "search": {"samples": 1, "scheduler": "fifo"},
    "resources": {"local_cpus": 2},
}  # fmt: skip


def write_job(work: Path, src: Path, store: Path) -> Path:
    job = {**JOB, "storage": {"uri": str(store)},
           "prepare": {**JOB["prepare"], "source": str(src)},
           "input": {**JOB["input"], "cache_dir": str(work / "shard-cache")}}  # fmt: skip
    path = work / "nightly.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_command(job: Path, night: str) -> dict:
    """`organtrain nightly` as a user runs it; its lines stamped as they arrive."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "organtrain", "nightly", "--config", str(job),
               "--date", night, "--no-progress", "-v"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = [(round(time.perf_counter() - started, 2), line.rstrip()) for line in child.stdout]
    child.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if child.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"organtrain nightly --date {night} exited {child.returncode}:\n{tail}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "lines": lines}


class Phases:
    """Wall and CPU seconds per named phase, summed over calls; nested phases are counted in
    their own row and in their caller's."""

    def __init__(self):
        self.times = collections.defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})

    def wrap(self, owner, name: str, phase: str):
        original = getattr(owner, name)

        def timed_call(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                row = self.times[phase]
                row["wall_s"] += time.perf_counter() - wall
                row["cpu_s"] += time.process_time() - cpu
                row["calls"] += 1

        return patched(owner, name, timed_call)

    def rows(self) -> dict:
        return {p: {k: round(v, 3) for k, v in row.items()} for p, row in self.times.items()}


class Accesses:
    """Objects read and written through LocalStorage (the store and the source), by kind."""

    def __init__(self):
        self.counts = collections.Counter()

    def kind(self, storage, key: str) -> str:
        if key.endswith(".tfrecord"):
            return "shard"
        if key.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")):
            return "image"
        return key.rsplit("/", 1)[-1]

    def wrap(self, name: str, verb: str):
        original = getattr(LocalStorage, name)
        counts = self.counts

        def counted(storage, key="", *args, **kwargs):
            what = "(listing)" if verb == "list" else self.kind(storage, key)
            counts[f"{verb} {what}"] += 1
            return original(storage, key, *args, **kwargs)

        return patched(LocalStorage, name, counted)


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_in_process(job: Path, night: str) -> dict:
    """One night by `nightly()`, with its phases timed and its storage accesses counted."""
    cfg = load_config(job, [])
    phases, accesses = Phases(), Accesses()
    with contextlib.ExitStack() as stack:
        for owner, name, phase in (
            (organtrain.data.prepare, "prepare", "prepare"),
            (nightly_module, "load_dataset", "load dataset index"),
            (nightly_module, "_tonights_fingerprints", "fingerprints"),
            (nightly_module, "fingerprints", "fingerprints from the manifest"),
            (nightly_module, "_last_nights", "last nights (history)"),
            (registry, "champion", "champions"),
            (nightly_module, "_train", "train"),
            (nightly_module, "decide_night", "decide and append history"),
            (nightly_module, "_append_history", "append history"),
            (nightly_module, "_report", "report"),
        ):
            stack.enter_context(phases.wrap(owner, name, phase))
        for name, verb in (("get_bytes", "read"), ("download", "read"), ("put_bytes", "write"),
                           ("put_file", "write"), ("put_if_absent", "write"), ("path", "path"),
                           ("list", "list"), ("list_checked", "list")):  # fmt: skip
            stack.enter_context(accesses.wrap(name, verb))
        night_date = datetime.date.fromisoformat(night)
        outcome, total = timed(
            lambda: nightly_module.nightly(cfg, night=night_date, progress=False)
        )
    assert not any(d.trained or d.changed for d in outcome.decisions), "the night was not idle"
    return {**total, "phases": phases.rows(), "accesses": dict(sorted(accesses.counts.items()))}


def night_rows(store: Path, night: str) -> list[dict]:
    history = read_parquet(LocalStorage(store).get_bytes(nightly_module.HISTORY)).to_pylist()
    return [r for r in history if r["night"] == night]


def measure(images: int, pools, work: Path) -> dict:
    work = work / f"n{images}"
    src, store = work / "src", work / "store"
    (_, tree_t) = timed(lambda: write_images(src, pools, PX, 0, images, seed=PX))
    job = write_job(work, src, store)
    first = run_command(job, NIGHTS[0])
    rows = night_rows(store, NIGHTS[0])
    assert rows and all(r["promoted"] for r in rows), f"night 1 left an organ unpromoted: {rows}"
    second = run_command(job, NIGHTS[1])
    rows = night_rows(store, NIGHTS[1])
    assert rows and not any(r["changed"] or r["trained"] for r in rows), rows
    third = run_in_process(job, NIGHTS[2])
    shutil.rmtree(work)
    row = {
        "images": images, "organs": len(rows), "tree_s": tree_t["wall_s"],
        "first_night": {k: first[k] for k in ("wall_s", "cpu_s")},
        "no_change_command": second, "no_change_in_process": third,
    }  # fmt: skip
    summary = {k: v for k, v in row.items() if k != "no_change_command"}
    print(json.dumps({**summary, "no_change_command": {k: second[k] for k in ("wall_s", "cpu_s")}}),
          flush=True)  # fmt: skip
    return row


def fits(rows: list[dict]) -> dict:
    flat = [
        {"images": r["images"], "command": r["no_change_command"],
         **{f"phase {p}": t for p, t in r["no_change_in_process"]["phases"].items()},
         "in-process total": r["no_change_in_process"]}
        for r in rows
    ]  # fmt: skip
    phases = ["command", "in-process total", *(f"phase {p}" for p in PHASE_COLUMNS)]
    phases = [k for k in phases if all(k in f for f in flat)]
    return {f"{p} {clock}": fit(flat, p, f"{clock}_s") for p in phases for clock in ("wall", "cpu")}


def markdown(results: dict) -> str:
    lines = [
        "| images | night 1 wall / CPU s | no-change command wall / CPU s | in-process wall / "
        "CPU s | prepare | fingerprints | decide + history | report | reads (store + source) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["runs"]:
        first, command, inside = r["first_night"], r["no_change_command"], r["no_change_in_process"]
        phases = [inside["phases"].get(name, {}).get("wall_s", 0.0) for name in PHASE_COLUMNS]
        reads = ", ".join(f"{n} {k[5:]}" for k, n in inside["accesses"].items() if k[:4] == "read")
        lines.append(
            f"| {r['images']:,} | {first['wall_s']:.0f} / {first['cpu_s']:.0f} | "
            f"{command['wall_s']:.1f} / {command['cpu_s']:.1f} | "
            f"{inside['wall_s']:.2f} / {inside['cpu_s']:.2f} | "
            + " | ".join(f"{t:.2f}" for t in phases)
            + f" | {reads} |"
        )
    if results["fits"]:
        lines += ["", "| what, clock | fit: a + b·n | at 1,000,000 images |"]
        lines += ["| --- | --- | ---: |"]
        for what, f in results["fits"].items():
            lines.append(
                f"| {what} | {f['a_s']:.2f} s + {f['b_ms_per_image']:.4f} ms·n "
                f"(max residual {f['max_residual_s']:.2f} s) | {f['per_million_s']:,.1f} s |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000, 30000])
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-nightly-", dir=args.work) as tmp:
        pools = render_pools(PX)
        runs = [measure(n, pools, Path(tmp)) for n in sorted(args.sizes)]
    results = {
        "bench": "bench/nightly.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        },
        "settings": f"{PX} px tree, local folder source and storage; job: {json.dumps(JOB)}",
        "total_s": round(time.time() - started),
        "runs": runs,
        "fits": fits(runs) if len(runs) >= 2 else {},
    }
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
