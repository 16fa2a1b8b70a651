"""Aspect-ratio buckets for multi-aspect training (SDXL-style resolutions of about 1 megapixel).

A trainer resizes and crops each image to one of a few resolutions, chosen by aspect ratio so
the crop loses least. The nearest bucket is the one whose aspect ratio is closest on a log
scale (4:3 and 3:4 are equally far from 1:1), from the image as served, so what the trainer
reads in the sample's JSON (original size, stored size, bucket) is all it needs.
"""
from __future__ import annotations

import numpy as np

# The nine ~1 MP resolutions (multiples of 64) commonly used for SDXL fine-tuning, from
# 1:1 out to 2.4:1 both ways; the first is the default for a square image.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)


def bucket_name(width: int, height: int) -> str:
    return f"{width}x{height}"


def nearest_buckets(width: np.ndarray, height: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """Index of the nearest bucket per image (-1 where the size is unknown or not positive)."""
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    ok = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
    ratio = np.log(np.where(ok, w, 1.0) / np.where(ok, h, 1.0))
    targets = np.log(np.array([bw / bh for bw, bh in buckets], np.float64))
    index = np.argmin(np.abs(ratio[:, None] - targets[None, :]), axis=1)
    return np.where(ok, index, -1)
