"""Perceptual signatures that find rotated, flipped, re-compressed and resized copies of a tile.

Some public histology sets were made by augmenting a few hundred originals into thousands
(Augmentor: rotate by up to ±25°, crop the largest axis-aligned inner rectangle, resize back
to the original size, flip). Their bytes differ, so a content hash gives each copy its own
split: leakage. `signature` gives every image a 1,978-byte descriptor from which
`near_duplicate_pairs` finds such copies within an organ without the images. A pair is
decided in two stages: a rotation-invariant ring spectrum (below, 250 bytes) finds
candidates fast, and a colour correlation at the best alignment (aligned.py, 1,728 + 2
bytes) confirms them. The first stage alone also pairs look-alikes: on the BCCD crops
its 3,113 false pairs (mostly platelets, small blurred blobs) chained 297 of the 364
smears into one split unit; with the second stage, 23-odd pairs remain and the largest
unit holds a handful of smears (figures in bench/RESULTS.md).

The first stage ("polar-ring-v1")
---------------------------------
1. Luminance of the central square (side = the shorter edge), resized to 64 × 64 px and
   blurred (Gaussian, σ = 1 px). Working at this fixed size makes it indifferent to
   resizing (0.5×–2×) and to prepare's thumbnailing; the blur removes JPEG block noise.
2. Samples on 6 rings × 48 angles about the centre, out to 0.95 of the half side.
3. Per ring, the angular Fourier series F_k(m), m = 0..4, after the samples are set to mean
   0, standard deviation 1 (so brightness/contrast shifts do not count). The features are
   the ring means F_k(0), the magnitudes |F_k(m)|^0.5 and, for neighbouring rings,
   |F_k F_{k+1}*|^0.25 · cos(arg(F_k F_{k+1}*)): 6 + 24 + 20 = 50 numbers, L2-normalised.
   - Any rotation about the centre shifts every ring by the same angle: it multiplies
     F_k(m) by the same phase e^{imφ}, which the magnitudes and the products
     F_k F_{k+1}* do not see. A mirror image conjugates F_k(m), which changes neither a
     magnitude nor the cosine. So all of D4 (and every rotation angle) gives the same
     numbers, up to interpolation. The cross-ring products keep how rings are turned
     against each other, which magnitudes alone lose (tiles of one class have similar
     ring spectra, so this is what tells them apart).
4. Rotating and cropping the largest inner rectangle zooms the centre in, by up to 1.33×
   for a square at 25°, and unequally in x and y for a non-square image (resizing the
   crop back to the original size changes its aspect). So the 50 numbers are stored for
   5 "levels": sampling ellipses with the zooms (x, y) that cropping the image's own
   rotated rectangle gives at 0°, 5.5°, 12°, 18.5° and 25°. Level 0 is the plain circle.
5. Stored as int8 (value × 160, clipped): 5 × 50 = 250 bytes.

Ring distance: min over levels l of ||a₀ − b_l|| and ||b₀ − a_l|| (an image zoomed
relative to the other matches one of the other's inner levels); the first stage passes a
pair at ≤ RING_THRESHOLD. The second stage passes it when the aligned colour correlation
is ≥ MIN_CORRELATION (≥ MIN_CORRELATION_SMALL when both images are under SMALL_SIDE px:
their grids are upsampled and blurred look-alikes correlate closely). `distance(a, b)`
puts both on one scale, max(ring / RING_THRESHOLD, (1 − r) / (1 − min r)): a pair is a
near duplicate when it is ≤ THRESHOLD = 1.

How the first stage's threshold was chosen (bench/neardup.py, bench/RESULTS.md): the
smallest value, rounded up to 0.01, at which every constructed family (7 other D4
transforms, rotation ±5–25° with crop, JPEG q70, resize 0.5× and 2×, and combinations) of
150 real BCCD crops and 150 synthetic tiles reaches recall 0.95: 0.22. Measured there:
recall D4 1.000, rotation 0.968, JPEG 0.997, resize 1.000, rotation + JPEG 0.957; false
pairs 0 of 763,950 same-organ synthetic pairs, and 0.031 % of the 11.9 M pairs of BCCD
crops from different smears. Those 3,704 BCCD pairs (mostly platelets: small, blurred
blobs) chain 303 of the 364 smears into one component if unioned: on sets of small,
alike cells the pairs need the second stage, whose thresholds were then chosen the same
way on the same families (bench/neardup.py --two-stage). Blank (constant) images all get
the zero vector and a flat grid, and are near duplicates of each other.

Finding pairs: `near_duplicate_pairs` queries every level-0 vector against a faiss index of
all level vectors (an inverted file: sub-quadratic; scikit-learn's trees were measured and
are slower than brute force in 50 dimensions); `cross_pairs` and `closest_cross_pairs`
compare all against all in blocks with matrix products, sharing only the pair definition
(`_pair_distances` and `_second_stage`), so they can check the first independently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from organtrain.data import aligned

SIGNATURE_METHOD = "polar-ring-v1+aligned-colour-v1"
RING_THRESHOLD = 0.22  # first stage: ring-spectrum distance (bench/RESULTS.md)
# Second stage: aligned colour correlation (aligned.py), stricter when both images' shorter
# sides are under SMALL_SIDE px: their grids hold no more detail than the images, and small
# blurred look-alikes (platelets) correlate closely. Chosen on BCCD crops and synthetic
# tiles: bench/RESULTS.md.
MIN_CORRELATION = 0.93
MIN_CORRELATION_SMALL = 0.98
SMALL_SIDE = 64
THRESHOLD = 1.0  # of `distance`, which scales both stages so that a pair is ≤ 1

_SIDE = 64  # px of the central square the rings are sampled from
_BLUR = 1.0  # Gaussian sigma, px at _SIDE
_RINGS = 6
_ANGLES = 48
_HARMONICS = 4  # m = 1.._HARMONICS
_RADIUS = 0.95  # outer ring, as a fraction of the half side
_LEVEL_ANGLES = (0.0, 5.5, 12.0, 18.5, 25.0)  # degrees of rotate-and-crop each level undoes
_SCALE = 160.0  # int8 quantisation: ±0.79; unit 50-vectors stay under 0.65 (measured)
LEVELS = len(_LEVEL_ANGLES)
DIMS = _RINGS + _RINGS * _HARMONICS + (_RINGS - 1) * _HARMONICS
RING_BYTES = LEVELS * DIMS
SIGNATURE_BYTES = RING_BYTES + aligned.GRID_BYTES
_PROBES = 16  # inverted-file cells searched per query (bench/RESULTS.md: recall vs cost)
_BLOCK_CELLS = 2**25  # a × b pairs per block of the brute force: 128 MB per float32 matrix


def signature(rgb: np.ndarray) -> bytes:
    """The SIGNATURE_BYTES-long signature of a uint8 H×W×3 (or H×W grey) image."""
    height, width = rgb.shape[:2]
    square = _central_square(_luminance(rgb))
    levels = [_ring_features(square, zx, zy) for zx, zy in _level_zooms(width, height)]
    quantised = np.clip(np.round(np.stack(levels) * _SCALE), -127, 127)
    return quantised.astype(np.int8).tobytes() + aligned.grid(rgb)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return rgb.astype(np.float32)
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _central_square(grey: np.ndarray) -> np.ndarray:
    # Every level's ellipse lies inside the central square, so nothing else is needed. The
    # box is in sub-pixel units: an integer crop of an odd margin would be off-centre by
    # half a pixel, in opposite directions for an image and its mirror image.
    height, width = grey.shape
    side = min(height, width)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    resample = Image.Resampling.BOX if side >= _SIDE else Image.Resampling.BICUBIC
    square = np.asarray(Image.fromarray(grey, "F").resize((_SIDE, _SIDE), resample, box=box))
    return ndimage.gaussian_filter(square, _BLUR)


def _level_zooms(width: int, height: int) -> list[tuple[float, float]]:
    """(x, y) zoom that rotating by each level's angle and cropping back gives this image."""
    zooms = []
    for degrees in _LEVEL_ANGLES:
        inner_w, inner_h = _largest_rotated_rect(width, height, math.radians(degrees))
        zooms.append((width / inner_w, height / inner_h))
    return zooms


