"""Cold vs unchanged `prepare` on synthetic trees (issue 13 item 1: incremental prepare).

    .venv/bin/python bench/prepare.py --out bench/prepare_results.json     # ~20 min, 2 cores
    .venv/bin/python bench/prepare.py --sizes64 1000 3000 --sizes224 500    # smoke test

For each image size (64 px, 224 px) and tree size: a cold prepare (no earlier version:
every image read, hashed, checked, decoded, signed and written to shards), then the same
source prepared again unchanged, 5 times (its reads from the source are counted and must
be 0; the fastest run is used, the median kept), then 1 % more images added (only those
read; the others' rows reused and their images copied from the previous version's shards,
since a new version still writes all its shards until issue 13 item 2). Wall and CPU
seconds (process time: all threads) of the `prepare()` call itself, in one process
(TensorFlow imported once, outside the timings).
A least-squares line, seconds = a + b × images, is fitted per image size and extrapolated to
1,000,000 images.

Trees: rendering every image with organtrain.data.synth costs 7 ms (64 px) to 36 ms
(224 px) of CPU per image, more than preparing it, so each (organ, diagnosis) gets a pool of
rendered tiles and every image of the tree is a 2×2 mosaic of random crops of four pool
tiles, each turned a random right angle: distinct files (no identical bytes; mosaics of
four different crops are rarely near-duplicates of each other: each run records how many
images the guard put in a cluster), with the synthetic tiles' colours and texture, so
decoding, hashing, signing and PNG coding cost what they cost on synth's own images.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from organtrain.config import PrepareConfig
from organtrain.data.prepare import prepare
from organtrain.data.synth import DEFAULT_ORGANS, render_image
from organtrain.storage import LocalStorage

POOL_PER_CLASS = {64: 60, 224: 20}  # rendered tiles per (organ, diagnosis)
UNCHANGED_REPEATS = 5
MILLION = 1_000_000


class CountingSource(LocalStorage):
    """The real local source, counting the files `prepare` reads from it."""

    reads = 0

    def get_bytes(self, key, **kwargs):
        CountingSource.reads += 1
        return super().get_bytes(key, **kwargs)

    def download(self, key, path, **kwargs):
        CountingSource.reads += 1
        return super().download(key, path, **kwargs)


def classes() -> list[tuple[str, str]]:
    return [(o, d) for o, ds in DEFAULT_ORGANS.items() for d in ds]


def render_pools(size: int, seed: int = 0) -> dict[tuple[str, str], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        c: [render_image(*c, rng, size) for _ in range(POOL_PER_CLASS[size])] for c in classes()
    }


def write_images(root: Path, pools, size: int, start: int, count: int, seed: int) -> None:
    """Images start..start+count-1, spread over the classes in turn, as mosaics."""
    rng = np.random.default_rng([seed, start])
    half = size // 2
    names = classes()
    for n in range(start, start + count):
        organ, diagnosis = names[n % len(names)]
        pool = pools[(organ, diagnosis)]
        quads = []
        for tile in rng.choice(len(pool), 4, replace=False):
            y, x = rng.integers(0, size - half + 1, 2)
            crop = pool[tile][y : y + half, x : x + half]
            quads.append(np.rot90(crop, int(rng.integers(4))))
        image = np.vstack([np.hstack(quads[:2]), np.hstack(quads[2:])])
        folder = root / organ / diagnosis
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"img_{n:07d}.png")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


def measure(size: int, images: int, pools, work: Path, quiet: bool = False) -> dict:
    src, store = work / f"src-{size}-{images}", work / f"store-{size}-{images}"
    write_images(src, pools, size, 0, images, seed=size)
    source, dest = CountingSource(src), LocalStorage(store)
    cfg = PrepareConfig(source=str(src), dataset="bench")
    run = lambda: prepare(source, dest, cfg, progress=False)  # noqa: E731

    CountingSource.reads = 0
    cold, cold_t = timed(run)
    cold_t["reads"] = CountingSource.reads
    repeats = []
    for _ in range(UNCHANGED_REPEATS):
        CountingSource.reads = 0
        again, t = timed(run)
        assert again.version == cold.version and not again.created, "not unchanged"
        t["reads"] = CountingSource.reads
        repeats.append(t)
    added_n = max(1, images // 100)
    write_images(src, pools, size, images, added_n, seed=size + 1)
    CountingSource.reads = 0
    added, added_t = timed(run)
    # Every file is in the new version or its rejected table (at small sizes an added image
    # can land in a diagnosis left out for want of a test image).
    assert added.created and added.images + added.rejected == cold.images + cold.rejected + added_n
    added_t.update(reads=CountingSource.reads, images_added=added_n)
    shard_bytes = sum(p.stat().st_size for p in store.rglob("*.tfrecord"))
    manifest = pq.read_table(store / "datasets" / "bench" / added.version / "manifest.parquet")
    clustered = manifest.column("neardup_cluster").drop_null().length()
    shutil.rmtree(src)
    shutil.rmtree(store)
    # The fastest of the repeats: the same work each time, least disturbed by the other
    # jobs on the machine; the median is kept beside it.
    unchanged = {
        "wall_s": min(r["wall_s"] for r in repeats),
        "cpu_s": min(r["cpu_s"] for r in repeats),
        "median_wall_s": statistics.median(r["wall_s"] for r in repeats),
        "reads": max(r["reads"] for r in repeats),
        "runs": repeats,
    }
    row = {
        "px": size, "images": images, "cold": cold_t, "unchanged": unchanged,
        "added_1pct": added_t, "shard_bytes_two_versions": shard_bytes,
        "images_in_neardup_clusters": clustered,
        "speedup_wall": round(cold_t["wall_s"] / unchanged["wall_s"], 1),
        "speedup_cpu": round(cold_t["cpu_s"] / max(unchanged["cpu_s"], 1e-3), 1),
    }  # fmt: skip
    if not quiet:
        print(json.dumps(row), flush=True)
    return row


def fit(rows: list[dict], phase: str, field: str) -> dict:
    """Least squares: seconds = a + b × images; and the line at 1,000,000 images."""
    n = np.array([r["images"] for r in rows], float)
    t = np.array([r[phase][field] for r in rows], float)
    b, a = np.polyfit(n, t, 1)
    residual = t - (a + b * n)
    return {
        "a_s": round(float(a), 3),
        "b_ms_per_image": round(float(b) * 1000, 4),
        "per_million_s": round(float(a + b * MILLION), 1),
        "max_residual_s": round(float(np.abs(residual).max()), 3),
    }


def markdown(results: dict) -> str:
    lines = [
        "| px | images | cold wall / CPU s | unchanged wall / CPU s (best of 5; median wall) | "
        "reads | × (wall) | +1 % wall / CPU s (reads) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        c, u, a = r["cold"], r["unchanged"], r["added_1pct"]
        lines.append(
            f"| {r['px']} | {r['images']:,} | {c['wall_s']:.1f} / {c['cpu_s']:.1f} | "
            f"{u['wall_s']:.2f} / {u['cpu_s']:.2f} ({u['median_wall_s']:.2f}) | {u['reads']} | "
            f"{r['speedup_wall']} | "
            f"{a['wall_s']:.1f} / {a['cpu_s']:.1f} ({a['reads']}) |"
        )
    lines += ["", "| px | phase, clock | fit: a + b·n | at 1,000,000 images |",
              "| --- | --- | --- | ---: |"]  # fmt: skip
    for px, phases in results["fits"].items():
        for phase, f in phases.items():
            lines.append(
                f"| {px} | {phase} | {f['a_s']:.2f} s + {f['b_ms_per_image']:.4f} ms·n "
                f"(max residual {f['max_residual_s']:.2f} s) | {f['per_million_s']:,.1f} s |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes64", type=int, nargs="*", default=[1000, 3000, 10000, 30000])
    parser.add_argument("--sizes224", type=int, nargs="*", default=[500, 1500, 3000])
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    started = time.time()
    load_before = os.getloadavg()
    runs, fits = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=args.work) as tmp:
        for size, sizes in ((64, args.sizes64), (224, args.sizes224)):
            if not sizes:
                continue
            pools = render_pools(size)
            # Modules prepare loads on first use (faiss, Pillow's codecs), outside the timings.
            measure(size, 100, pools, Path(tmp), quiet=True)
            rows = [measure(size, n, pools, Path(tmp)) for n in sorted(sizes)]
            runs += rows
            if len(rows) >= 2:
                fits[f"{size}px"] = {
                    f"{phase} {clock}": fit(rows, phase, f"{clock}_s")
                    for phase in ("cold", "unchanged")
                    for clock in ("wall", "cpu")
                }
    results = {
        "bench": "bench/prepare.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        },
        "settings": "PrepareConfig defaults (max_image_side 256, png, 1024 images per shard, "
        "near-duplicate guard on, 8 threads); local folder source and destination",
        "total_s": round(time.time() - started),
        "runs": runs,
        "fits": fits,
    }
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
