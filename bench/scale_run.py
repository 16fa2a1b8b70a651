"""A synthetic scored run at any size: what download and score leave, with realistic columns.

Each shard is built with numpy and Arrow only (a few hundred ms for 10k rows), in worker
processes, straight through the storage module: raw/{shard}.parquet and .tar (a tiny real JPEG
per success, in a shuffled "download" order), scores/{shard}.parquet, their markers and the plan.
The mix is meant to exercise every decide step at its real share: about 8% failed downloads,
a spread of sizes, aspect ratios, texture and scores, 3% captions shared by many images, 2%
exact copies (same sha256) and 3% near copies (pHash 1-3 bits away) of rows in other shards.
"""
from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.config import InputConfig
from curate.inputs import signature
from curate.rundir import RunDir, row_keys
from curate.storage import Storage
from curate.tario import TarWriter
from manifests.schema import arrow_schema

STYLES = np.array(["photo", "cartoon", "anime", "illustration", "painting"])
STYLE_P = [0.55, 0.2, 0.1, 0.1, 0.05]
PHRASES = ["一只猫坐在窗台上", "夕阳下的海边小镇", "雪山脚下的湖泊", "城市夜景与霓虹灯", "古风庭院里的桃花",
           "一碗热腾腾的牛肉面", "卡通风格的小熊", "秋天的银杏大道", "穿汉服的女孩", "高清风景壁纸"]
COMMON = ["图片", "高清大图", "点击查看原图", "壁纸"]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a content id's stable 64-bit fingerprint (sha256 and pHash stand-ins)."""
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 90, 40)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _strings(prefix: str, values: pa.Array, suffix: str = "") -> pa.Array:
    n = len(values)
    return pc.binary_join_element_wise(pa.array([prefix] * n), values, pa.array([suffix] * n), "")


def make_shard(root: str, index: int, rows: int, total_shards: int, seed: int = 0) -> int:
    """Write one shard's raw and score files and markers; returns its successful rows."""
    run = RunDir(root, Storage())
    shard = f"{index:05d}"
    rng = np.random.default_rng([seed, index])
    row_id = (np.int64(index) << 32) | np.arange(rows, dtype=np.int64)
    keys = row_keys(row_id)
    ok = rng.random(rows) >= 0.08
    # Content ids: a row's own id, or (exact copies) the id of a row in another shard.
    content = row_id.copy()
    copy = rng.random(rows) < 0.02
    other = rng.integers(0, total_shards, rows).astype(np.int64) << 32 | rng.integers(0, rows, rows)
    content[copy] = other[copy]
    sha = _mix(content)
    near = (rng.random(rows) < 0.03) & ~copy
    phash = _mix(np.where(near, other, content) ^ np.int64(0x5DEECE66D))
    flips = np.zeros(rows, np.uint64)
    for _ in range(3):
        flips |= np.uint64(1) << rng.integers(0, 64, rows).astype(np.uint64)
    phash = np.where(near, phash ^ flips, phash)
    sha_hex = pa.array([f"{v:016x}" * 4 for v in sha.tolist()])
    phrase = np.array(PHRASES)[rng.integers(0, len(PHRASES), rows)]
    common = rng.random(rows) < 0.03
    caption = np.where(common, np.array(COMMON)[rng.integers(0, len(COMMON), rows)],
                       np.char.add(phrase, keys.to_numpy(zero_copy_only=False).astype(str)))
    side = rng.lognormal(6.4, 0.5, (rows, 2)).clip(64, 4000).astype(np.int32)
    status = np.where(ok, "success", "failed_to_download")
    raw = pa.table({
        "key": keys, "row_id": row_id, "shard": pa.array([shard] * rows),
        "url": _strings("http://127.0.0.1/img/", keys, ".jpg"), "caption": pa.array(caption),
        "status": pa.array(status), "error": pa.array(np.where(ok, None, "HTTP Error 404: Not Found")),
        "width": pa.array(np.where(ok, 8, None), pa.int32()), "height": pa.array(np.where(ok, 8, None), pa.int32()),
        "original_width": pa.array(np.where(ok, side[:, 0], None), pa.int32()),
        "original_height": pa.array(np.where(ok, side[:, 1], None), pa.int32()),
        "sha256": pa.array(np.where(ok, sha_hex.to_numpy(zero_copy_only=False), None), pa.string()),
    }).cast(arrow_schema(["key", "row_id", "shard", "url", "caption", "status", "error", "width", "height",
                          "original_width", "original_height", "sha256"]))
    run.storage.write_parquet(raw, run.raw_table(shard))
    image = _jpeg()
    names = keys.to_pylist()
    with run.storage.open_output(run.raw_tar(shard)) as f:
        tar = TarWriter(f)
        for j in rng.permutation(np.flatnonzero(ok)).tolist():
            tar.add(f"{names[j]}.jpg", image + names[j].encode())
        tar.close()
    run.mark("download", shard, {"rows": rows, "success": int(ok.sum()), "tar_bytes": 0})

    def unit(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, rows).astype(np.float32)

    n_chars = pc.utf8_length(raw.column("caption")).to_numpy().astype(np.int32)
    scores = pa.table({
        "key": keys, "shard": pa.array([shard] * rows),
        "score_error": pa.array(np.where(ok & (rng.random(rows) < 0.005), "decode_error: truncated", None),
                                pa.string()),
        "aspect_ratio": (side.max(1) / side.min(1)).astype(np.float32), "entropy": unit(2, 8),
        "edge_density": unit(0, 0.4), "jpeg_bpp": unit(0.5, 4), "phash": pa.array(phash, pa.uint64()),
        "caption_norm": raw.column("caption"), "n_chars": n_chars, "n_words": (n_chars // 2).astype(np.int32),
        "zh_ratio": unit(0.6, 1), "latin_ratio": unit(0, 0.3), "repeat_ratio": unit(0, 0.1),
        "n_sentences": np.ones(rows, np.int32), "caption_junk": rng.random(rows) < 0.01,
        "blocked_term": pa.nulls(rows, pa.string()),
        "clip_score": rng.normal(0.3, 0.05, rows).astype(np.float32),
        "aesthetic": rng.normal(5.3, 0.8, rows).astype(np.float32),
        "nsfw": rng.beta(1, 30, rows).astype(np.float32), "watermark": rng.beta(1, 6, rows).astype(np.float32),
        "style": pa.array(STYLES[rng.choice(len(STYLES), rows, p=STYLE_P)]), "style_prob": unit(0.3, 1),
    })
    run.storage.write_parquet(scores.cast(arrow_schema(scores.column_names)), run.scores(shard))
    run.mark("score", shard, {"rows": rows})
    return int(ok.sum())


def make_run(root: str, rows: int, cfg: InputConfig, workers: int = 2, seed: int = 0) -> list[str]:
    """The whole synthetic run under `root`, planned as if cut from `cfg`; returns its shard names."""
    shard_rows = cfg.shard_rows
    count = -(-rows // shard_rows)
    sizes = [min(shard_rows, rows - i * shard_rows) for i in range(count)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(make_shard, [root] * count, range(count), sizes, [count] * count, [seed] * count))
    shards = [f"{i:05d}" for i in range(count)]
    run = RunDir(root, Storage())
    run.storage.write_json(run.plan, {"shards": shards, "rows": rows, "sources": [], "input": signature(cfg)})
    run.storage.write_json(run.file("models.json"), {"enabled": ["clip_score", "aesthetic", "nsfw", "watermark",
                                                                 "style"], "weights": "synthetic"})
    return shards
