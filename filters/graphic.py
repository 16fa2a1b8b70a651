"""A CPU `graphic` score: how much a thumbnail looks drawn (cartoon, illustration, render,
screenshot) rather than photographed, from the pixels the score stage already decoded.

Photos carry sensor grain and thousands of colours everywhere; drawn images are made of flat
or smoothly shaded regions and a small palette. Two measurements capture that:
- flat share: pixels whose gray value differs by at most 1 from the right and lower neighbour;
- palette sparsity: 1 - (distinct colours at 4 bits per channel on a 64x64 view) / PALETTE_FULL.
The score is the larger of the two (0..1). decide turns it into a coarse photo / graphic label
at rebalance.graphic_threshold; bench/bench_graphic.py measures the accuracy of that threshold.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PALETTE_SIDE = 64
PALETTE_FULL = 120    # distinct 12-bit colours on a 64x64 view at or above which an image has a photo's palette


def flat_share(gray: np.ndarray) -> float:
    """Share of pixels equal (within 1) to both their right and lower neighbour."""
    g = gray.astype(np.int16)
    if g.shape[0] < 2 or g.shape[1] < 2:
        return 1.0
    flat = (np.abs(g[:-1, 1:] - g[:-1, :-1]) <= 1) & (np.abs(g[1:, :-1] - g[:-1, :-1]) <= 1)
    return float(flat.mean())


def palette_sparsity(rgb: Image.Image) -> float:
    """1 for a handful of colours, 0 for a photo's palette (PALETTE_FULL or more at 4 bits per channel)."""
    q = np.asarray(rgb.resize((PALETTE_SIDE, PALETTE_SIDE), Image.Resampling.NEAREST), np.uint16) >> 4
    colours = np.unique((q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]).size
    return float(max(0.0, 1.0 - colours / PALETTE_FULL))


def graphic_score(rgb: Image.Image, gray: np.ndarray) -> float:
    """0 (photo-like) .. 1 (drawn): the larger of flat share and palette sparsity."""
    return max(flat_share(gray), palette_sparsity(rgb))
