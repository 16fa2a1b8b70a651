"""The CPU graphic score: drawn images score high, photo-like ones low, at the default threshold."""
from __future__ import annotations

import numpy as np
from PIL import Image

from bench.bench_graphic import accuracy, graphic_scores
from curate.config import RebalanceConfig
from filters.graphic import flat_share, graphic_score, palette_sparsity


def test_measurements_on_extreme_images():
    flat = Image.new("RGB", (64, 48), (200, 30, 30))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert flat_share(np.asarray(flat.convert("L"))) == 1.0 and flat_share(np.asarray(noise.convert("L"))) < 0.05
    assert palette_sparsity(flat) > 0.99 and palette_sparsity(noise) == 0.0
    assert graphic_score(noise, np.asarray(noise.convert("L"))) < 0.05


def test_label_accuracy_on_a_small_labelled_set():
    """The smoke case of bench/bench_graphic.py: 6 images of each of 8 kinds through image_columns."""
    overall, by_kind = accuracy(graphic_scores(6, seed=5), RebalanceConfig().graphic_threshold)
    assert overall >= 0.9, by_kind
