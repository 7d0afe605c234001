"""The second stage of the near-duplicate test: colour correlation at the best alignment.

The first stage (neardup.py) compares rotation-invariant ring spectra of luminance. It
finds copies well, but it also finds look-alikes: on the real BCCD crops, thousands of
platelets from different smears (small purple blobs) pass it, and joined into clusters
those pairs chain most smears of a data set into one split unit. Copies and look-alikes
differ in what the spectra throw away: where each detail sits and its colour. So a
candidate pair is confirmed only if the two images, aligned as well as they can be,
correlate in colour.

Each image keeps a polar grid of its central disc: the central square, resized to 64 px,
blurred (σ = 0.7 px), sampled on RINGS rings × ANGLES angles in each RGB channel, then
standardised over the whole grid (so brightness and contrast do not count, but the
balance of the channels does). Alignment is searched exhaustively:
- rotation about the centre (any angle, in steps of 360°/ANGLES; the right-angle D4
  turns included) is a circular shift along the angle axis: all shifts at once are one
  FFT correlation per ring;
- a mirror image reverses the angle axis;
- the zoom that rotating and cropping gives (up to 1.33× at 25°) is a radial stretch:
  one grid's rings are resampled at radii × s for each s in ZOOMS, in either direction.
The score is the largest weighted (ring radius: area) correlation coefficient over all of
them, in [-1, 1]. neardup.py sets the threshold; bench/neardup.py measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

RINGS = 12
ANGLES = 48
CHANNELS = 3
ZOOMS = (1.0, 0.93, 0.86, 0.8, 0.75)  # radial stretches searched (1 / zoom of the copy)
GRID_BYTES = CHANNELS * RINGS * ANGLES + 2  # the grid, then the image's shorter side (uint16)
_SIDE = 64
_BLUR = 0.7
_STEP = 32.0  # int8 units per standard deviation: ±4 σ fit
_RADII = (np.arange(RINGS) + 0.5) / RINGS * 0.95  # fraction of the half side
_THETA = np.arange(ANGLES) * 2 * np.pi / ANGLES
_CENTRE = (_SIDE - 1) / 2
_YS = _CENTRE + np.outer(_RADII * _SIDE / 2, np.sin(_THETA))
_XS = _CENTRE + np.outer(_RADII * _SIDE / 2, np.cos(_THETA))
_WEIGHT = np.sqrt(_RADII)[None, :, None]  # sqrt: applied to both sides of the product
# Correlations at quarter-step rotations: the FFT's band-limited interpolation between the
# grid's angles (a 12° turn falls between two 7.5° steps; at the outer ring half a step is
# 2 px, enough to decorrelate fine texture).
_LAGS = 4 * ANGLES
_BATCH = 512  # pairs scored at once (bounds memory: ~20 MB a batch)


def grid(rgb: np.ndarray) -> bytes:
    """The GRID_BYTES-long polar colour grid of a uint8 H×W×3 (or H×W grey) image."""
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(rgb[top : top + side, left : left + side, :3]))
    resample = Image.Resampling.BOX if side >= _SIDE else Image.Resampling.BICUBIC
    pixels = np.asarray(square.resize((_SIDE, _SIDE), resample), np.float32)
    rings = np.stack(
        [
            ndimage.map_coordinates(
                ndimage.gaussian_filter(pixels[..., c], _BLUR), [_YS, _XS], order=1, mode="nearest"
            )
            for c in range(CHANNELS)
        ]
    )
    rings = (rings - rings.mean()) / (rings.std() + 1e-6)
    quantised = np.clip(np.round(rings * _STEP), -127, 127).astype(np.int8).tobytes()
    return quantised + np.array([min(side, 65535)], "<u2").tobytes()


def sides(grids: Sequence[bytes]) -> np.ndarray:
    """The shorter side, px, of each grid's image: how much detail its grid could hold (a
    30 px crop is upsampled to 64 px, and blurred look-alikes then correlate closely)."""
    return np.array([int(np.frombuffer(g[-2:], "<u2")[0]) for g in grids], np.int64)


def decode(grids: Sequence[bytes]) -> np.ndarray:
    """(n, CHANNELS, RINGS, ANGLES) float32 grids."""
    if len(grids) == 0:
        return np.zeros((0, CHANNELS, RINGS, ANGLES), np.float32)
    raw = np.frombuffer(b"".join(g[:-2] for g in grids), np.int8)
    return raw.reshape(-1, CHANNELS, RINGS, ANGLES).astype(np.float32) / _STEP


def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The best-alignment correlation of row-aligned decoded grids (k, C, R, A) → (k,)."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), _BATCH):
        stop = start + _BATCH
        out[start:stop] = _scores(a[start:stop], b[start:stop])
    return out


def _scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    stretched_a, stretched_b = _normalised(_stretched(a)), _normalised(_stretched(b))
    # Featureless images (blank tiles, a uniform background) have nothing to align: two of
    # them are the same picture, one against a picture with detail is not.
    flat_a, flat_b = (np.abs(x).reshape(len(x), -1).max(axis=1) == 0 for x in (a, b))
    best = np.where(flat_a & flat_b, 1.0, -1.0).astype(np.float32)
    # a's inner rings against the whole of b, then b's inner rings against the whole of a
    for inner, whole in ((stretched_a, stretched_b[:, :1]), (stretched_b, stretched_a[:, :1])):
        spectrum = np.fft.rfft(inner, axis=-1)
        for turned in (whole, whole[..., ::-1]):  # as is, and mirrored
            product = spectrum * np.conj(np.fft.rfft(turned, axis=-1))
            # irfft divides by its length: _LAGS / ANGLES undoes the padding's share.
            lagged = np.fft.irfft(product, n=_LAGS, axis=-1) * (_LAGS / ANGLES)
            correlation = lagged.sum(axis=(-3, -2))
            best = np.maximum(best, correlation.max(axis=(-2, -1)))
    return best


_RADIAL = []
for _zoom in ZOOMS:
    _position = np.interp(_RADII * _zoom, _RADII, np.arange(RINGS))
    _low = np.floor(_position).astype(int)
    _RADIAL.append((_low, np.minimum(_low + 1, RINGS - 1), (_position - _low)[:, None]))


def _stretched(grids: np.ndarray) -> np.ndarray:
    """(k, len(ZOOMS), C, R, A): each grid's rings resampled at radii × each zoom."""
    return np.stack(
        [grids[:, :, low] * (1 - f) + grids[:, :, high] * f for low, high, f in _RADIAL], axis=1
    )


def _normalised(x: np.ndarray) -> np.ndarray:
    """Zero mean, area-weighted, unit norm over (C, R, A): products are correlations."""
    x = (x - x.mean(axis=(-3, -2, -1), keepdims=True)) * _WEIGHT
    return x / (np.sqrt((x * x).sum(axis=(-3, -2, -1), keepdims=True)) + 1e-9)
