"""Aspect-ratio buckets: nearest on a log scale, symmetric, unknown sizes left out."""
from __future__ import annotations

import numpy as np

from filters.buckets import SDXL_BUCKETS, bucket_name, nearest_buckets


def test_nearest_bucket_by_log_aspect_ratio():
    sizes = np.array([[800, 800], [1600, 1200], [1200, 1600], [3000, 1000], [1000, 3000], [640, 480], [0, 10]])
    index = nearest_buckets(sizes[:, 0], sizes[:, 1], list(SDXL_BUCKETS))
    names = [bucket_name(*SDXL_BUCKETS[i]) if i >= 0 else None for i in index]
    assert names == ["1024x1024", "1152x896", "896x1152", "1536x640", "640x1536", "1152x896", None]


def test_every_bucket_is_about_a_megapixel_in_multiples_of_64():
    for w, h in SDXL_BUCKETS:
        assert w % 64 == 0 and h % 64 == 0 and 0.9e6 <= w * h <= 1.1e6
        assert nearest_buckets(np.array([w]), np.array([h]), list(SDXL_BUCKETS))[0] == SDXL_BUCKETS.index((w, h))
