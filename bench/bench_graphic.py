"""Accuracy of the CPU `graphic` score's photo / graphic label on a seeded labelled set.

Prints JSON: per kind (bench/scenes.LABELLED: photo-like scenes with and without grain, the
demo's photos; cartoons, text images, illustrations, renders, screenshots) the share labelled
right at rebalance.graphic_threshold, overall accuracy, and the accuracy at other thresholds,
so the default can be checked. Images go through the score stage's own path (JPEG bytes,
filters/image.image_columns), at JPEG qualities 60-95.

    python -m bench.bench_graphic [--full]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from bench.scenes import LABELLED, jpeg
from curate.config import DownloadConfig, RebalanceConfig, ScoreConfig
from filters.image import image_columns

SIZES = {"smoke": 6, "quick": 60, "full": 200}


def graphic_scores(per_kind: int, seed: int = 0) -> dict[str, np.ndarray]:
    """kind -> graphic scores of `per_kind` images of that kind."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, (make, _) in LABELLED.items():
        data = [jpeg(make(rng, int(rng.integers(200, 640)), int(rng.integers(200, 640))), int(rng.integers(60, 96)))
                for _ in range(per_kind)]
        cols, _ = image_columns(data, decode_side=ScoreConfig().decode_size, max_pixels=DownloadConfig().max_pixels)
        out[kind] = np.array(cols["graphic"], np.float64)
    return out


def accuracy(scores: dict[str, np.ndarray], threshold: float) -> tuple[float, dict[str, float]]:
    right = {kind: float(np.mean((s >= threshold) == (LABELLED[kind][1] == "graphic"))) for kind, s in scores.items()}
    total = sum(len(s) for s in scores.values())
    return sum(right[k] * len(s) for k, s in scores.items()) / total, right


def run(mode: str) -> dict:
    scores = graphic_scores(SIZES[mode])
    threshold = RebalanceConfig().graphic_threshold
    overall, per_kind = accuracy(scores, threshold)
    sweep = {f"{t:.2f}": round(accuracy(scores, t)[0], 4) for t in np.arange(0.3, 0.81, 0.05)}
    return {"per_kind": SIZES[mode], "threshold": threshold, "accuracy": round(overall, 4),
            "right_by_kind": {k: round(v, 4) for k, v in per_kind.items()},
            "score_quantiles_by_kind": {k: np.percentile(s, [5, 50, 95]).round(3).tolist() for k, s in scores.items()},
            "accuracy_by_threshold": sweep, "ratios": {"graphic.accuracy": round(overall, 4)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    print(json.dumps(run("full" if parser.parse_args().full else "quick"), indent=2))
