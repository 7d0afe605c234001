"""`organtrain prepare` on a 2-node local Ray cluster against threads on this machine
(issue 13 item 5: prepare on the cluster).

    .venv/bin/python bench/prepare_cluster.py --out bench/prepare_cluster_results.json
    .venv/bin/python bench/prepare_cluster.py --images 300 --repeats 1     # smoke test

One tree of 64-px mosaics (bench/prepare.py's builder) is prepared cold, each run into a
fresh local destination, by the command a user types, timed from outside (wall seconds of
the whole process: Python and TensorFlow start-up, Ray connection and worker start-up
included):

- `threads`: `organtrain prepare SRC --dest D` (prepare.workers = 2, this machine's cores);
- `ray`: `organtrain prepare SRC --dest D --address A` on test_multinode's local cluster:
  a head with no CPUs and two 1-CPU worker nodes, each its own `ray start`.

Every run must give the same version. On one machine the two worker nodes share its
cores, so this measures what the cluster path costs over threads (task round trips, the
images carried back to the driver and out to the shard tasks, worker start-up), not a
speed-up; a speed-up needs nodes with cores of their own.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import contextlib
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from prepare import render_pools, write_images  # bench/prepare.py
from test_multinode import LocalCluster, _clean_env  # a head and two 1-CPU workers

SIZE = 64
SETTINGS = ["--set", "prepare.dataset=bench", "--set", "prepare.workers=2"]
VERSION = re.compile(r"version (\w+) \(written\)")
TASKS = re.compile(r"(\d+) Ray task\(s\) on (\d+) node\(s\)")


def run_prepare(src: Path, dest: Path, env: dict, *extra: str) -> dict:
    command = [sys.executable, "-m", "organtrain", "prepare", str(src), "--dest", str(dest),
               "--no-progress", *SETTINGS, *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"prepare failed:\n{done.stderr[-3000:]}")
    row = {"wall_s": round(wall, 2), "version": VERSION.search(done.stdout).group(1)}
    if tasks := TASKS.search(done.stdout):
        row.update(tasks=int(tasks.group(1)), nodes=int(tasks.group(2)))
    shutil.rmtree(dest)
    return row


def measure(images: int, repeats: int, work: Path) -> dict:
    src = work / "src"
    write_images(src, render_pools(SIZE), SIZE, 0, images, seed=SIZE)
    here = _clean_env()
    threads = [run_prepare(src, work / "dest", here) for _ in range(repeats)]
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="ot-bench-", dir="/tmp")), here)
    try:
        cluster.start()
        env = here | cluster.auth()
        ray = [run_prepare(src, work / "dest", env, "--address", cluster.address)
               for _ in range(repeats)]  # fmt: skip
    finally:
        stop(cluster)
    versions = {r["version"] for r in threads + ray}
    assert len(versions) == 1, f"the runs gave different versions: {versions}"
    best = {name: min(r["wall_s"] for r in rows) for name, rows in (("threads", threads),
                                                                     ("ray", ray))}  # fmt: skip
    return {
        "images": images, "px": SIZE, "threads": threads, "ray": ray, "best_wall_s": best,
        "ray_over_threads": round(best["ray"] / best["threads"], 2),
        "extra_ms_per_image": round((best["ray"] - best["threads"]) / images * 1000, 2),
    }  # fmt: skip


def stop(cluster: LocalCluster) -> None:
    """Its nodes by their own process ids (never `ray stop`: other Rays on the machine)."""
    cluster.stop()
    for pid in cluster.processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cluster.root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest kept")
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="organtrain-bench-") as work:
        row = measure(args.images, args.repeats, Path(work))
    row["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "load_avg_after": os.getloadavg()}  # fmt: skip
    row["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(row, indent=2))
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
