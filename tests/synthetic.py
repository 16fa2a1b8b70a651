"""A finished run directory made without Ray or models: manifest, config, stats, models.json, raw tars.

Every reason appears, duplicates name a kept row, rebalance drops cartoons, the models are labelled
random and one scorer is skipped, so the report and inspect have everything to show.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from filters.buckets import SDXL_BUCKETS, bucket_name, nearest_buckets
from manifests.schema import REASONS, build

STYLES = ["photo", "cartoon", "anime", "painting"]
CONFIG = {"filters": {"min_side": 200, "max_aspect_ratio": 3.0, "min_entropy": 1.0, "min_edge_density": 0.0,
                      "nsfw_max": 0.5, "watermark_max": 0.8, "text_area_max": 0.2, "clip_min": 0.2,
                      "aesthetic_min": 4.5},
          "text": {"min_chars": 5, "max_chars": 300, "min_zh_ratio": 0.25, "max_repeat_ratio": 0.4}}
WARNING = "models ran with RANDOM weights: every model score is meaningless"
RULES_OFF = {"watermark": "the watermark scorer is not enabled (models.enabled)"}   # as decide records it


def jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Small real JPEGs: colour gradients with noise, each different."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = 96 + 16 * (i % 3), 128
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x * 2 % 256, y * 2 % 256, np.full_like(x, 40 * i % 256)], -1).astype(np.float64)
        rgb += rng.normal(0, 4, rgb.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=60)
        out.append(buf.getvalue())
    return out


def manifest_columns(n: int, shards: int, seed: int = 0) -> dict:
    """Plain columns of a plausible manifest (every declared type) with n rows over `shards` shards."""
    rng = np.random.default_rng(seed)
    names = [None] * 8 + list(REASONS)
    reason = np.array([names[i] for i in rng.integers(0, len(names), n)], dtype=object)
    per = -(-n // shards)
    shard = [f"{i // per:05d}" for i in range(n)]
    key = [f"{i // per:05d}_{i % per:06d}" for i in range(n)]
    style = np.array([STYLES[i] for i in rng.integers(0, len(STYLES), n)], dtype=object)
    style[reason == "rebalanced"] = "cartoon"
    kept = np.flatnonzero(reason == None)  # noqa: E711
    dup_of = np.full(n, None, dtype=object)
    dups = np.flatnonzero(reason == "duplicate")
    dup_of[dups] = np.array(key, dtype=object)[kept[rng.integers(0, max(len(kept) // 20, 1), len(dups))]]
    nsfw = rng.beta(0.5, 8, n)
    nsfw[reason == "nsfw"] = rng.uniform(0.5, 1, int((reason == "nsfw").sum()))
    text_area = rng.beta(0.3, 8, n)
    text_area[reason == "text_heavy"] = rng.uniform(0.2, 0.8, int((reason == "text_heavy").sum()))
    fetched = ~np.isin(reason, ["download_failed", "shard_failed"])
    return {
        "key": key, "shard": shard, "url": [f"http://127.0.0.1/{k}.jpg" for k in key],
        "caption": [f"一只橘猫在草地上晒太阳 {i}" for i in range(n)],
        "status": np.where(fetched, "success", "failed_to_download").tolist(),
        "original_width": rng.integers(64, 2000, n).astype(np.int32),
        "original_height": rng.integers(64, 2000, n).astype(np.int32),
        "aspect_ratio": 1 + rng.exponential(0.6, n), "entropy": rng.uniform(0, 8, n),
        "edge_density": rng.uniform(0, 0.3, n), "jpeg_bpp": rng.uniform(0.3, 5, n),
        "caption_norm": [f"一只橘猫在草地上晒太阳 {i}" for i in range(n)],
        "n_chars": rng.integers(1, 400, n).astype(np.int32), "zh_ratio": rng.uniform(0, 1, n),
        "repeat_ratio": rng.uniform(0, 0.6, n), "clip_score": rng.normal(0.3, 0.06, n),
        "aesthetic": rng.normal(5.5, 1.0, n), "nsfw": nsfw, "watermark": rng.beta(0.5, 3, n),
        "text_area": text_area, "text_boxes": (text_area * 40).astype(np.int32),
        "style": style.tolist(), "style_prob": rng.uniform(0.3, 1, n),
        "keep": (reason == None).tolist(), "reason": reason.tolist(), "dup_of": dup_of.tolist(),  # noqa: E711
        "style_label": style.tolist(),   # rebalance counted the zero-shot style (style_source: clip)
        "bucket": _buckets(rng, reason == None),  # noqa: E711 (drawn last: the other columns stay as they were)
    }


def _buckets(rng: np.random.Generator, kept: np.ndarray) -> list:
    """Kept rows' nearest SDXL bucket of a random stored size, as write gives it; null for dropped rows."""
    width = rng.integers(64, 2000, len(kept))
    index = nearest_buckets(width, width * rng.uniform(0.45, 2.2, len(kept)), list(SDXL_BUCKETS))
    return [bucket_name(*SDXL_BUCKETS[i]) if k else None for i, k in zip(index, kept)]


def make_run(root: Path, n: int, shards: int = 4, seed: int = 0, images: int = 8) -> Path:
    """Write the run directory; every fetched row's raw tar member is one of `images` real JPEGs."""
    root.mkdir(parents=True, exist_ok=True)
    cols = manifest_columns(n, shards, seed)
    pq.write_table(build(cols), root / "manifest.parquet", compression="zstd", row_group_size=max(n // 3, 1))
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    (root / "models.json").write_text(json.dumps({
        "enabled": ["clip_score", "aesthetic", "nsfw"], "weights": "random", "warning": WARNING,
        "skipped": {"watermark": "weights for watermark are not cached (offline)"}}))
    buckets: dict = {bucket_name(*b): 0 for b in SDXL_BUCKETS}
    for b in cols["bucket"]:
        if b is not None:
            buckets[b] += 1
    (root / "stats.json").write_text(json.dumps({
        "timings": {"download": 12.5, "score": 30.1, "decide": 0.4, "write": 3.2}, "failures": [],
        "buckets": buckets}))
    (root / "decisions").mkdir(exist_ok=True)
    (root / "decisions" / "_decided.json").write_text(json.dumps({"rules_off": RULES_OFF}))
    data = jpegs(images, seed)
    (root / "raw").mkdir(exist_ok=True)
    fetched = np.array(cols["status"]) == "success"
    shard_of = np.array(cols["shard"])
    for shard in sorted(set(cols["shard"])):
        with open(root / "raw" / f"{shard}.tar", "wb") as f:
            for i in np.flatnonzero((shard_of == shard) & fetched):
                image = data[i % images]
                f.write(_ustar_header(f"{cols['key'][i]}.jpg", len(image)))
                f.write(image + bytes(-len(image) % 512))
            f.write(bytes(1024))
    return root


def _ustar_header(name: str, size: int) -> bytes:
    """A regular-file USTAR header; tarfile's own builder costs ~100 us a member, this ~5."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:124] = b"0000644\x000000000\x000000000\x00"
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)
