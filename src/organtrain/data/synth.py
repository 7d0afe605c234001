"""Deterministic synthetic H&E-like histology images, sorted as <organ>/<diagnosis>/*.png.

No real medical images can be downloaded or shipped, yet the training pipeline, the demo
and the tests need an image tree whose classes a small CNN can learn but not trivially.
So this module paints tissue the way a stain does: it draws a hematoxylin density map
(nuclei) and an eosin density map (stroma, cytoplasm, red cells) on a 2x supersampled
canvas, blurs and averages them down, and converts them to RGB with a Beer-Lambert stain
model (pink stroma, purple nuclei).

Design rules that keep the data set honest:

* Classes differ only in *morphology*: nucleus size, shape, density and arrangement
  (scatter, lining of gland lumens, sheets), or parasites vs platelets in blood.
* Classes are not separable by mean colour: every image draws its nuclear stain mass,
  white-space fraction and eosin amount from the same ranges whatever its diagnosis, and
  the drawn maps are rescaled so they pass the light those amounts would; per-image stain
  strength, stain hue, background brightness and noise then vary far more than any
  residual class difference.
* Every image has its own random generator seeded from (seed, organ, diagnosis, index)
  with zlib.crc32, so files are byte-identical between runs and do not depend on which
  organs were requested.

Geometry below is given in pixels of a 64-px image; `_Canvas.k` scales it, so a larger
`image_size` shows the same field of view at a higher resolution.
"""

from __future__ import annotations

import numbers
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

_MIN_IMAGE_SIZE = 16

# Optical densities per unit stain (R, G, B). Two published references span the range
# between labs: Ruifrok & Johnston's and the Macenko reference matrix. Each image mixes
# them with a random weight, which models the stain-hue spread between scanners and labs.
_H_OD = (np.array([0.650, 0.704, 0.286]), np.array([0.563, 0.720, 0.406]))
_E_OD = (np.array([0.072, 0.990, 0.105]), np.array([0.216, 0.801, 0.558]))
_H_AMOUNT = 1.6  # optical density of a fully dark nucleus at stain strength 1
_E_AMOUNT = 0.9

# Shared per-image ranges. Every diagnosis of an organ draws from the same ones: that is
# what keeps mean colour uninformative (see the module docstring).
_NUCLEAR_MASS = (0.07, 0.15)  # fully dark nucleus area per image area (tissue only)
# Fraction of the image covered by the organ's structures: white space (alveoli, gland
# lumens, clefts) in tissue, red cells in blood. Per organ, because each organ's benign
# architecture limits how much white space fits (crypts need thick epithelium around them).
_STRUCTURE_FRACTION = {"lung": (0.14, 0.28), "colon": (0.07, 0.17), "blood": (0.35, 0.65)}
_EOSIN_LEVEL = (0.40, 0.70)  # mean eosin density of the tissue that is not white space
_STAIN_STRENGTH = (0.6, 1.4)  # per image, separately for H and E


@dataclass
class _Shape:
    """Ranges a recipe gives for one kind of nucleus (sizes in 64-px-image pixels)."""

    length: tuple[float, float]  # semi-axis along the nucleus' orientation
    aspect: tuple[float, float]  # short / long semi-axis
    irregularity: tuple[float, float]  # amplitude of lumpy outline deviations
    fill: tuple[float, float] = (215, 255)  # chromatin density, 0..255
    vesicular: float = 0.0  # probability of a pale nucleus with a nucleolus
    halo: float = 0.0  # cytoplasm radius as a multiple of the nucleus; 0 draws none
    halo_fill: float = 0.0  # eosin density of that cytoplasm, 0..255


@dataclass
class _Nuclei:
    """A batch of nuclei, one array entry each, in canvas pixels."""

    x: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    a: np.ndarray
    b: np.ndarray
    irr: np.ndarray
    fill: np.ndarray
    vesicular: np.ndarray
    halo: np.ndarray
    halo_fill: np.ndarray

    @staticmethod
    def concat(parts: Sequence[_Nuclei]) -> _Nuclei:
        fields = _Nuclei.__dataclass_fields__
        return _Nuclei(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})

    def take(self, index: np.ndarray) -> _Nuclei:
        return _Nuclei(**{f: getattr(self, f)[index] for f in _Nuclei.__dataclass_fields__})

    def est_mass(self) -> np.ndarray:
        """Approximate stain mass of each nucleus, to decide how many to draw per round."""
        pale = np.where(self.vesicular, 0.7, 1.0)
        return np.pi * self.a * self.b * self.fill / 255.0 * pale


