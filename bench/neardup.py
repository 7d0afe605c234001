"""Near-duplicate signatures (organtrain.data.neardup): recall, false merges, time, memory.

    .venv/bin/python bench/neardup.py --out bench/neardup_results.json   # ~10 min, 2 cores
    .venv/bin/python bench/neardup.py --quick                            # smoke test, ~1 min

Data: the real BCCD cell crops in ../shared/data/bccd-cells (crops of one smear are one
group; pairs across smears are "distinct"), and synthetic tiles written by
organtrain.data.synth (every same-organ pair is distinct). From originals of both, the
transform families an augmenting tool makes (7 other D4 transforms, rotation ±5–25° with
the largest inner rectangle cropped and resized back, JPEG q70, resize 0.5× / 2×, and
combinations). Every image goes through prepare's thumbnail rule (longer side ≤ 256,
LANCZOS) before its signature, as in prepare.

Candidates are compared by the same rule: the smallest threshold (rounded up to 0.01) at
which every family reaches recall 0.95, and the false merges at it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from organtrain.data import neardup as nd
from organtrain.data.synth import write_synthetic_tree

# The copy-making transforms are the near-duplicate tests' own (one definition of what
# an augmenting tool does to an image, measured here and asserted there).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from copies import D4, jpeg, resize, rotate_crop, thumbnail

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd-cells"
SYNTH_ORGANS = {
    "lung": ["adenocarcinoma", "benign", "squamous_cell_carcinoma"],
    "colon": ["adenocarcinoma", "benign"],
    "blood": ["malaria_parasitized", "uninfected"],
}


def families(image: Image.Image, rng: random.Random) -> dict[str, list[Image.Image]]:
    def angle() -> float:
        return rng.uniform(5, 25) * rng.choice([-1, 1])

    out = {
        "d4 (7 others)": [image.transpose(t) for t in D4],
        "rotate ±5–25° + crop": [rotate_crop(image, angle()) for _ in range(2)],
        "jpeg q70": [jpeg(image)],
        "resize 0.5×": [resize(image, 0.5)],
        "resize 2×": [resize(image, 2)],
        "rotate + jpeg": [jpeg(rotate_crop(image, angle()))],
        "flip + rotate + jpeg + 0.5×": [
            resize(jpeg(rotate_crop(image.transpose(rng.choice(D4)), angle())), 0.5)
        ],
    }
    return {name: [thumbnail(i) for i in images] for name, images in out.items()}


# ----------------------------------------------------------------- candidates
# Each maps an RGB array to (levels, dims) float vectors; a pair's distance is the min over
# levels of |a0 − b_l| and |b0 − a_l| (one level: plain Euclidean distance).


def polar_ring_v1(rgb: np.ndarray) -> np.ndarray:
    """The module's signature (int8, elliptic levels)."""
    return nd.decode([nd.signature(rgb)])[0]


def polar_circle(rgb: np.ndarray) -> np.ndarray:
    """The same rings, levels zoomed equally in x and y (the square's zoom at each angle)."""
    square = nd._central_square(nd._luminance(rgb))
    zooms = [math.cos(math.radians(a)) + math.sin(math.radians(a)) for a in nd._LEVEL_ANGLES]
    return np.stack([nd._ring_features(square, z, z) for z in zooms]).astype(np.float32)


def dct_d4(rgb: np.ndarray) -> np.ndarray:
    """pHash-like: 8×8 low DCT block of a 32×32 grey image, symmetrised over D4.

    A flip changes signs of coefficients, a transpose swaps (u, v): |C(u,v)| + |C(v,u)|
    and ||C(u,v)| − |C(v,u)|| are invariant to all 8. Small rotations are not undone.
    """
    grey = Image.fromarray(nd._luminance(rgb), "F").resize((32, 32), Image.Resampling.BOX)
    c = np.abs(dctn(np.asarray(grey), norm="ortho")[:8, :8])
    upper, strict = np.triu_indices(8, 0), np.triu_indices(8, 1)
    v = np.concatenate([(c + c.T)[upper][1:], np.abs(c - c.T)[strict]]) ** 0.5
    return (v / (np.linalg.norm(v) + 1e-9))[None].astype(np.float32)


CANDIDATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "polar-ring-v1 (kept)": polar_ring_v1,
    "polar-circle (isotropic levels)": polar_circle,
    "dct-d4": dct_d4,
}


def pair_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) distances between (n, L, D) and (m, L, D) vectors."""
    n, levels, dims = a.shape
    m = len(b)
    a0, b0 = a[:, 0], b[:, 0]
    a_in_b = 2 - 2 * (a0 @ b.reshape(m * levels, dims).T).reshape(n, m, levels).max(2)
    b_in_a = 2 - 2 * (a.reshape(n * levels, dims) @ b0.T).reshape(n, levels, m).max(1)
    # the vectors are unit length up to int8 rounding (or exactly 0 for blank images)
    return np.sqrt(np.maximum(np.minimum(a_in_b, b_in_a), 0))


# ----------------------------------------------------------------- quality


def load_bccd(limit: int | None) -> tuple[list[Path], np.ndarray]:
    files = sorted(BCCD.glob("blood/*/*/*.jpg"))
    if limit:
        files = random.Random(0).sample(files, limit)
    return files, np.array([f.parent.name for f in files])


def quality(
    candidate: Callable,
    bccd: list[Path],
    smears: np.ndarray,
    synth: list[Path],
    n_orig: int,
    sweep: tuple[float, ...] = (),
) -> dict:
    rng = random.Random(0)
    images = {f: thumbnail(Image.open(f)) for f in [*bccd, *synth]}
    t0 = time.perf_counter()
    vec = {f: candidate(np.asarray(images[f])) for f in images}
    per_image_ms = (time.perf_counter() - t0) / len(images) * 1e3
    positives: dict[str, list[float]] = {}
    originals = [("bccd", f) for f in rng.sample(bccd, n_orig)]
    originals += [("synthetic", f) for f in rng.sample(synth, n_orig)]
    for kind, f in originals:
        for family, copies in families(images[f], rng).items():
            got = np.stack([candidate(np.asarray(c)) for c in copies])
            d = pair_distance_matrix(vec[f][None], got)[0].tolist()
            positives.setdefault(family, []).extend(d)
            positives.setdefault(f"{family} [{kind}]", []).extend(d)
    families_only = {k: np.array(v) for k, v in positives.items() if "[" not in k}
    threshold = math.ceil(max(np.quantile(v, 0.95) for v in families_only.values()) * 100) / 100
    out = {"per_image_ms": per_image_ms, "threshold_for_recall_0.95": threshold}
    for t in sorted({*sweep, threshold, nd.THRESHOLD}):
        out[f"at {t:.2f}"] = {
            "threshold": t,
            "recall": {k: float(np.mean(np.array(v) <= t)) for k, v in positives.items()},
            "bccd": false_merges(np.stack([vec[f] for f in bccd]), smears, t),
            "synthetic": false_merges(
                np.stack([vec[f] for f in synth]),
                np.array([f.parent.parent.name for f in synth]),
                t,
                distinct_within_group=True,
            ),
        }
    return out


def false_merges(
    v: np.ndarray, groups: np.ndarray, t: float, distinct_within_group: bool = False
) -> dict:
    """BCCD: distinct = another smear. Synthetic: groups are organs, same-organ pairs distinct."""
    rows, cols, n_distinct, n_false = [], [], 0, 0
    for start in range(0, len(v), 1000):
        d = pair_distance_matrix(v[start : start + 1000], v)
        i, j = np.nonzero(d <= t)
        i += start
        keep = j > i
        i, j = i[keep], j[keep]
        same = groups[i] == groups[j]
        ii = np.arange(start, min(start + 1000, len(v)))[:, None]
        jj = np.arange(len(v))[None]
        upper = jj > ii
        g_same = groups[ii] == groups[jj]
        if distinct_within_group:
            n_distinct += int((upper & g_same).sum())
            false = same
        else:
            n_distinct += int((upper & ~g_same).sum())
            false = ~same
        n_false += int(false.sum())
        rows += i[false].tolist()
        cols += j[false].tolist()
    # What a split sees: union the false pairs; BCCD over smears (a smear is one group
    # already), synthetic over single images.
    names, node = np.unique(groups, return_inverse=True)
    if distinct_within_group:
        names, node = np.arange(len(v)), np.arange(len(v))
    rows, cols = node[np.array(rows, int)], node[np.array(cols, int)]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    biggest = labels[node] == sizes.argmax()
    return {
        "distinct_pairs": n_distinct,
        "false_pairs": n_false,
        "false_pair_rate": n_false / max(n_distinct, 1),
        "largest_component_nodes": int(sizes.max()),
        "largest_component_images": int(biggest.sum()),
        "components_merged": int((sizes > 1).sum()),
    }


# ----------------------------------------------------------------- scale


def many_signatures(pool_path: str, n: int, seed: int) -> list[bytes]:
    """n signatures from the real ones: copies of the pool, each under its own isometry.

    Copy c is the pool with its 50 ring features permuted and sign-flipped by a random
    signed permutation (the same for every level): distances inside a copy are the real
    ones, so each copy has the real density of near pairs, and copies lie apart from each
    other. Each keeps its image's real second-stage grid.
    """
    pool, grids = np.load(pool_path), np.load(pool_path.replace(".npy", "-grids.npy"))
    rng = np.random.default_rng(seed)
    out: list[bytes] = []
    while len(out) < n:
        signs = rng.choice([-1.0, 1.0], nd.DIMS)
        copy = pool[:, :, rng.permutation(nd.DIMS)] * signs
        q = np.clip(np.round(copy * nd._SCALE), -127, 127).astype(np.int8)
        out += [q[i].tobytes() + grids[i].tobytes() for i in rng.permutation(len(q))]
    return out[:n]


def _in_child(job: str, args: tuple) -> dict:
    """Runs one measurement in a fresh process, so its peak RSS is its own."""
    t0 = time.perf_counter()
    result = JOBS[job](*args)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a spawned
    # child would report its parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(job: str, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_child, (job, args))


def job_signatures(files: list[str]) -> dict:
    images = [np.asarray(thumbnail(Image.open(f))) for f in files]
    t0 = time.perf_counter()
    for image in images:
        nd.signature(image)
    return {"n": len(files), "ms_per_image": (time.perf_counter() - t0) / len(files) * 1e3}


def job_index(pool_path: str, n: int, check: bool) -> dict:
    sigs = many_signatures(pool_path, n, seed=n)
    t0 = time.perf_counter()
    pairs = nd.near_duplicate_pairs(sigs)
    out = {"n": n, "index_seconds": time.perf_counter() - t0, "pairs": len(pairs)}
    if check:
        exact = {(i, j) for i, j in nd.cross_pairs(sigs, sigs) if i < j}
        out["exact_pairs"] = len(exact)
        out["index_recall"] = len(exact & set(pairs)) / max(len(exact), 1)
    return out


def job_cross(pool_path: str, n_a: int, n_b: int) -> dict:
    a, b = many_signatures(pool_path, n_a, seed=1), many_signatures(pool_path, n_b, seed=2)
    t0 = time.perf_counter()
    pairs = nd.cross_pairs(a, b)
    t1 = time.perf_counter()
    closest = nd.closest_cross_pairs(a[:2000], b, 10)
    return {
        "n_a": n_a,
        "n_b": n_b,
        "cross_seconds": t1 - t0,
        "pairs": len(pairs),
        "closest_2000_x_b_seconds": time.perf_counter() - t1,
        "closest_distance": closest[0][2],
    }


JOBS = {"signatures": job_signatures, "index": job_index, "cross": job_cross}


def scale(
    pool_path: str, sizes: list[int], check_up_to: int, cross: tuple[int, int], files: list[str]
) -> dict:
    out = {"signatures": measure("signatures", files)}
    out["index"] = [measure("index", pool_path, n, n <= check_up_to) for n in sizes]
    ns = np.array([r["n"] for r in out["index"]], float)
    secs = np.array([r["index_seconds"] for r in out["index"]])
    out["index_growth_exponent"] = float(np.polyfit(np.log(ns), np.log(secs), 1)[0])
    out["cross"] = measure("cross", pool_path, *cross)
    return out


# ----------------------------------------------------------------- main


# ----------------------------------------------------------------- two stages


SETTINGS = {  # second-stage thresholds compared: (larger images, two small ones, small px)
    "first stage only": None,
    "correlation ≥ 0.93": (0.93, 0.93, 0),
    "correlation ≥ 0.95": (0.95, 0.95, 0),
    "correlation ≥ 0.97": (0.97, 0.97, 0),
    "≥ 0.93, ≥ 0.98 when both under 48 px": (0.93, 0.98, 48),
    "kept: ≥ 0.93, ≥ 0.98 when both under 64 px": (0.93, 0.98, 64),
}


def two_stage(bccd: list[Path], smears: np.ndarray, synth: list[Path], n_orig: int) -> dict:
    """The kept pair definition: ring distance ≤ RING_THRESHOLD (first stage), then the
    aligned colour correlation (second stage, aligned.py) at the SETTINGS compared."""
    rng = random.Random(0)
    images = {f: thumbnail(Image.open(f)) for f in [*bccd, *synth]}
    t0 = time.perf_counter()
    sigs = {f: nd.signature(np.asarray(images[f])) for f in images}
    per_image_ms = (time.perf_counter() - t0) / len(images) * 1e3

    def stages(a: list[bytes], b: list[bytes]) -> np.ndarray:
        """(k, 3): ring distance, correlation, the larger of the shorter sides."""
        ring = nd._pair_distances(nd.decode(a), nd.decode(b))
        return np.column_stack([ring, *nd._second_stage(a, b)])

    positives: dict[str, list[np.ndarray]] = {}
    originals = [("bccd", f) for f in rng.sample(bccd, n_orig)]
    originals += [("synthetic", f) for f in rng.sample(synth, n_orig)]
    for kind, f in originals:
        for family, copies in families(images[f], rng).items():
            got = [nd.signature(np.asarray(c)) for c in copies]
            measured = stages([sigs[f]] * len(got), got)
            for key in (family, f"{family} [{kind}]"):
                positives.setdefault(key, []).append(measured)
    t0 = time.perf_counter()
    false = {}
    for name, pool, groups, within in (
        ("bccd", bccd, smears, False),
        ("synthetic", synth, np.array([f.parent.parent.name for f in synth]), True),
    ):
        found = [sigs[f] for f in pool]
        pairs, distinct = _ring_candidates(found, groups, distinct_within=within)
        measured = stages([found[i] for i in pairs[:, 0]], [found[j] for j in pairs[:, 1]])
        false[name] = (pairs, measured, distinct, groups, within)
    out = {
        "per_image_ms": per_image_ms,
        "first_stage_threshold": nd.RING_THRESHOLD,
        "small_side_px": nd.SMALL_SIDE,
        "both_stages_on_first_stage_false_pairs_s": time.perf_counter() - t0,
    }
    for label, setting in SETTINGS.items():
        at = {
            "recall": {
                k: float(_passes(np.concatenate(v), setting).mean()) for k, v in positives.items()
            }
        }
        for name, (pairs, measured, distinct, groups, within) in false.items():
            at[name] = _components(pairs[_passes(measured, setting)], distinct, groups, within)
        out[label] = at
    return out


def _passes(measured: np.ndarray, setting: tuple[float, float, int] | None) -> np.ndarray:
    ring, correlation, side = measured.T
    first = ring <= nd.RING_THRESHOLD
    if setting is None:
        return first
    least = np.where(side < setting[2], setting[1], setting[0])
    return first & (correlation >= least)


def _ring_candidates(sigs: list[bytes], groups: np.ndarray, distinct_within: bool):
    """Pairs (i < j) that pass the first stage and are distinct images: for BCCD across
    smears, for synthetic tiles within an organ."""
    pairs = np.array(nd.cross_pairs_first_stage(sigs, sigs), dtype=np.int64).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    same = groups[pairs[:, 0]] == groups[pairs[:, 1]]
    pairs = pairs[same] if distinct_within else pairs[~same]
    counts = np.unique(groups, return_counts=True)[1]
    within = int((counts * (counts - 1) // 2).sum())
    distinct = within if distinct_within else len(groups) * (len(groups) - 1) // 2 - within
    return pairs, distinct


def _components(pairs: np.ndarray, distinct: int, groups: np.ndarray, per_image: bool) -> dict:
    names, node = np.unique(groups, return_inverse=True)
    if per_image:
        names, node = np.arange(len(groups)), np.arange(len(groups))
    graph = coo_matrix(
        (np.ones(len(pairs)), (node[pairs[:, 0]], node[pairs[:, 1]])),
        shape=(len(names), len(names)),
    )
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    return {
        "false_pairs": len(pairs),
        "false_pair_rate": len(pairs) / max(distinct, 1),
        "largest_component_nodes": int(sizes.max()),
        "largest_component_images": int((labels[node] == sizes.argmax()).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test only")
    parser.add_argument("--scale-only", action="store_true", help="time and memory only")
    parser.add_argument(
        "--two-stage", action="store_true", help="the kept two-stage pair definition only"
    )
    args = parser.parse_args()
    quick = args.quick
    bccd, smears = load_bccd(600 if quick else None)
    with tempfile.TemporaryDirectory() as tmp:
        synth: list[Path] = []
        for size in (64, 128):
            root = Path(tmp) / f"synth{size}"
            write_synthetic_tree(
                root,
                organs=SYNTH_ORGANS,
                images_per_diagnosis=30 if quick else 150,
                image_size=size,
                seed=size,
                progress=False,
            )
            synth += sorted(root.glob("*/*/*.png"))
        results = {"command": " ".join(sys.argv), "machine": machine(), "candidates": {}}
        if args.two_stage:
            n_orig = 40 if quick else 150
            results["two_stage"] = two_stage(bccd, smears, synth, n_orig)
            print(json.dumps(results, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
            return
        for name, candidate in {} if args.scale_only else CANDIDATES.items():
            print(f"quality: {name}", flush=True)
            sweep = (0.15, 0.18, 0.21) if candidate is polar_ring_v1 else ()
            n_orig = 40 if quick else 150
            results["candidates"][name] = quality(candidate, bccd, smears, synth, n_orig, sweep)
        signatures = [nd.signature(np.asarray(thumbnail(Image.open(f)))) for f in [*bccd, *synth]]
        pool_path = str(Path(tmp) / "pool.npy")
        np.save(pool_path, nd.decode(signatures))
        grids = b"".join(s[nd.RING_BYTES :] for s in signatures)
        np.save(pool_path.replace(".npy", "-grids.npy"),
                np.frombuffer(grids, np.uint8).reshape(len(signatures), -1))  # fmt: skip
        sizes = [2000, 6000] if quick else [10_000, 30_000, 100_000]
        cross = (1500, 8500) if quick else (15_000, 85_000)
        print("scale", flush=True)
        results["scale"] = scale(
            pool_path, sizes, 6000 if quick else 30_000, cross, [str(f) for f in bccd]
        )
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "cpus": multiprocessing.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    main()
