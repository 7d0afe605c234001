"""How long a trial takes to open its organ's shards, first and later trials on one node.

Each trial is its own process (as Ray worker processes are): it loads the dataset index and
calls `shard_files` for one organ's training split, timing that call and counting the bytes
the process read meanwhile (/proc/self/io `rchar`, page-cache hits included). The first
trial downloads (S3) or verifies (local folder); what the later ones pay is what issue 18's
"shard verification once per node" is about.

    python bench/shard_cache.py                 # local folder, 320 MB of shards
    python bench/shard_cache.py --s3            # also through a SeaweedFS server + node cache
    python bench/shard_cache.py --mb 640 --trials 4
    python bench/shard_cache.py --cold          # shards evicted from the page cache first

`--cold` asks the kernel to drop the shard files (and only them) from the page cache before
each trial, as on a node whose organ's shards do not stay in memory next to training.

The shards hold random bytes in TFRecord framing: opening a shard does not decode it, so
what is in the records does not change the figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET, VERSION, ORGAN = "bench", "v1", "lung"
RECORD_BYTES = 64 << 10  # about one 224-px PNG


def write_dataset(root: Path, total_mb: int, shards: int) -> None:
    """`shards` TFRecord files of random records, and the index that lists their sha256."""
    import tensorflow as tf

    from organtrain.data.dataset import INDEX, LATEST, DatasetIndex, OrganIndex, ShardEntry
    from organtrain.storage import LocalStorage, join_key, sha256_file

    store = LocalStorage(root)
    prefix = f"datasets/{DATASET}/{VERSION}"
    records = max(1, total_mb * (1 << 20) // shards // RECORD_BYTES)
    entries = []
    for n in range(shards):
        key = f"shards/{ORGAN}/train-{n:05d}-of-{shards:05d}.tfrecord"
        path = store.path(join_key(prefix, key))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for _ in range(records):
                writer.write(os.urandom(RECORD_BYTES))
        entries.append(
            ShardEntry(key, ORGAN, "train", records, path.stat().st_size, sha256_file(path))
        )
    organ = OrganIndex(diagnoses=["a"], counts={"train": {"a": records * shards}})
    index = DatasetIndex(DATASET, VERSION, "2026-12-01T00:00:00Z", "synthetic", {},
                         {ORGAN: organ}, entries)  # fmt: skip
    store.put_bytes(join_key(prefix, INDEX), index.to_json())
    store.put_bytes(f"datasets/{DATASET}/{LATEST}", json.dumps({"version": VERSION}).encode())
    # Written long enough ago that no verification could share a file-time tick with it.
    old = time.time_ns() - 3600 * 10**9
    for entry in entries:
        os.utime(store.path(join_key(prefix, entry.key)), ns=(old, old))


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def one_trial(store_uri: str) -> dict:
    """What one trial's process does before its pipeline starts: open the organ's shards."""
    from organtrain.data.dataset import load_dataset
    from organtrain.data.pipeline import shard_files
    from organtrain.storage import open_storage

    store = open_storage(store_uri)
    index = load_dataset(store, DATASET, VERSION)
    read_before, started = bytes_read(), time.perf_counter()
    files = shard_files(store, index, ORGAN, "train")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "mib_read": (bytes_read() - read_before) / (1 << 20),
        "mib_of_shards": sum(Path(f).stat().st_size for f in files) / (1 << 20),
    }


def evict(folders: list[Path]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED; needs no root)."""
    for folder in folders:
        for path in folder.rglob("*.tfrecord"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_trials(
    store_uri: str, cache: Path, trials: int, env: dict, cold: list[Path] | None = None
) -> list[dict]:
    env = {**env, "ORGANTRAIN_CACHE_DIR": str(cache)}
    results = []
    for _ in range(trials):
        if cold:
            evict([*cold, cache])
        out = subprocess.run(
            [sys.executable, __file__, "--trial", store_uri],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def upload(local_root: Path, s3_uri: str) -> None:
    from organtrain.storage import LocalStorage, open_storage

    source, dest = LocalStorage(local_root), open_storage(s3_uri)
    for info in source.list(f"datasets/{DATASET}"):
        dest.put_file(info.key, source.path(info.key))


def print_table(name: str, results: list[dict]) -> None:
    print(f"\n{name}")
    print("| trial | open time | MiB read | MiB of shards |")
    print("| ---: | ---: | ---: | ---: |")
    for n, r in enumerate(results, 1):
        print(f"| {n} | {r['seconds']:.3f} s | {r['mib_read']:.1f} | {r['mib_of_shards']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=320, help="total size of the organ's shards")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3, help="trials, one process each")
    parser.add_argument("--s3", action="store_true", help="also from SeaweedFS (S3)")
    parser.add_argument("--cold", action="store_true", help="evict the shards before each trial")
    parser.add_argument("--trial", metavar="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(one_trial(args.trial)))
        return

    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="shard-cache-bench-") as tmp:
        root = Path(tmp, "store")
        write_dataset(root, args.mb, args.shards)
        cold = [root] if args.cold else None
        report = {"local": run_trials(str(root), Path(tmp, "cache-local"), args.trials, env, cold)}
        heat = "cold" if args.cold else "warm"
        print_table(f"local folder, {args.mb} MB in {args.shards} shards, {heat} page cache",
                    report["local"])  # fmt: skip
        if args.s3:
            sys.path.insert(0, str(REPO / "tests"))
            from seaweedfs import ACCESS_KEY, SECRET_KEY, find_weed, start_seaweedfs

            server = start_seaweedfs(find_weed(), Path(tmp, "weed"))
            try:
                s3_env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                          "AWS_ENDPOINT_URL": server.endpoint_url,
                          "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
                os.environ.update(s3_env)
                server.client().create_bucket(Bucket="bench")
                upload(root, "s3://bench/data")
                report["s3"] = run_trials(
                    "s3://bench/data", Path(tmp, "cache-s3"), args.trials, {**env, **s3_env}, cold
                )
                print_table(f"S3 (SeaweedFS) through the node cache, {heat} page cache",
                            report["s3"])  # fmt: skip
            finally:
                server.stop()
    print("\n" + json.dumps(report))


if __name__ == "__main__":
    main()
