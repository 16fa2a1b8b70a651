"""Near-duplicate quality of the view hashes: recall per transform, precision, false merges.

Prints JSON. Two measurements, both seeded (bench/scenes.py draws every image):
- quality: n scenes and a copy of each under every transform of bench/scenes.TRANSFORMS
  (JPEG q30-95, resize 0.5-2x, crops of up to 5% centred / one side / one corner, brightness,
  contrast and saturation within 10%, mirror, and pairs of these), hashed through the score
  stage's own path (filters/image.image_columns on JPEG bytes). Every pair of all images is
  compared under the matching rule (filters/multihash.MATCHES) by brute force: recall per
  transform (copy against its original), precision over all pairs, and the closest pair of
  distinct scenes. The same figures for one whole-image hash show what the views buy, and for
  every view against every view (144 pairs instead of 44) what the wider rule would add.
- false merges: m distinct images (scenes, overlapping views of one wide scene sharing at most
  half their width, flat images of similar colour) through the real candidate search
  (curate/dedupe.py: classes, bands, sub-bands, verification) at the default distance and two
  bits above it; every row that would be merged is a false merge.

    python -m bench.bench_near_dup            # quick: 200 scenes, 50,000 distinct images
    python -m bench.bench_near_dup --full     # 400 scenes, 100,000 distinct images
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.scenes import TRANSFORMS, flat, is_geometric, jpeg, scene, views_of_one_scene
from curate.config import DedupeConfig, DownloadConfig, ScoreConfig
from curate.dedupe import MAX_BUCKET, class_keys, partition_pairs, route
from filters.image import image_columns
from filters.multihash import MATCHES, VIEWS, view_hashes

SIZES = {"smoke": (24, 600), "quick": (200, 50_000), "full": (400, 100_000)}
PARTITIONS = 8


def pipeline_hashes(images: list) -> np.ndarray:
    """(n, len(VIEWS)) hashes exactly as the score stage computes them, from JPEG bytes."""
    cols, _ = image_columns([jpeg(img) for img in images], decode_side=ScoreConfig().decode_size,
                            max_pixels=DownloadConfig().max_pixels)
    return np.column_stack([np.array(cols["phash"], np.uint64), np.array(cols["phash_views"], np.uint64)])


def rule_distance(hashes: np.ndarray, rule: np.ndarray) -> np.ndarray:
    """(n, n) smallest Hamming distance over the view pairs the rule compares."""
    n = len(hashes)
    best = np.full((n, n), 64, np.uint8)
    for a, b in zip(*np.nonzero(rule)):
        np.minimum(best, np.bitwise_count(hashes[:, a][:, None] ^ hashes[:, b][None, :]).astype(np.uint8), out=best)
    return best


def _scores(dist: np.ndarray, origin: np.ndarray, kind: np.ndarray, distance: int) -> dict:
    i, j = np.triu_indices(len(origin), 1)
    same = origin[i] == origin[j]
    said = dist[i, j] <= distance
    recall = {}
    for name in TRANSFORMS:
        copies = np.flatnonzero(kind == name)
        recall[name] = round(float((dist[origin[copies], copies] <= distance).mean()), 4)
    tp = int((said & same).sum())
    return {"recall": recall, "precision": round(tp / max(1, int(said.sum())), 6),
            "false_pairs": int((said & ~same).sum()), "pairwise_recall": round(tp / int(same.sum()), 4),
            "closest_distinct_bits": int(dist[i, j][~same].min())}


def near_dup_quality(n: int, seed: int = 0, distance: int | None = None) -> dict:
    """Recall per transform, precision and the closest distinct pair, for the views and for one hash."""
    distance = DedupeConfig().phash_max_distance if distance is None else distance
    rng = np.random.default_rng(seed)
    originals = [scene(rng, int(rng.integers(240, 640)), int(rng.integers(240, 640))) for _ in range(n)]
    blocks, kinds = [pipeline_hashes(originals)], ["original"] * n
    for t, (name, transform) in enumerate(TRANSFORMS.items()):
        t_rng = np.random.default_rng([seed, t])
        blocks.append(pipeline_hashes([transform(img, t_rng) for img in originals]))
        kinds += [name] * n
    hashes = np.concatenate(blocks)
    origin, kind = np.tile(np.arange(n), len(TRANSFORMS) + 1), np.array(kinds)
    ours = _scores(rule_distance(hashes, MATCHES), origin, kind, distance)
    whole_only = np.zeros_like(MATCHES)
    whole_only[0, 0] = True
    one = _scores(rule_distance(hashes, whole_only), origin, kind, distance)
    every = _scores(rule_distance(hashes, np.ones_like(MATCHES)), origin, kind, distance)
    return {"scenes": n, "images": len(hashes), "distance": distance, **ours,
            "min_recall_crops_mirrors": min(v for k, v in ours["recall"].items() if is_geometric(k)),
            "min_recall_others": min(v for k, v in ours["recall"].items() if not is_geometric(k)),
            "one_whole_hash": one, "every_view_pair": every}


def distinct_hashes(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """View hashes of m distinct small images (the hashes read a <= 256 px thumbnail), drawn and
    hashed one at a time, and their kind names: 70% scenes, 15% views of wide scenes (5 per scene,
    neighbours sharing 30-50% of their width), 15% flat images around 8 colours."""
    rng = np.random.default_rng(seed)
    hashes, kinds = [], []

    def add(img, kind: str) -> None:
        hashes.append(view_hashes(np.asarray(img.convert("L"))))
        kinds.append(kind)

    for _ in range(int(m * 0.15) // 5):
        for img in views_of_one_scene(rng, 5, int(rng.integers(96, 160)), float(rng.uniform(0.3, 0.5))):
            add(img, "overlapping_view")
    colours = rng.uniform(30, 225, (8, 3))
    for i in range(int(m * 0.15)):
        add(flat(rng, int(rng.integers(96, 160)), int(rng.integers(96, 160)), colours[i % 8]), "flat")
    while len(hashes) < m:
        add(scene(rng, int(rng.integers(96, 160)), int(rng.integers(96, 160))), "scene")
    return np.array(hashes), np.array(kinds)


def merged_rows(hashes: np.ndarray, distance: int) -> np.ndarray:
    """Rows the real search (route + partition_pairs over PARTITIONS) pairs with another image,
    or puts in one class with another (an equal whole-image hash)."""
    n = len(hashes)
    node = {"row": np.arange(n, dtype=np.int64), "pref": np.zeros((n, 1)), "caption": np.zeros(n, np.uint64),
            "sha": np.zeros(n, np.uint64), "phash": hashes, "phash_valid": np.ones(n, bool)}
    search, _ = route([node], False, distance, 1, PARTITIONS)
    pairs = [partition_pairs(distance, None, MAX_BUCKET, 1, [p])[0] for p in search]
    cls = class_keys(node, False, True)
    paired = np.concatenate([np.concatenate([p["a"], p["b"]]) for p in pairs])
    uniq, count = np.unique(cls, return_counts=True)
    return np.flatnonzero(np.isin(cls, paired) | np.isin(cls, uniq[count > 1]))


def false_merges(m: int, seed: int = 0) -> dict:
    """Rows merged among m distinct images at the default distance and 2 bits above it, by kind."""
    distance = DedupeConfig().phash_max_distance
    started = time.perf_counter()
    hashes, kinds = distinct_hashes(m, seed)
    hashed = time.perf_counter()
    out = {"images": m, "by_kind": {k: int((kinds == k).sum()) for k in np.unique(kinds)}}
    for d in (distance, distance + 2):
        rows = merged_rows(hashes, d)
        out[f"merged_rows_at_{d}"] = int(len(rows))
        out[f"merged_by_kind_at_{d}"] = {k: int((kinds[rows] == k).sum()) for k in np.unique(kinds[rows])}
    out["seconds"] = {"draw_and_hash": round(hashed - started, 1), "search": round(time.perf_counter() - hashed, 1)}
    return out


def run(mode: str) -> dict:
    scenes, distinct = SIZES[mode]
    quality = near_dup_quality(scenes, seed=0)
    merges = false_merges(distinct, seed=1)
    return {"views": [v.name for v in VIEWS], "view_pairs_compared": int(MATCHES.sum()),
            "quality": quality, "false_merges": merges,
            "ratios": {"near_dup.min_recall_crops_mirrors": quality["min_recall_crops_mirrors"],
                       "near_dup.min_recall_others": quality["min_recall_others"],
                       "near_dup.precision": quality["precision"],
                       "near_dup.false_merges_50k": merges[f"merged_rows_at_{quality['distance']}"]
                       if distinct >= 50_000 else None}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run("full" if args.full else "smoke" if args.smoke else "quick"), indent=2))