def _blobs(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    irr: np.ndarray,
    vertices: int = 12,
) -> np.ndarray:
    """Irregular ellipse outlines, shape (n, vertices, 2).

    The outline is an ellipse whose radius is modulated by a few low harmonics with random
    phases: real nuclei and lumens are lumpy rather than spiky, and irregularity is one of
    the morphological cues that separate benign from malignant nuclei.
    """
    n = len(x)
    ang = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)[None, :]
    radius = np.ones((n, vertices))
    for harmonic in (2, 3, 4):
        amp = rng.normal(0.0, 1.0, (n, 1)) * irr[:, None] / harmonic * 1.5
        phase = rng.uniform(0.0, 2 * np.pi, (n, 1))
        radius += amp * np.cos(harmonic * ang + phase)
    radius = np.clip(radius, 0.45, 1.8)
    px, py = a[:, None] * radius * np.cos(ang), b[:, None] * radius * np.sin(ang)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    return np.stack([x[:, None] + px * cos - py * sin, y[:, None] + px * sin + py * cos], -1)


def _scaled(poly: np.ndarray, factor: float) -> np.ndarray:
    """Polygon grown or shrunk about its centroid (cytoplasm halos, pale nucleus centres)."""
    centre = poly.mean(axis=0, keepdims=True)
    return centre + (poly - centre) * factor


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]-ish: bicubic upsampling of a coarse random grid."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