def _largest_rotated_rect(width: float, height: float, angle: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle inside a width × height rectangle rotated by angle."""
    if angle == 0:
        return width, height
    wide = width >= height
    long_side, short_side = (width, height) if wide else (height, width)
    sin, cos = abs(math.sin(angle)), abs(math.cos(angle))
    if short_side <= 2 * sin * cos * long_side or abs(sin - cos) < 1e-10:
        half = 0.5 * short_side
        return (half / sin, half / cos) if wide else (half / cos, half / sin)
    cos_2a = cos * cos - sin * sin
    return (width * cos - height * sin) / cos_2a, (height * cos - width * sin) / cos_2a


def _ring_features(square: np.ndarray, zoom_x: float, zoom_y: float) -> np.ndarray:
    centre = (_SIDE - 1) / 2
    radii = (np.arange(_RINGS) + 0.5) / _RINGS * _RADIUS * _SIDE / 2
    theta = np.arange(_ANGLES) * 2 * np.pi / _ANGLES
    ys = centre + radii[:, None] * np.sin(theta)[None] / zoom_y
    xs = centre + radii[:, None] * np.cos(theta)[None] / zoom_x
    rings = ndimage.map_coordinates(square, [ys, xs], order=1, mode="nearest")
    rings = (rings - rings.mean()) / (rings.std() + 1e-6)
    series = np.fft.rfft(rings, axis=1)[:, : _HARMONICS + 1] / _ANGLES
    harmonics = series[:, 1:]
    across = harmonics[:-1] * np.conj(harmonics[1:])  # turn of ring k against ring k+1
    features = np.concatenate(
        [
            series[:, 0].real,
            np.abs(harmonics).ravel() ** 0.5,
            (np.abs(across) ** 0.25 * np.cos(np.angle(across))).ravel(),
        ]
    )
    return features / (np.linalg.norm(features) + 1e-9)


def decode(signatures: Sequence[bytes]) -> np.ndarray:
    """(n, LEVELS, DIMS) float32 ring vectors of the signatures (the first stage)."""
    if len(signatures) == 0:
        return np.zeros((0, LEVELS, DIMS), np.float32)
    for s in signatures:
        if len(s) != SIGNATURE_BYTES:
            raise ValueError(
                f"a {SIGNATURE_METHOD} signature has {SIGNATURE_BYTES} bytes, got {len(s)}"
            )
    raw = np.frombuffer(b"".join(s[:RING_BYTES] for s in signatures), np.int8)
    return (raw.reshape(-1, LEVELS, DIMS).astype(np.float32)) / _SCALE


def _pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The first stage: ring distances of row-aligned decoded signatures (k, LEVELS, DIMS)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    a_in_b = np.linalg.norm(a[:, None, 0] - b, axis=2).min(axis=1)
    b_in_a = np.linalg.norm(b[:, None, 0] - a, axis=2).min(axis=1)
    return np.minimum(a_in_b, b_in_a)


def _scaled(ring: np.ndarray, correlation: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The pair definition as one number: each stage's margin scaled so that 1 is its
    threshold; a pair is a near duplicate when the larger is ≤ THRESHOLD (1). `side` is
    the larger of the pair's shorter image sides, px: only two small images get the
    stricter correlation (a half-size copy of a larger image keeps the usual one)."""
    least = np.where(side < SMALL_SIDE, MIN_CORRELATION_SMALL, MIN_CORRELATION)
    return np.maximum(ring / RING_THRESHOLD, (1 - correlation) / (1 - least))


def _second_stage(sigs_a: Sequence[bytes], sigs_b: Sequence[bytes]) -> tuple:
    """(correlation, larger shorter side) of row-aligned signature pairs."""
    grids_a = [s[RING_BYTES:] for s in sigs_a]
    grids_b = [s[RING_BYTES:] for s in sigs_b]
    correlation = aligned.scores(aligned.decode(grids_a), aligned.decode(grids_b))
    return correlation, np.maximum(aligned.sides(grids_a), aligned.sides(grids_b))


def _confirm(sigs_a, sigs_b, pairs: np.ndarray) -> np.ndarray:
    """The rows of candidate `pairs` (i in a, j in b) that pass both stages."""
    if len(pairs) == 0:
        return pairs.reshape(0, 2)
    ring = _pair_distances(decode([sigs_a[i] for i in pairs[:, 0]]),
                           decode([sigs_b[j] for j in pairs[:, 1]]))  # fmt: skip
    pairs, ring = pairs[ring <= RING_THRESHOLD], ring[ring <= RING_THRESHOLD]
    second = _second_stage([sigs_a[i] for i in pairs[:, 0]], [sigs_b[j] for j in pairs[:, 1]])
    return pairs[_scaled(ring, *second) <= THRESHOLD]


def distance(a: bytes, b: bytes) -> float:
    """Distance between two signatures; near duplicates are at most THRESHOLD (1) apart."""
    ring = _pair_distances(decode([a]), decode([b]))
    return float(_scaled(ring, *_second_stage([a], [b]))[0])


def near_duplicate_pairs(
    signatures: Sequence[bytes], *, index_from: int = 5000
) -> list[tuple[int, int]]:
    """Every (i, j), i < j, whose distance is ≤ THRESHOLD, found through a faiss index.

    Each level vector is a point; a candidate is a pair where one image's level 0 lies
    within RING_THRESHOLD of any level of the other. Below `index_from` images every point
    is compared (faiss' flat index); from it on an inverted-file index searches the
    _PROBES cells nearest to each query out of ~2·sqrt(points): O(n^1.5), and it can miss
    a pair whose vectors fall in cells that are not probed (measured in bench/RESULTS.md).
    Candidates are decided by both stages of the pair definition either way.
    """
    vectors = decode(signatures)
    if len(vectors) < 2:
        return []
    candidates = _index_candidates(vectors, exact=len(vectors) < index_from)
    return [(int(i), int(j)) for i, j in _confirm(signatures, signatures, candidates)]


def _index_candidates(vectors: np.ndarray, *, exact: bool) -> np.ndarray:
    """Unique (i, j), i < j, rows of image pairs some level of which the index found close."""
    # faiss' loader logs at INFO each CPU-specific build it tries and does not find.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss  # only prepare needs it; the leakage check (cross_pairs) does not
    except ImportError as error:
        raise ImportError(
            "near_duplicate_pairs needs faiss: install organtrain's dependencies "
            "(`make install`) or `pip install faiss-cpu`"
        ) from error

    points = np.ascontiguousarray(vectors.reshape(-1, DIMS))
    queries = np.ascontiguousarray(vectors[:, 0])
    if exact:
        index = faiss.IndexFlatL2(DIMS)
    else:
        cells = int(2 * math.sqrt(len(points)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIMS), DIMS, cells)
        sample = np.random.default_rng(0).choice(
            len(points), min(len(points), 40 * cells), replace=False
        )
        index.train(points[np.sort(sample)])
        index.nprobe = _PROBES
    index.add(points)
    # faiss compares squared L2; the margin covers float32 rounding, the exact check decides.
    limits, _, found = index.range_search(queries, (RING_THRESHOLD + 1e-3) ** 2)
    query = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
    other = found // LEVELS
    pairs = np.stack([np.minimum(query, other), np.maximum(query, other)], axis=1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def cross_pairs(sigs_a: Sequence[bytes], sigs_b: Sequence[bytes]) -> list[tuple[int, int]]:
    """Every (i, j), i in a, j in b, whose distance is ≤ THRESHOLD, by brute force."""
    pairs = _confirm(sigs_a, sigs_b, np.array(cross_pairs_first_stage(sigs_a, sigs_b)))
    return sorted((int(i), int(j)) for i, j in pairs)


def cross_pairs_first_stage(
    sigs_a: Sequence[bytes], sigs_b: Sequence[bytes]
) -> list[tuple[int, int]]:
    """Every (i, j) within RING_THRESHOLD, by brute force: the candidates of cross_pairs."""
    found = [
        block_pairs + np.array([offset, 0])
        for offset, block_pairs, _ in _blocks(
            decode(sigs_a), decode(sigs_b), limit=RING_THRESHOLD + 1e-3
        )
    ]
    if not found:
        return []
    return [(int(i), int(j)) for i, j in np.concatenate(found)]


def closest_cross_pairs(
    sigs_a: Sequence[bytes], sigs_b: Sequence[bytes], k: int
) -> list[tuple[int, int, float]]:
    """The k pairs (i in a, j in b, distance) with the smallest distances, closest first.

    The ring distance preselects 8·k pairs (the second stage is too slow for all pairs);
    they are then ranked by `distance`. For reports: a person judges the threshold on them.
    """
    if k <= 0:
        return []
    va, vb = decode(sigs_a), decode(sigs_b)
    keep = 8 * k
    best: list[tuple[float, int, int]] = []
    for offset, _, block in _blocks(va, vb, limit=0.0):
        flat = -block.ravel()  # −distance² / 2: the closest pairs are the smallest
        take = np.argsort(flat) if flat.size <= keep else np.argpartition(flat, keep - 1)[:keep]
        rows, cols = np.unravel_index(take, block.shape)
        found = zip(np.sqrt(np.maximum(2 * flat[take], 0)), rows + offset, cols, strict=True)
        best.extend((float(d), int(r), int(c)) for d, r, c in found)
        best = sorted(best)[:keep]
    if not best:
        return []
    i = np.array([p[1] for p in best])
    j = np.array([p[2] for p in best])
    ring = _pair_distances(va[i], vb[j])
    scaled = _scaled(ring, *_second_stage([sigs_a[x] for x in i], [sigs_b[y] for y in j]))
    closest = zip(i.tolist(), j.tolist(), scaled.tolist(), strict=True)
    return sorted(closest, key=lambda pair: pair[2])[:k]


def _blocks(
    va: np.ndarray, vb: np.ndarray, *, limit: float
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per block of rows of a: (offset, pairs within `limit`, (limit² − distance²) / 2).

    Every level comparison is one matrix product of augmented vectors (_query_rows,
    _level_rows) whose entries are (limit² − |x − y|²) / 2, so the pair's distance is
    under `limit` where the largest of its 9 products is ≥ 0. Those pairs are then
    decided by `_pair_distances`, so float32 rounding cannot change the answer.
    """
    if len(va) == 0 or len(vb) == 0:
        return
    rows = max(1, _BLOCK_CELLS // len(vb))
    b0, b_levels = _query_rows(vb[:, 0], limit), _level_rows(vb)
    for start in range(0, len(va), rows):
        a = va[start : start + rows]
        a0, a_levels = _query_rows(a[:, 0], limit), _level_rows(a)
        # a's level 0 against every level of b, and every other level of a against b's 0.
        lefts = [a0] * LEVELS + a_levels[1:]
        rights = b_levels + [b0] * (LEVELS - 1)
        best = _max_of_products(lefts, rights)
        pairs = np.argwhere(best >= 0)
        if len(pairs):
            pairs = pairs[_pair_distances(a[pairs[:, 0]], vb[pairs[:, 1]]) <= RING_THRESHOLD]
        yield start, pairs, best


def _query_rows(vectors: np.ndarray, limit: float) -> np.ndarray:
    """[v, 1, −(|v|² − limit²) / 2]: against a _level_rows row y, gives (limit² − |v − y|²) / 2."""
    half = ((vectors**2).sum(1, keepdims=True) - limit**2) / 2
    return np.hstack([vectors, np.ones_like(half), -half])


def _level_rows(vectors: np.ndarray) -> list[np.ndarray]:
    """Per level, contiguous rows [y, −|y|² / 2, 1]."""
    levels = []
    for level in range(LEVELS):
        y = vectors[:, level]
        half = (y**2).sum(1, keepdims=True) / 2
        levels.append(np.ascontiguousarray(np.hstack([y, -half, np.ones_like(half)])))
    return levels


def _max_of_products(lefts: list[np.ndarray], rights: list[np.ndarray]) -> np.ndarray:
    """Elementwise max over k of lefts[k] @ rights[k].T (one buffer, updated in place)."""
    best = lefts[0] @ rights[0].T
    for left, right in zip(lefts[1:], rights[1:], strict=True):
        np.maximum(best, left @ right.T, out=best)
    return best
