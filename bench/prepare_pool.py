"""What versions cost in storage once they share shards (issue 13 item 2: the shard pool).

    .venv/bin/python bench/prepare_pool.py --out bench/prepare_pool_results.json  # ~5 min
    .venv/bin/python bench/prepare_pool.py --images 2000 --versions 3             # smoke test

A tree of N images at 64 px (bench/prepare.py's mosaics of synthetic tiles: distinct files,
7 organ × diagnosis classes) is prepared cold; then, `--versions` times, 1 % more images
arrive and the tree is prepared again (incrementally). Two ways the images arrive:
"all organs" (spread over every class in turn, as bench/prepare.py adds them) and "one
organ" (all in lung's classes, the issue's case). After each prepare the destination is
listed: an object is "written" by that prepare when it is new or its modification time
moved. Measured per version: the bytes written, split into pool shards and the version's
own tables (manifest.parquet, rejected.parquet, dataset.json), against the size of one
version (its shards plus its tables); and the whole dataset folder after the last
version, against one version (the first, and the last). PrepareConfig defaults (1,024
images per shard, PNG, longer side ≤ 256, near-duplicate guard on); local folders.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from prepare import classes, render_pools, timed  # bench/prepare.py

from organtrain.config import PrepareConfig
from organtrain.data.dataset import load_dataset, pool_objects
from organtrain.data.prepare import prepare
from organtrain.storage import LocalStorage

SIZE = 64
TABLES = ("manifest.parquet", "rejected.parquet", "dataset.json")


def write_images(root: Path, pools, start: int, count: int, seed: int, organ: str | None):
    """Images start..start+count-1, over the classes in turn (only `organ`'s if given),
    as 2×2 mosaics of random crops of the classes' rendered tiles."""
    rng = np.random.default_rng([seed, start])
    half = SIZE // 2
    names = [c for c in classes() if organ is None or c[0] == organ]
    for n in range(start, start + count):
        cls = names[n % len(names)]
        pool = pools[cls]
        quads = []
        for tile in rng.choice(len(pool), 4, replace=False):
            y, x = rng.integers(0, SIZE - half + 1, 2)
            quads.append(np.rot90(pool[tile][y : y + half, x : x + half], int(rng.integers(4))))
        image = np.vstack([np.hstack(quads[:2]), np.hstack(quads[2:])])
        folder = root / cls[0] / cls[1]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"img_{n:07d}.png")


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    """key -> (size, mtime) of every object under the dataset's folder."""
    root = store / "datasets" / "bench"
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != "prepare.lock"
    }


def version_bytes(store: Path, version: str) -> dict[str, int]:
    """One version's size: the pool objects it lists (shards and their signature tables)
    and its own tables."""
    index = load_dataset(LocalStorage(store), "bench", version)
    folder = store / "datasets" / "bench" / version
    pool = sum((store / key).stat().st_size for key in pool_objects(index))
    return {
        "shards": pool,
        "tables": sum((folder / name).stat().st_size for name in TABLES),
        "shard_count": len(index.shards),
    }


def written(before: dict, after: dict) -> dict[str, int]:
    """Bytes of the objects new or rewritten since `before`: pool shards, their signature
    tables, the version's own tables."""
    new = {k: v for k, v in after.items() if before.get(k) != v}
    shards = sum(size for k, (size, _) in new.items() if k.endswith(".tfrecord"))
    signatures = sum(size for k, (size, _) in new.items() if k.startswith("shards/")) - shards
    return {"shards": shards, "signatures": signatures, "objects": len(new),
            "tables": sum(s for s, _ in new.values()) - shards - signatures}  # fmt: skip


