"""Perceptual hashes of several views of one image: the whole, its mirror, and crop windows.

One 64-bit DCT hash cannot see a crop or a mirror: a 5% crop shifts the content under the
DCT basis and flips 6-20 bits, a mirror flips about half. So each image gets a hash per view,
and two images are near copies when some view of one is close to some view of the other
(the views compared are `MATCHES`, chosen by bench/bench_near_dup.py and documented there).

Each view's hash is the classic pHash bit rule (the 8x8 lowest DCT frequencies against their
median) computed as a projection: the gray thumbnail is box-averaged once onto a GRID x GRID
square (pHash squashes too), and the low-frequency cosines of each window are sampled on that
grid with fractional weights at the window's edges, so a window costs two 8 x GRID matrix
products with precomputed bases and no resize of its own. Mirroring negates the odd horizontal
frequencies, so a mirrored view costs a sign flip.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

BITS = 8                     # 8x8 frequencies -> 64 bits
GRID = 64                    # side of the square every view is projected from: 8x the highest frequency


@dataclass(frozen=True)
class View:
    """A window of the image as fractions of its height and width, optionally mirrored."""
    name: str
    top: float = 0.0
    left: float = 0.0
    size: float = 1.0        # share of each side the window spans
    mirror: bool = False


def _windows(size: float) -> list[View]:
    """Windows anchored at the four corners and the centre, spanning `size` of each side."""
    far, mid = 1.0 - size, (1.0 - size) / 2
    pct = round(size * 100)
    return [View(f"tl{pct}", 0.0, 0.0, size), View(f"tr{pct}", 0.0, far, size),
            View(f"bl{pct}", far, 0.0, size), View(f"br{pct}", far, far, size),
            View(f"c{pct}", mid, mid, size)]


# The hash set; `phash` holds VIEWS[0], `phash_views` the rest in this order.
VIEWS: tuple[View, ...] = (View("whole"), View("mirror", mirror=True), *_windows(0.96), *_windows(0.92))
ANCHORS = frozenset({"whole", "mirror"})
# The matching rule: a pair is a candidate when an anchor hash (whole or mirror) of one image is
# within the distance of any hash of the other. 44 of the 144 view pairs: it catches crops,
# mirrors and both together against the original, with far fewer chances of a false merge than
# every view against every view (see bench/README.md for the measurements).
MATCHES: np.ndarray = np.array([[a.name in ANCHORS or b.name in ANCHORS for b in VIEWS] for a in VIEWS])


@cache
def _basis(length: int, start: float, span: float) -> np.ndarray:
    """(BITS, length) low-frequency cosines over the window [start, start + span) of `length` pixels.

    Pixels the window covers in part are weighted by the share covered; pixels outside are 0.
    """
    edges = np.arange(length + 1, dtype=np.float64)
    lo, hi = start * length, (start + span) * length
    cover = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, 1.0)
    centre = (np.clip((edges[:-1] + edges[1:]) / 2, lo, hi) - lo) / (hi - lo)
    k = np.arange(BITS)[:, None]
    return (np.cos(np.pi * k * centre[None, :]) * cover[None, :] / (hi - lo)).astype(np.float32)


_MIRROR = np.where(np.arange(BITS) % 2 == 1, -1.0, 1.0).astype(np.float32)   # odd horizontal frequencies
_WEIGHTS = np.uint64(1) << np.arange(BITS * BITS - 1, -1, -1, dtype=np.uint64)  # first bit is the highest


def frequencies(gray: np.ndarray, views: tuple[View, ...] = VIEWS) -> np.ndarray:
    """(len(views), 8, 8) low DCT frequencies (rows: vertical, columns: horizontal) of each view."""
    grid = np.asarray(Image.fromarray(np.asarray(gray, np.uint8)).resize((GRID, GRID), Image.Resampling.BOX),
                      np.float32)
    col_keys = list(dict.fromkeys((v.left, v.size) for v in views))
    projected = grid @ np.concatenate([_basis(GRID, *k).T for k in col_keys], axis=1)   # (GRID, 8 * columns)
    out = np.empty((len(views), BITS, BITS), np.float32)
    for i, v in enumerate(views):
        c = col_keys.index((v.left, v.size))
        out[i] = _basis(GRID, v.top, v.size) @ projected[:, c * BITS:(c + 1) * BITS]
        if v.mirror:
            out[i] *= _MIRROR[None, :]
    return out


def to_hashes(freq: np.ndarray) -> np.ndarray:
    """The pHash bit rule per view: each frequency above the view's median is a 1 bit."""
    flat = freq.reshape(len(freq), -1)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def view_hashes(gray: np.ndarray, views: tuple[View, ...] = VIEWS) -> np.ndarray:
    """One 64-bit hash per view of a gray image (uint64, in the order of `views`)."""
    return to_hashes(frequencies(gray, views))