class _Canvas:
    """Hematoxylin and eosin density maps, plus a mask of structures, at 2x resolution.

    Drawing at twice the output size and averaging down gives smooth, anti-aliased
    outlines without per-pixel Python work. The mask marks white spaces (tissue) or red
    cells (blood), so recipes can keep nuclei out of lumens or put parasites into cells.
    """

    def __init__(self, image_size: int, rng: np.random.Generator):
        self.rng = rng
        self.size = 2 * image_size
        self.k = self.size / 64.0  # canvas pixels per pixel of a 64-px image
        self.h = Image.new("L", (self.size, self.size), 0)
        self.e = Image.new("L", (self.size, self.size), 0)
        self.mask = Image.new("L", (self.size, self.size), 0)
        self.hdraw, self.edraw = ImageDraw.Draw(self.h), ImageDraw.Draw(self.e)
        self.mdraw = ImageDraw.Draw(self.mask)
        self.structures: list[np.ndarray] = []  # outlines of lumens or red cells
        self.h_target = 0.0  # hematoxylin mass (canvas pixels of full density) to draw
        self.e_target: float | None = None  # light through the eosin; None keeps what was drawn

    def mask_fraction(self) -> float:
        return float(np.asarray(self.mask).mean()) / 255.0

    def h_mass(self) -> float:
        return float(np.asarray(self.h, dtype=np.float32).sum()) / 255.0

    def in_mask(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each point lies on a masked structure (points off the canvas do not)."""
        mask = np.asarray(self.mask)
        xi, yi = x.astype(int), y.astype(int)
        inside = (xi >= 0) & (yi >= 0) & (xi < self.size) & (yi < self.size)
        hit = np.zeros(len(x), dtype=bool)
        hit[inside] = mask[yi[inside], xi[inside]] > 127
        return hit

    def polygon(self, draw: ImageDraw.ImageDraw, poly: np.ndarray, fill: float) -> None:
        draw.polygon(poly.ravel().tolist(), fill=int(fill))

    def draw_nuclei(self, nuc: _Nuclei) -> None:
        """Cytoplasm halos first (eosin), then nuclei (hematoxylin)."""
        polys = _blobs(self.rng, nuc.x, nuc.y, nuc.a, nuc.b, nuc.theta, nuc.irr)
        for poly, halo, halo_fill in zip(polys, nuc.halo, nuc.halo_fill, strict=True):
            if halo > 0:
                self.polygon(self.edraw, _scaled(poly, halo), halo_fill)
        for i, poly in enumerate(polys):
            self.polygon(self.hdraw, poly, nuc.fill[i])
            if nuc.vesicular[i]:
                # Open chromatin: a pale centre with a dark nucleolus, typical of
                # adenocarcinoma nuclei; solid nuclei read as hyperchromatic instead.
                self.polygon(self.hdraw, _scaled(poly, 0.6), nuc.fill[i] * 0.45)
                cx, cy = poly.mean(axis=0) + self.rng.normal(0, 0.3 * self.k, 2)
                r = 0.45 * self.k
                self.hdraw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(nuc.fill[i]))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Blurred, downsampled H and E maps, rescaled to the image's stain targets."""
        blur = ImageFilter.GaussianBlur(0.5 * self.k)
        h = np.asarray(self.h.filter(blur).reduce(2), dtype=np.float32) / 255.0
        e = np.asarray(self.e.filter(blur).reduce(2), dtype=np.float32) / 255.0
        e = e * (1.0 - 0.7 * np.clip(h, 0.0, 1.0))  # nuclei displace cytoplasm
        if self.h_target > 0 and h.sum() > 0:
            # Light through ideal, fully dark nuclei covering the target fraction.
            covered = self.h_target / (self.size * self.size)
            h = _match_light(h, 1.0 - covered * (1.0 - np.exp(-_H_LIGHT)), _H_LIGHT)
        if self.e_target is not None and e.sum() > 0:
            e = _match_light(e, self.e_target, _E_LIGHT)
        return h, e


# Typical optical density of one unit of stain in the green channel, which both stains
# darken most. _match_light pins the light transmitted through that much stain.
_H_LIGHT = _H_AMOUNT * 0.7
_E_LIGHT = _E_AMOUNT * 0.9


def _match_light(density: np.ndarray, target: float, od: float) -> np.ndarray:
    """`density` scaled so that mean(exp(-od * density)) equals `target` (scale 0.5-2).

    Why light rather than stain mass: mean colour is the mean of exp(-density), which
    also depends on how the stain is spread (Jensen's inequality). Crowded dark nuclei or
    debris-filled lumens transmit more light than the same stain spread thinly, so
    pinning the mass alone would leave a class-dependent mean colour. The transmission
    is monotonic in the scale, so a bisection finds it.
    """
    lo, hi = np.log(0.5), np.log(2.0)
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        if float(np.exp(-od * np.exp(mid) * density).mean()) > target:
            lo = mid  # too much light: more stain
        else:
            hi = mid
    return density * float(np.exp(0.5 * (lo + hi)))


# --- building blocks shared by the recipes -------------------------------------------


def _stroma(cv: _Canvas, level: float = 0.6, fibres: int = 10) -> None:
    """Eosin background: smooth texture plus wavy collagen fibres."""
    rng, size = cv.rng, cv.size
    field = level * (0.7 + 0.45 * _smooth_noise(rng, size, 5))
    field += 0.12 * (_smooth_noise(rng, size, 14) - 0.5)
    cv.e.paste(Image.fromarray(np.clip(field * 255, 0, 255).astype(np.uint8)))
    for _ in range(fibres):
        steps = rng.integers(4, 9)
        heading = rng.uniform(0, 2 * np.pi)
        pts = [rng.uniform(0, size, 2)]
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            pts.append(pts[-1] + 6 * cv.k * np.array([np.cos(heading), np.sin(heading)]))
        fill = level * 255 * rng.uniform(0.6, 1.4)
        width = max(1, round(rng.uniform(0.5, 1.2) * cv.k))
        cv.edraw.line(np.ravel(pts).tolist(), fill=int(min(fill, 255)), width=width)


def _place_structures(
    cv: _Canvas,
    target: float,
    radius: tuple[float, float],
    aspect: tuple[float, float],
    irregularity: float,
    gap: float,
    e_fill: float = 0.0,
    overlap: float = 1.0,
    max_tries: int = 300,
) -> None:
    """Add irregular ellipses to the mask (and paint them on E) until it covers `target`.

    Used for alveoli, gland lumens, clefts and red cells. `gap` keeps septa or epithelium
    between neighbours; the last one is shrunk so the covered fraction lands near the
    target, which is drawn from the same range for every diagnosis of an organ. When the
    canvas is too full to fit another one, the gap shrinks step by step (crowded glands)
    rather than leaving this class with less white space than the others.
    """
    rng, k, size = cv.rng, cv.k, cv.size
    cx, cy, cr = np.empty(0), np.empty(0), np.empty(0)
    covered = cv.mask_fraction()  # measured only after a placement: rejections change nothing
    misses = 0
    for _ in range(max_tries):
        deficit = target - covered
        if deficit < 0.01:
            break
        asp = rng.uniform(*aspect)
        fit = np.sqrt(deficit * size * size / (np.pi * asp)) * 1.2
        r = min(rng.uniform(*radius) * k, fit)
        if r < radius[0] * k * 0.5:
            break
        x, y = rng.uniform(-0.1 * size, 1.1 * size, 2)
        room = overlap * (r + cr) + gap * k * 0.8 ** (misses // 25)
        if np.any(np.hypot(x - cx, y - cy) < room):
            misses += 1
            continue
        cx, cy, cr = np.append(cx, x), np.append(cy, y), np.append(cr, r)
        _add_structure(cv, x, y, r, asp, irregularity, e_fill)
        covered = cv.mask_fraction()


def _add_structure(
    cv: _Canvas, x: float, y: float, r: float, aspect: float, irregularity: float, e_fill: float
) -> None:
    """One lumen or red cell: an irregular ellipse on the mask, painted `e_fill` on E."""
    args = (np.array([v]) for v in (x, y, r, r * aspect, cv.rng.uniform(0, np.pi), irregularity))
    poly = _blobs(cv.rng, *args)[0]
    cv.structures.append(poly)
    cv.polygon(cv.mdraw, poly, 255)
    cv.polygon(cv.edraw, poly, e_fill)


def _place_lattice(
    cv: _Canvas,
    target: float,
    radius: tuple[float, float],
    aspect: tuple[float, float],
    irregularity: float,
    jitter: float = 0.06,
) -> None:
    """Lumens on a jittered hexagonal grid whose spacing makes them cover `target`.

    Evenly spaced crypts ("test-tube rack") are a hallmark of benign colon mucosa, and the
    grid packs them densely enough to reach the shared white-space target with a thick
    epithelium around each, which random placement cannot.
    """
    rng, k, size = cv.rng, cv.k, cv.size
    mean_area = np.pi * (np.mean(radius) * k) ** 2 * np.mean(aspect)
    spacing = np.sqrt(mean_area / (target * np.sqrt(3) / 2))
    reach = int(np.ceil(size / spacing)) + 2
    ii, jj = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1))
    gx, gy = (ii + 0.5 * (jj % 2)) * spacing, jj * spacing * np.sqrt(3) / 2
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    x = size / 2 + c * gx - s * gy + rng.uniform(0, spacing)
    y = size / 2 + s * gx + c * gy + rng.uniform(0, spacing)
    x, y = (v.ravel() + rng.normal(0, jitter * spacing, v.size) for v in (x, y))
    margin = (radius[1] + 1) * k
    on = (x > -margin) & (x < size + margin) & (y > -margin) & (y < size + margin)
    for cx, cy in zip(x[on], y[on], strict=True):
        _add_structure(cv, cx, cy, rng.uniform(*radius) * k, rng.uniform(*aspect), irregularity, 0)