def scenario(images: int, versions: int, organ: str | None, pools, work: Path) -> dict:
    name = f"one organ ({organ})" if organ else "all organs"
    src, store = work / f"src-{organ}", work / f"store-{organ}"
    write_images(src, pools, 0, images, seed=1, organ=None)
    source, dest = LocalStorage(src), LocalStorage(store)
    cfg = PrepareConfig(source=str(src), dataset="bench")
    first, cold_t = timed(lambda: prepare(source, dest, cfg, progress=False))
    one = version_bytes(store, first.version)
    rows, total_images = [], images
    for n in range(1, versions + 1):
        added = max(1, images // 100)
        write_images(src, pools, total_images, added, seed=100 + n, organ=organ)
        total_images += added
        before = snapshot(store)
        result, t = timed(lambda: prepare(source, dest, cfg, progress=False))
        assert result.created
        w = written(before, snapshot(store))
        size = version_bytes(store, result.version)
        version_total = size["shards"] + size["tables"]
        rows.append({
            "version": n, "images": result.images, "added": added, **t,
            "written_shards": w["shards"], "written_signatures": w["signatures"],
            "written_tables": w["tables"],
            "objects_written": w["objects"], "version_bytes": version_total,
            "version_shards": size["shard_count"],
            "written_pct": round(100 * sum(w[k] for k in ("shards", "signatures", "tables"))
                                 / version_total, 2),
            "written_pool_pct": round(100 * (w["shards"] + w["signatures"]) / size["shards"], 2),
        })  # fmt: skip
        print(json.dumps({"scenario": name, **rows[-1]}), flush=True)
    stored = sum(size for size, _ in snapshot(store).values())
    last = rows[-1]["version_bytes"]
    first_total = one["shards"] + one["tables"]
    return {
        "scenario": name, "images": images, "cold": {**cold_t, **one},
        "versions": rows, "stored_bytes_after": stored,
        "stored_vs_first_version": round(stored / first_total, 3),
        "stored_vs_last_version": round(stored / last, 3),
        "pool_shards_after": sum(1 for p in (store / "datasets" / "bench" / "shards").rglob(
            "*.tfrecord")),
    }  # fmt: skip


def markdown(results: dict) -> str:
    lines = []
    for s in results["scenarios"]:
        c = s["cold"]
        lines += [
            f"**{s['scenario']}**, {s['images']:,} images: cold {c['wall_s']:.1f} s, one "
            f"version {(c['shards'] + c['tables']) / 1e6:.1f} MB ({c['shards'] / 1e6:.1f} MB "
            f"in {c['shard_count']} shards and their signatures, tables "
            f"{c['tables'] / 1e6:.2f} MB)",
            "",
            "| version | images | +images | wall s | written: shards / signatures / tables "
            "(MB) | written ÷ version | pool bytes written ÷ version's | shards listed |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["versions"]:
            lines.append(
                f"| {r['version']} | {r['images']:,} | {r['added']} | {r['wall_s']:.1f} | "
                f"{r['written_shards'] / 1e6:.2f} / {r['written_signatures'] / 1e6:.2f} / "
                f"{r['written_tables'] / 1e6:.2f} | "
                f"{r['written_pct']:.1f} % | {r['written_pool_pct']:.1f} % | "
                f"{r['version_shards']} |"
            )
        lines += [
            "",
            f"After {len(s['versions'])} versions: {s['stored_bytes_after'] / 1e6:.1f} MB "
            f"stored = {s['stored_vs_first_version']}× the first version, "
            f"{s['stored_vs_last_version']}× the last; {s['pool_shards_after']} pool shards.",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    started, load_before = time.time(), os.getloadavg()
    pools = render_pools(SIZE)
    with tempfile.TemporaryDirectory(prefix="bench-pool-", dir=args.work) as tmp:
        scenarios = [
            scenario(args.images, args.versions, organ, pools, Path(tmp))
            for organ in (None, "lung")
        ]
    results = {
        "bench": "bench/prepare_pool.py",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        },
        "settings": f"{SIZE} px; PrepareConfig defaults (max_image_side 256, png, 1024 images "
        "per shard, near-duplicate guard on, 8 threads); local folders",
        "total_s": round(time.time() - started),
        "scenarios": scenarios,
    }
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
