"""Organs at once: what each extra organ's search costs the cluster (issue 18).

One synthetic dataset of 12 tiny organs is prepared once. Then, for each organ count
(3, 6, 12 by default), one `organtrain sweep` of that many organs runs in its own
process (which starts its own local Ray), one short trial per organ, while this script
samples the sweep's whole process tree every 0.25 s from /proc:

  tree PSS       proportional set size of every process of the sweep (driver, Ray's
                 daemons, organ controllers, trial workers), summed; PSS splits shared
                 pages between the processes that share them, so the sum is what the
                 tree really occupies (an RSS sum counts shared libraries once per process)
  controller     the peak RSS of each organ's search controller (`ray::OrganSearch`), median
                 over the organs: the fixed cost of an organ outside Ray's trial accounting
  first trial    seconds from the sweep's start to the start of each organ's first trial
                 (trials.parquet), max over the organs: what a waiting organ sees

Growth per extra organ is the slope from the smallest to the largest count.

    python bench/organs.py --out bench/organs_results.json
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinyrun import many_organs_job, write_many_organs  # the tests' organs and job

ORGANS = [f"organ{i:02d}" for i in range(12)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 6, 12])
    parser.add_argument("--cpus", type=int, default=2, help="local Ray CPUs")
    parser.add_argument(
        "--before", type=Path,
        help="also measure the organtrain source tree here (e.g. a worktree of an older "
        "commit), interleaved with this one at each count, on the same dataset",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    from organtrain.cli import main as organtrain

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_many_organs(root / "src", ORGANS[: max(args.counts)])
        job = write_job(root, args.cpus)
        assert organtrain(["prepare", "--config", str(job), "--no-progress"]) == 0
        sources = {"this": None, **({"before": args.before} if args.before else {})}
        for count in args.counts:
            for label, source in sources.items():
                run = {
                    "code": label,
                    "load": os.getloadavg()[0],
                    **measure(job, root, count, source),
                }
                runs.append(run)
                print(json.dumps(run), flush=True)

    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "runs": runs,
        "per_extra_organ": {
            label: growth([r for r in runs if r["code"] == label]) for label in sources
        },
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def growth(runs: list[dict]) -> dict:
    """The slope from the smallest organ count to the largest."""
    first, last = runs[0], runs[-1]
    extra = max(1, last["organs"] - first["organs"])
    return {
        name: round((last[key] - first[key]) / extra, 2)
        for name, key in (("tree_pss_mib", "tree_pss_peak_mib"),
                          ("first_trial_min_s", "first_trial_min_s"),
                          ("sweep_wall_s", "sweep_wall_s"))
    }  # fmt: skip


def write_job(root: Path, cpus: int) -> Path:
    job = many_organs_job(root, search={"samples": 1, "scheduler": "fifo"}, local_cpus=cpus)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def measure(job: Path, root: Path, count: int, source: Path | None) -> dict:
    run_id = f"organs{count}-{'before' if source else 'this'}"
    organs = ORGANS[:count]
    command = [sys.executable, "-m", "organtrain", "sweep", "--config", str(job),
               "--run-id", run_id, "--set", f"search.organs={json.dumps(organs)}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if source:  # ahead of the installed organtrain, in the sweep and its Ray workers
        env["PYTHONPATH"] = str(source.resolve())
    started = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = TreeSampler(process.pid)
    sampler.start()
    _, stderr = process.communicate(timeout=1800)
    sampler.stop()
    wall = time.time() - started
    if process.returncode != 0:
        raise SystemExit(f"sweep of {count} organs failed:\n{stderr.decode()[-3000:]}")

    from organtrain.data.manifest import read_parquet
    from organtrain.storage import LocalStorage

    run = LocalStorage(root / "store").sub(f"runs/{run_id}")
    first_trial, errored = [], 0
    for organ in organs:
        trials = read_parquet(run.get_bytes(f"{organ}/metrics/trials.parquet")).to_pylist()
        first_trial.append(min(t["started"] for t in trials) - started)
        errored += sum(t["status"] == "error" for t in trials)
    controllers = list(sampler.controller_peak_rss.values())
    return {
        "organs": count,
        "sweep_wall_s": round(wall, 1),
        "tree_pss_peak_mib": round(sampler.tree_pss_peak / 2**20),
        "tree_rss_peak_mib": round(sampler.tree_rss_peak / 2**20),
        "controllers_seen": len(controllers),
        "controller_rss_median_mib": round(statistics.median(controllers) / 2**20)
        if controllers
        else None,
        "controller_rss_max_mib": round(max(controllers) / 2**20) if controllers else None,
        "controller_cpu_median_s": round(statistics.median(sampler.controller_cpu_s.values()), 1)
        if controllers
        else None,
        "first_trial_min_s": round(min(first_trial), 1),
        "first_trial_median_s": round(statistics.median(first_trial), 1),
        "first_trial_max_s": round(max(first_trial), 1),
        "trials_errored": errored,
    }


class TreeSampler(threading.Thread):
    """Samples the memory of a process and all its descendants from /proc."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.tree_pss_peak = self.tree_rss_peak = 0
        self.controller_peak_rss: dict[int, int] = {}
        self.controller_cpu_s: dict[int, float] = {}  # user + system, at the last sample
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.is_set():
            pss = rss = 0
            for pid in descendants(self.pid):
                memory = proc_memory(pid)
                if memory is None:
                    continue
                pss += memory["pss"]
                rss += memory["rss"]
                if memory["title"].startswith(("ray::search_organ", "ray::OrganSearch")):
                    peak = self.controller_peak_rss.get(pid, 0)
                    self.controller_peak_rss[pid] = max(peak, memory["rss"])
                    self.controller_cpu_s[pid] = memory["cpu_s"]
            self.tree_pss_peak = max(self.tree_pss_peak, pss)
            self.tree_rss_peak = max(self.tree_rss_peak, rss)
            self._halt.wait(self.every)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def proc_memory(pid: int) -> dict | None:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    fields = {}
    for line in rollup[1:]:
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0), "title": title,
            "cpu_s": cpu_s}  # fmt: skip


if __name__ == "__main__":
    main()