def _nuclei_at(cv: _Canvas, x: np.ndarray, y: np.ndarray, theta: np.ndarray, s: _Shape) -> _Nuclei:
    """Nuclei of shape ranges `s` at given positions and orientations."""
    rng, k, n = cv.rng, cv.k, len(x)
    a = rng.uniform(*s.length, n) * k
    return _Nuclei(
        x=x,
        y=y,
        theta=theta,
        a=a,
        b=a * rng.uniform(*s.aspect, n),
        irr=rng.uniform(*s.irregularity, n),
        fill=rng.uniform(*s.fill, n),
        vesicular=rng.random(n) < s.vesicular,
        halo=np.full(n, s.halo),
        halo_fill=np.full(n, s.halo_fill),
    )


def _scatter(cv: _Canvas, n: int, s: _Shape) -> _Nuclei:
    """Nuclei at random places outside the mask, randomly oriented (stroma, sheets)."""
    x, y = cv.rng.uniform(0, cv.size, (2, n))
    keep = ~cv.in_mask(x, y)
    return _nuclei_at(cv, x[keep], y[keep], cv.rng.uniform(0, np.pi, keep.sum()), s)


def _lining(
    cv: _Canvas, n: int, s: _Shape, offset: tuple[float, float], radial: bool, jitter: float = 0.15
) -> _Nuclei:
    """Nuclei lining the masked structures: rings around glands, flat cells on septa.

    `offset` is the distance from the structure's edge, beyond the nucleus' own half-size;
    a wide range stacks nuclei in several layers (stratification). Radial nuclei point away
    from the lumen like columnar cells; tangential ones lie flat along the wall.
    """
    rng = cv.rng
    if not cv.structures or n == 0:
        return _scatter(cv, n, s)
    polys = np.stack(cv.structures)  # (m, v, 2)
    j = rng.integers(len(polys), size=n)
    i = rng.integers(polys.shape[1], size=n)
    t = rng.random(n)[:, None]
    p = polys[j, i] * (1 - t) + polys[j, (i + 1) % polys.shape[1]] * t
    normal = p - polys[j].mean(axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-6
    nuc = _nuclei_at(cv, p[:, 0], p[:, 1], np.zeros(n), s)
    half = nuc.a if radial else nuc.b
    dist = half + rng.uniform(*offset, n) * cv.k
    nuc.x, nuc.y = p[:, 0] + normal[:, 0] * dist, p[:, 1] + normal[:, 1] * dist
    nuc.theta = np.arctan2(normal[:, 1], normal[:, 0]) + rng.normal(0, jitter, n)
    if not radial:
        nuc.theta += np.pi / 2
    return nuc.take(~cv.in_mask(nuc.x, nuc.y))


_Sampler = Callable[[int], _Nuclei]


def _mix(cv: _Canvas, parts: Sequence[tuple[float, _Sampler]]) -> _Sampler:
    """A sampler drawing from several kinds of nuclei in fixed proportions, shuffled."""

    def sample(n: int) -> _Nuclei:
        counts = cv.rng.multinomial(n, [p for p, _ in parts])
        nuc = _Nuclei.concat([fn(c) for c, (_, fn) in zip(counts, parts, strict=True)])
        return nuc.take(cv.rng.permutation(len(nuc.x)))

    return sample


def _fill_nuclei(cv: _Canvas, sample: _Sampler, rounds: int = 8) -> None:
    """Draw nuclei until the H map holds `cv.h_target`.

    Counting stain mass rather than nuclei is what balances classes: large nuclei come in
    small numbers, small ones in large numbers, and the image carries the same amount of
    hematoxylin either way. Each round measures what overlaps and the image edge left.
    """
    for _ in range(rounds):
        deficit = cv.h_target - cv.h_mass()
        if deficit < 0.03 * cv.h_target:
            return
        nuc = sample(48)
        if len(nuc.x) == 0:
            continue
        upto = int(np.searchsorted(np.cumsum(nuc.est_mass()), deficit)) + 1
        cv.draw_nuclei(nuc.take(np.arange(min(upto, len(nuc.x)))))


# --- recipes: one per organ and diagnosis ---------------------------------------------


@dataclass
class _Budget:
    """Per-image amounts drawn from ranges shared by all diagnoses (see module docstring)."""

    nuclear_mass: float
    structure_fraction: float
    eosin_level: float


def _tissue(cv: _Canvas, budget: _Budget, fibres: int = 10) -> None:
    """Common start of tissue recipes: stroma and the stain targets."""
    _stroma(cv, budget.eosin_level, fibres)
    cv.h_target = budget.nuclear_mass * cv.size * cv.size


def _end_tissue(cv: _Canvas, budget: _Budget) -> None:
    """Eosin target: the light through the shared white-space fraction and eosin level.

    Computed from the budget, not from what was drawn, so it is the same for every class.
    """
    white = budget.structure_fraction
    cv.e_target = white + (1.0 - white) * float(np.exp(-_E_LIGHT * budget.eosin_level))


def _lung_benign(cv: _Canvas, b: _Budget) -> None:
    """Alveoli: large thin-walled air spaces; small flat nuclei on septa, many lymphocytes."""
    _tissue(cv, b, fibres=4)
    _place_structures(cv, b.structure_fraction, (7, 12), (0.6, 1.0), 0.2, gap=2.5)
    flat = _Shape((1.9, 2.7), (0.35, 0.5), (0.05, 0.15), fill=(200, 250))
    round_ = _Shape((1.1, 1.6), (0.85, 1.0), (0.0, 0.08), fill=(230, 255))
    _fill_nuclei(
        cv,
        _mix(
            cv,
            [
                (0.35, lambda n: _lining(cv, n, flat, (0.1, 1.5), radial=False, jitter=0.3)),
                (0.65, lambda n: _scatter(cv, n, round_)),
            ],
        ),
    )
    _end_tissue(cv, b)


def _lung_adenocarcinoma(cv: _Canvas, b: _Budget) -> None:
    """Acinar glands: many small lumens ringed by enlarged, vesicular, radial nuclei."""
    _tissue(cv, b)
    _place_structures(cv, b.structure_fraction, (6, 10), (0.5, 1.0), 0.2, gap=7)
    gland = _Shape(
        (2.4, 3.2),
        (0.5, 0.7),
        (0.12, 0.28),
        fill=(210, 255),
        vesicular=0.7,
        halo=1.7,
        halo_fill=120,
    )
    spindle = _Shape((2.2, 3.0), (0.25, 0.4), (0.05, 0.15))
    _fill_nuclei(
        cv,
        _mix(
            cv,
            [
                (0.85, lambda n: _lining(cv, n, gland, (0.2, 1.0), radial=True)),
                (0.15, lambda n: _scatter(cv, n, spindle)),
            ],
        ),
    )
    _end_tissue(cv, b)


def _lung_squamous(cv: _Canvas, b: _Budget) -> None:
    """Sheets of large pleomorphic hyperchromatic cells, clefts and keratin pearls."""
    _tissue(cv, b, fibres=4)
    _place_structures(cv, b.structure_fraction, (6, 13), (0.15, 0.35), 0.3, gap=3, overlap=0.5)
    _keratin_pearls(cv, int(cv.rng.integers(0, 3)))
    sheet = _Shape((2.6, 4.2), (0.6, 1.0), (0.25, 0.45), fill=(225, 255), halo=1.9, halo_fill=200)
    _fill_nuclei(cv, lambda n: _scatter(cv, n, sheet))
    _end_tissue(cv, b)


def _keratin_pearls(cv: _Canvas, count: int) -> None:
    """Concentric eosinophilic whorls, the hallmark of keratinising squamous carcinoma."""
    rng, k = cv.rng, cv.k
    for _ in range(count):
        x, y = rng.uniform(0.15, 0.85, 2) * cv.size
        r0 = rng.uniform(4, 7) * k
        for r in np.linspace(r0, 0.8 * k, 4):
            box = (x - r, y - r * 0.8, x + r, y + r * 0.8)
            cv.edraw.ellipse(box, outline=250, width=max(1, round(0.6 * k)))
        cv.mdraw.ellipse((x - r0, y - r0 * 0.8, x + r0, y + r0 * 0.8), fill=255)


def _colon_benign(cv: _Canvas, b: _Budget) -> None:
    """Regular round crypts lined by one tidy layer of small basal nuclei, goblet pallor."""
    _tissue(cv, b)
    _place_lattice(cv, b.structure_fraction, (3.0, 5.0), (0.8, 1.0), 0.06)
    for poly in cv.structures:  # pale mucin-filled goblet cells around each lumen
        cv.polygon(cv.edraw, _scaled(poly, 1.8), 90)
        cv.polygon(cv.edraw, poly, 0)
    crypt = _Shape((1.6, 2.0), (0.45, 0.6), (0.02, 0.08), fill=(215, 245))
    lymph = _Shape((1.0, 1.4), (0.85, 1.0), (0.0, 0.08), fill=(230, 255))
    _fill_nuclei(
        cv,
        _mix(
            cv,
            [
                (0.6, lambda n: _lining(cv, n, crypt, (3.0, 3.4), radial=True, jitter=0.05)),
                (0.4, lambda n: _scatter(cv, n, lymph)),
            ],
        ),
    )
    _end_tissue(cv, b)


def _colon_adenocarcinoma(cv: _Canvas, b: _Budget) -> None:
    """Irregular crowded glands, stratified large cigar nuclei, dirty necrosis in lumens."""
    _tissue(cv, b)
    _place_structures(cv, b.structure_fraction, (2.5, 8), (0.35, 1.0), 0.35, gap=3.5)
    for poly in cv.structures:
        if cv.rng.random() < 0.6:
            _necrosis(cv, poly)
    gland = _Shape((2.8, 4.0), (0.3, 0.5), (0.15, 0.3), fill=(215, 255), vesicular=0.25)
    spindle = _Shape((2.2, 3.0), (0.25, 0.4), (0.05, 0.15))
    _fill_nuclei(
        cv,
        _mix(
            cv,
            [
                (0.92, lambda n: _lining(cv, n, gland, (0.0, 3.0), radial=True, jitter=0.35)),
                (0.08, lambda n: _scatter(cv, n, spindle)),
            ],
        ),
    )
    _end_tissue(cv, b)


def _necrosis(cv: _Canvas, poly: np.ndarray) -> None:
    """Pink debris with nuclear dust inside a lumen ("dirty necrosis")."""
    rng, k = cv.rng, cv.k
    cv.polygon(cv.edraw, _scaled(poly, 0.7), 60)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    for x, y in rng.uniform(lo, hi, (int(rng.integers(2, 6)), 2)):
        r = rng.uniform(0.4, 0.9) * k
        cv.hdraw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(150, 230)))


def _blood(cv: _Canvas, b: _Budget, parasitized: bool) -> None:
    """Thin blood film: red cells with central pallor, purple objects on or between them.

    Both classes get the same number of purple objects (and so about the same stain):
    in parasitized films most are ring-form parasites inside red cells, in uninfected
    films they are platelets, mostly in the plasma but some (30 %) lying on top of a cell.
    """
    rng, k = cv.rng, cv.k
    field = 0.05 + 0.03 * _smooth_noise(rng, cv.size, 4)  # faintly pink plasma
    cv.e.paste(Image.fromarray((field * 255).astype(np.uint8)))
    fill = rng.uniform(150, 200)
    _place_structures(
        cv, b.structure_fraction, (6.5, 8.5), (0.85, 1.0), 0.04, gap=0, e_fill=fill, overlap=0.75
    )
    for poly in cv.structures:  # biconcave discs: pale centre
        cv.polygon(cv.edraw, _scaled(poly, rng.uniform(0.35, 0.5)), fill * 0.55)
    objects = int(rng.integers(2, 7))
    rings = objects - int(rng.integers(0, 2)) if parasitized else 0
    for _ in range(rings):
        _ring_form(cv)
    for _ in range(objects - rings):
        _platelet(cv, on_cell=rng.random() < 0.3)
    # ~12 px of full density per object: what a ring or a platelet draws on average.
    cv.h_target = objects * 12.0 * k * k * rng.uniform(0.8, 1.25)


def _ring_form(cv: _Canvas) -> None:
    """A ring-stage parasite: thin purple ring with one or two chromatin dots, in a cell."""
    rng, k = cv.rng, cv.k
    # Only cells whose centre is in view: a parasite in a cell cut by the edge could be lost.
    cells = [
        c
        for c in cv.structures
        if np.all((c.mean(axis=0) > 4 * k) & (c.mean(axis=0) < cv.size - 4 * k))
    ]
    if not cells:
        return
    cell = cells[int(rng.integers(len(cells)))]
    centre = cell.mean(axis=0)
    cell_r = np.linalg.norm(cell - centre, axis=1).mean()
    ang = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(2.2, 3.0) * k
    x, y = centre + rng.uniform(0, max(cell_r - r - k, 0)) * np.array([np.cos(ang), np.sin(ang)])
    ry = r * rng.uniform(0.75, 1.0)
    width = max(1, round(rng.uniform(0.8, 1.1) * k))
    cv.hdraw.ellipse(
        (x - r, y - ry, x + r, y + ry), outline=int(rng.uniform(210, 255)), width=width
    )
    for _ in range(int(rng.integers(1, 3))):
        t = rng.uniform(0, 2 * np.pi)
        dx, dy, d = x + r * np.cos(t), y + ry * np.sin(t), rng.uniform(0.9, 1.3) * k
        cv.hdraw.ellipse((dx - d, dy - d, dx + d, dy + d), fill=255)


def _platelet(cv: _Canvas, on_cell: bool) -> None:
    """A platelet: a small granular clump of purple dots, in the plasma or on a cell."""
    rng, k = cv.rng, cv.k
    for _ in range(20):  # rejection sampling for a spot of the wanted kind
        x, y = rng.uniform(0, cv.size, 2)
        if bool(cv.in_mask(np.array([x]), np.array([y]))[0]) == on_cell:
            break
    for _ in range(int(rng.integers(4, 8))):
        dx, dy = rng.normal(0, 0.9 * k, 2)
        d = rng.uniform(0.7, 1.2) * k
        cv.hdraw.ellipse(
            (x + dx - d, y + dy - d, x + dx + d, y + dy + d), fill=int(rng.uniform(170, 240))
        )


_Recipe = Callable[[_Canvas, _Budget], None]

_RECIPES: dict[str, dict[str, _Recipe]] = {
    "lung": {
        "adenocarcinoma": _lung_adenocarcinoma,
        "benign": _lung_benign,
        "squamous_cell_carcinoma": _lung_squamous,
    },
    "colon": {
        "adenocarcinoma": _colon_adenocarcinoma,
        "benign": _colon_benign,
    },
    "blood": {
        "malaria_parasitized": lambda cv, b: _blood(cv, b, parasitized=True),
        "uninfected": lambda cv, b: _blood(cv, b, parasitized=False),
    },
}

DEFAULT_ORGANS: dict[str, tuple[str, ...]] = {
    organ: tuple(recipes) for organ, recipes in _RECIPES.items()
}


# --- from density maps to an RGB image -----------------------------------------------


def _stain_to_rgb(h: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert: light through stain layers, with per-image staining and scanner spread.

    Stain strength, stain hue, illumination and noise vary per image on purpose and more
    than any class difference in mean colour, so a classifier has to look at shapes.
    """
    mix_h, mix_e = rng.random(2)
    h_od = _H_OD[0] * (1 - mix_h) + _H_OD[1] * mix_h
    e_od = _E_OD[0] * (1 - mix_e) + _E_OD[1] * mix_e
    h_amount = _H_AMOUNT * rng.uniform(*_STAIN_STRENGTH)
    e_amount = _E_AMOUNT * rng.uniform(*_STAIN_STRENGTH)
    od = h[..., None] * (h_amount * h_od) + e[..., None] * (e_amount * e_od)
    light = rng.uniform(205, 255) * rng.uniform(0.96, 1.04, 3)  # lamp brightness and tint
    n = h.shape[0]
    ramp = np.linspace(-1, 1, n, dtype=np.float32)
    gx, gy = rng.uniform(-0.04, 0.04, 2)
    shading = 1 + gx * ramp[None, :] + gy * ramp[:, None]  # uneven illumination
    rgb = light * shading[..., None] * np.exp(-od)
    rgb += rng.normal(0, rng.uniform(1.5, 5.0), rgb.shape)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _check_names(organ: str, diagnosis: str) -> _Recipe:
    """The recipe for a pair, or a ValueError listing the names that have one."""
    if organ not in _RECIPES:
        known = ", ".join(sorted(_RECIPES))
        raise ValueError(f"unknown organ {organ!r}: the synthetic generator knows {known}")
    recipes = _RECIPES[organ]
    if diagnosis not in recipes:
        known = ", ".join(sorted(recipes))
        raise ValueError(
            f"unknown diagnosis {diagnosis!r} for organ {organ!r}: "
            f"the synthetic generator knows {known}"
        )
    return recipes[diagnosis]


def _is_int(value: object) -> bool:
    """True for ints, numpy ints included; bool is excluded because True is no count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_image_size(image_size: int) -> None:
    """Below 16 px a nucleus is under one pixel and the recipes draw nothing meaningful."""
    if not _is_int(image_size) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")


def render_image(
    organ: str, diagnosis: str, rng: np.random.Generator, image_size: int
) -> np.ndarray:
    """uint8 array (image_size, image_size, 3), RGB: one synthetic image of organ/diagnosis.

    Everything random comes from `rng`, so a generator seeded the same way gives the same
    image. Raises ValueError for names without a recipe or an image_size below 16.
    """
    recipe = _check_names(organ, diagnosis)
    _check_image_size(image_size)
    budget = _Budget(
        nuclear_mass=rng.uniform(*_NUCLEAR_MASS),
        structure_fraction=rng.uniform(*_STRUCTURE_FRACTION[organ]),
        eosin_level=rng.uniform(*_EOSIN_LEVEL),
    )
    cv = _Canvas(image_size, rng)
    recipe(cv, budget)
    rgb = _stain_to_rgb(*cv.finish(), rng)
    # Tissue has no up or down on the slide: any of the 8 square symmetries is as likely.
    rgb = np.rot90(rgb, int(rng.integers(4)))
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


def _image_rng(seed: int, organ: str, diagnosis: str, index: int) -> np.random.Generator:
    """The generator for one image, from a stable hash of its identity.

    zlib.crc32 instead of hash(): Python salts str hashes per process, which would make
    every run different. Seeding per image makes each file independent of the others.
    """
    key = [seed, zlib.crc32(organ.encode()), zlib.crc32(diagnosis.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _validated_organs(organs: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """The requested organs and diagnoses, checked against the recipes, duplicates dropped."""
    if organs is None:
        return {organ: list(diags) for organ, diags in DEFAULT_ORGANS.items()}
    out: dict[str, list[str]] = {}
    for organ, diagnoses in organs.items():
        if isinstance(diagnoses, str):
            raise ValueError(
                f"organs[{organ!r}] must be a list of diagnoses, not the string {diagnoses!r}"
            )
        if len(diagnoses) == 0:
            raise ValueError(f"organs[{organ!r}] lists no diagnoses")
        for diagnosis in diagnoses:
            _check_names(organ, diagnosis)
        out[organ] = list(dict.fromkeys(diagnoses))
    return out


def _write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    """Write a PNG under a hidden temporary name, then rename it into place.

    A reader (or a crash) never sees a half-written image; the temporary name starts with
    a dot, which the tree scanner skips. A plain open() rather than tempfile.mkstemp keeps
    the usual umask permissions (mkstemp makes files only their owner can read).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            Image.fromarray(rgb, mode="RGB").save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_synthetic_tree(
    out_dir: str | os.PathLike[str],
    *,
    organs: Mapping[str, Sequence[str]] | None = None,
    images_per_diagnosis: int = 60,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Writes out_dir/<organ>/<diagnosis>/<organ>_<diagnosis>_<index:05d>.png.

    Returns the number of images written. `organs` defaults to DEFAULT_ORGANS; names
    without a recipe, images_per_diagnosis < 1, image_size < 16 or a negative seed raise
    ValueError before anything is written. Existing files of the same name are replaced.
    """
    wanted = _validated_organs(organs)
    if not _is_int(images_per_diagnosis) or images_per_diagnosis < 1:
        raise ValueError(
            f"images_per_diagnosis must be an integer >= 1, got {images_per_diagnosis!r}"
        )
    _check_image_size(image_size)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    jobs = [(o, d, i) for o, ds in wanted.items() for d in ds for i in range(images_per_diagnosis)]
    root = Path(out_dir)
    for organ, diagnoses in wanted.items():
        for diagnosis in diagnoses:
            (root / organ / diagnosis).mkdir(parents=True, exist_ok=True)
    for organ, diagnosis, index in tqdm(jobs, disable=not progress, unit="img", desc="synth"):
        rgb = render_image(organ, diagnosis, _image_rng(seed, organ, diagnosis, index), image_size)
        name = f"{organ}_{diagnosis}_{index:05d}.png"
        _write_png_atomic(root / organ / diagnosis / name, rgb)
    return len(jobs)
