"""A synthetic scored run at any size: what download and score leave, with realistic columns.

Each shard is built with numpy and Arrow only (a few hundred ms for 10k rows), in worker
processes, straight through the storage module: raw/{shard}.parquet and .tar (a tiny real JPEG
per success, in a shuffled "download" order), scores/{shard}.parquet, their markers and the plan.
The mix is meant to exercise every decide step at its real share: about 8% failed downloads,
a spread of sizes, aspect ratios, texture and scores, 3% captions shared by many images, 2%
exact copies (same sha256), 3% near copies (every view hash 1-3 bits away, embedding 0.995
cosine) and 1% semantic copies (own hashes, embedding 0.995 cosine) of rows in other shards; the
12 view hashes and the embeddings cluster in families of look-alike images, as photos do, rather
than spreading uniformly (the search's easy case).

`BILLION` is the shape of a 1B-row run scaled down (bench_scale's `scale1b` regime): more copies,
one viral image copied N/1000 times (a million at 1B: exact copies and re-encodes 1-2 bits away),
look-alike walks (chains of distinct images, each within 3 bits of the one before, so transitive
closure joins thousands of distinct images as a 1B run's false pairs do at a mean degree of 1-3),
and download markers with per-host tables like a real crawl's (TOP_HOSTS hosts and the rest).
"""
from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.config import InputConfig
from curate.phases.download.hosts import OTHER_HOSTS, TOP_HOSTS
from curate.phases.download.plan import signature
from curate.run.rundir import RunDir, row_keys
from curate.run.storage import Storage
from curate.run.tario import TarWriter
from filters.multihash import VIEWS
from manifests.schema import arrow_schema

FAMILY_SIZE = 50      # distinct look-alike images per hash family
EMB_DIM, BASIS = 768, 4096   # the ViT-L/14 embedding's width; basis vectors the synthetic ones are drawn from
STYLES = np.array(["photo", "cartoon", "anime", "illustration", "painting"])
STYLE_P = [0.55, 0.2, 0.1, 0.1, 0.05]
PHRASES = ["一只猫坐在窗台上", "夕阳下的海边小镇", "雪山脚下的湖泊", "城市夜景与霓虹灯", "古风庭院里的桃花",
           "一碗热腾腾的牛肉面", "卡通风格的小熊", "秋天的银杏大道", "穿汉服的女孩", "高清风景壁纸"]
COMMON = ["图片", "高清大图", "点击查看原图", "壁纸"]
VIRAL = np.int64(-1)  # the content id of the viral image (no row of the run holds it as its own)


@dataclass(frozen=True)
class Shape:
    """Shares of rows by kind of copy, and the 1B run's extra structure."""
    exact: float = 0.02          # a copy (same sha256) of a random row in another shard
    near: float = 0.03           # another row's image, every view hash 1-3 bits away
    semantic: float = 0.01       # another row's picture re-shot: own hashes, embedding 0.995 cosine
    viral_per_row: float = 0.0   # rows holding the viral image (half exact copies, half re-encodes)
    walk_share: float = 0.0      # rows in look-alike walks (distinct images, consecutive ones 3 bits apart)
    walk_length_share: float = 0.0   # rows per walk, as a share of the run's rows
    hosts: bool = False          # download markers carry per-host tables


DEFAULT = Shape()
# Copy rates are estimates (web crawls repeat popular images widely; nothing here measures a real
# crawl): 6% exact copies, 4% near, 1% semantic, 0.1% viral, 5% of rows in walks of N/100.
BILLION = Shape(exact=0.06, near=0.04, semantic=0.01, viral_per_row=0.001, walk_share=0.05,
                walk_length_share=0.01, hosts=True)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a content id's stable 64-bit fingerprint (sha256 and pHash stand-ins)."""
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _bits(content: np.ndarray, salt: int, density: int) -> np.ndarray:
    """A 64-bit mask per content id with each bit set with probability 2**-density (stable per id)."""
    mask = np.full(content.shape, np.uint64(2**64 - 1))
    for i in range(density):
        mask &= _mix(content ^ np.int64(salt * 7919 + i * 104729))
    return mask


def view_hashes(content: np.ndarray, rows: int) -> np.ndarray:
    """(n, len(VIEWS)) clustered view hashes, stable per content id (exact copies share them).

    Photos are not uniform in hash space: look-alike shots (same place, same product, same layout)
    share most low frequencies. Each image belongs to a family of about FAMILY_SIZE; its whole hash
    is the family's base with about 16 bits flipped (look-alikes 24 bits apart on average, rarely
    within the distance), each crop window's hash the whole one with about 8 bits flipped (a 4-8%
    crop moves 6-20), the mirror's about half of them (odd horizontal frequencies change sign).
    """
    family = _mix(content ^ np.int64(0x5DEECE66D)) % np.uint64(max(1, rows // FAMILY_SIZE))
    whole = _mix(family.astype(np.int64) ^ np.int64(0x2545F491)) ^ _bits(content, 1, 2)
    out = np.empty((len(content), len(VIEWS)), np.uint64)
    out[:, 0] = whole
    out[:, 1] = whole ^ _bits(content, 2, 1)
    for v in range(2, len(VIEWS)):
        out[:, v] = whole ^ _bits(content, 10 + v, 3)
    return out


@lru_cache(maxsize=1)
def _basis() -> np.ndarray:
    return _unit(np.random.default_rng(12345).standard_normal((BASIS, EMB_DIM), np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pick(ids: np.ndarray, salt: int, count: int) -> np.ndarray:
    """`count` signed basis vectors summed per id, chosen by the id's hash (stable, vectorised)."""
    basis, out = _basis(), np.zeros((len(ids), EMB_DIM), np.float32)
    for i in range(count):
        h = _mix(ids ^ np.int64(salt * 31 + i))
        sign = np.where(h & np.uint64(1), 1.0, -1.0).astype(np.float32)[:, None]
        out += sign * basis[((h >> np.uint64(1)) % np.uint64(BASIS)).astype(np.int64)]
    return out


def embeddings(content: np.ndarray, rows: int) -> np.ndarray:
    """(n, EMB_DIM) unit image embeddings, stable per content id: the image's family direction plus
    its own (look-alikes about 0.6 cosine apart, so k-means finds the families and the semantic
    threshold does not merge them)."""
    family = (_mix(content ^ np.int64(0x5DEECE66D)) % np.uint64(max(1, rows // FAMILY_SIZE))).astype(np.int64)
    return _unit(0.8 * _unit(_pick(family, 1, 4)) + 0.6 * _unit(_pick(content, 2, 8)))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 90, 40)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _strings(prefix: str, values: pa.Array, suffix: str = "") -> pa.Array:
    n = len(values)
    return pc.binary_join_element_wise(pa.array([prefix] * n), values, pa.array([suffix] * n), "")


def _flips(rng: np.random.Generator, rows: int, most: int) -> np.ndarray:
    """A mask of 1 to `most` random bits per row (bits may repeat, so sometimes fewer)."""
    flips = np.zeros(rows, np.uint64)
    for _ in range(most):
        flips |= np.uint64(1) << rng.integers(0, 64, rows).astype(np.uint64)
    return flips


@dataclass(frozen=True)
class Walks:
    """The look-alike walks' whole hashes (walks, steps); walk w's steps are laid out over the
    shards in order, `per` consecutive steps per shard, at rows [w * per, (w + 1) * per)."""
    hashes: np.ndarray
    per: int


def walks(shards: int, rows_per_shard: int, shape: Shape, seed: int = 0) -> Walks:
    """Each step flips 3 distinct bits of the one before, so steps 1-2 apart are within the default
    distance and steps 3 or more apart mostly are not: a chain, not a clique."""
    rows = shards * rows_per_shard
    length = round(shape.walk_length_share * rows)
    if not shape.walk_share or length < 2:
        return Walks(np.empty((0, 0), np.uint64), 1)
    count = max(1, round(shape.walk_share * rows / length))
    per = -(-length // shards)
    if count * per > rows_per_shard:
        raise ValueError(f"{count} walks of {length} steps do not fit {rows_per_shard}-row shards")
    rng = np.random.default_rng([seed, 777])
    out = np.empty((count, length), np.uint64)
    out[:, 0] = rng.integers(0, 2**63, count, dtype=np.uint64)
    for s in range(1, length):
        step = np.zeros(count, np.uint64)
        for bit in np.argsort(rng.random((count, 64)), axis=1)[:, :3].T:
            step |= np.uint64(1) << bit.astype(np.uint64)
        out[:, s] = out[:, s - 1] ^ step
    return Walks(out, per)


def walk_hashes(ids: np.ndarray, w: Walks) -> tuple[np.ndarray, np.ndarray]:
    """Which content ids are walk steps, and their whole hashes (a copy of a step has its hash too)."""
    if not w.hashes.size:
        return np.zeros(len(ids), bool), np.zeros(len(ids), np.uint64)
    count, length = w.hashes.shape
    shard, row = ids >> 32, ids & 0xFFFFFFFF
    walk, step = row // w.per, shard * w.per + row % w.per
    mine = (ids >= 0) & (walk < count) & (step < length)
    out = np.zeros(len(ids), np.uint64)
    out[mine] = w.hashes[walk[mine], step[mine]]
    return mine, out


NO_WALKS = Walks(np.empty((0, 0), np.uint64), 1)


def host_table(rng: np.random.Generator, rows: int, ok: np.ndarray) -> dict[str, dict]:
    """A download marker's per-host stats as curate.phases.download.hosts.host_summary writes them: TOP_HOSTS named
    hosts (a Zipf-like share each) and the rest under OTHER_HOSTS."""
    share = 1.0 / np.arange(1, TOP_HOSTS + 2)
    counts = rng.multinomial(rows, share / share.sum())
    good = int(ok.sum())
    out = {}
    for h, n in enumerate(counts.tolist()):
        name = OTHER_HOSTS if h == TOP_HOSTS else f"img{h}.example.cn"
        success = min(n, round(n * good / max(rows, 1)))
        out[name] = {"rows": n, "success": success, "requests": n + n // 20, "retries": n // 20, "pauses": 0,
                     "kinds": {"http_404": n - success} if n > success else {}, "peak_connections": 4}
    return out


def make_shard(root: str, index: int, rows: int, total_shards: int, seed: int = 0, shape: Shape = DEFAULT,
               walk: Walks = NO_WALKS) -> int:
    """Write one shard's raw and score files and markers; returns its successful rows."""
    run = RunDir(root, Storage())
    shard = f"{index:05d}"
    rng = np.random.default_rng([seed, index])
    row_id = (np.int64(index) << 32) | np.arange(rows, dtype=np.int64)
    keys = row_keys(row_id)
    ok = rng.random(rows) >= 0.08
    # Content ids: a row's own id, or (exact copies) the id of a row in another shard.
    content = row_id.copy()
    step, _ = walk_hashes(row_id, walk)   # walk steps are originals that pass every per-row rule
    ok |= step
    copy = (rng.random(rows) < shape.exact) & ~step
    other = rng.integers(0, total_shards, rows).astype(np.int64) << 32 | rng.integers(0, rows, rows)
    content[copy] = other[copy]
    near = (rng.random(rows) < shape.near) & ~copy & ~step
    source = np.where(near, other, content)   # a near copy is another row's image, slightly changed
    viral = viral_near = np.zeros(rows, bool)
    if shape.viral_per_row:                   # the viral image: half exact copies, half re-encodes
        viral = (rng.random(rows) < shape.viral_per_row) & ~step
        viral_near = viral & (rng.random(rows) < 0.5)
        content[viral & ~viral_near], source[viral] = VIRAL, VIRAL
        copy, near = copy & ~viral, near & ~viral
    sha = _mix(content)
    sha[viral_near] = _mix(row_id[viral_near] ^ np.int64(0x7F4A7C15))   # re-encoded: other bytes
    views = view_hashes(source, total_shards * rows)
    stepped, whole = walk_hashes(source, walk)   # walk steps, and copies of them: the walk's whole hash
    views[stepped] ^= (views[stepped, 0] ^ whole[stepped])[:, None]
    for v in range(views.shape[1]):           # 1-3 bits flipped in each of a near copy's views
        views[:, v] = np.where(near, views[:, v] ^ _flips(rng, rows, 3), views[:, v])
        if shape.viral_per_row:
            views[:, v] = np.where(viral_near, views[:, v] ^ _flips(rng, rows, 2), views[:, v])
    # 1% semantic copies: another row's picture re-shot or re-edited, so its hashes are its own but its
    # embedding sits at about 0.995 cosine from the original's, like a near copy's
    semantic = (rng.random(rows) < shape.semantic) & ~copy & ~near & ~viral & ~step
    similar = near | semantic | viral_near
    emb = embeddings(np.where(similar & ~viral, other, np.where(viral, VIRAL, content)), total_shards * rows)
    emb[similar] = _unit(emb[similar] + 0.1 / np.sqrt(EMB_DIM) * rng.standard_normal(emb[similar].shape, np.float32))
    emb[~ok] = np.nan                         # as the score phase leaves rows without an image
    sha_hex = pa.array([f"{v:016x}" * 4 for v in sha.tolist()])
    phrase = np.array(PHRASES)[rng.integers(0, len(PHRASES), rows)]
    common = rng.random(rows) < 0.03
    caption = np.where(common, np.array(COMMON)[rng.integers(0, len(COMMON), rows)],
                       np.char.add(phrase, keys.to_numpy(zero_copy_only=False).astype(str)))
    side = rng.lognormal(6.4, 0.5, (rows, 2)).clip(64, 4000).astype(np.int32)
    common[step], side[step] = False, 800
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
    marker = {"rows": rows, "success": int(ok.sum()), "tar_bytes": run.storage.size(run.raw_tar(shard))}
    if shape.hosts:
        marker.update(error_kinds={"http_404": int((~ok).sum())}, wait_s=0.0, hosts=host_table(rng, rows, ok))
    run.mark("download", shard, marker)

    def unit(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, rows).astype(np.float32)

    n_chars = pc.utf8_length(raw.column("caption")).to_numpy().astype(np.int32)
    scores = pa.table({
        "key": keys, "shard": pa.array([shard] * rows),
        "score_error": pa.array(np.where(ok & (rng.random(rows) < 0.005), "decode_error: truncated", None),
                                pa.string()),
        "aspect_ratio": (side.max(1) / side.min(1)).astype(np.float32), "entropy": unit(2, 8),
        "edge_density": unit(0, 0.4), "jpeg_bpp": unit(0.5, 4), "phash": pa.array(views[:, 0], pa.uint64()),
        "phash_views": pa.FixedSizeListArray.from_arrays(pa.array(views[:, 1:].ravel(), pa.uint64()),
                                                         views.shape[1] - 1),
        "caption_norm": raw.column("caption"), "n_chars": n_chars, "n_words": (n_chars // 2).astype(np.int32),
        "zh_ratio": unit(0.6, 1), "latin_ratio": unit(0, 0.3), "repeat_ratio": unit(0, 0.1),
        "n_sentences": np.ones(rows, np.int32), "caption_junk": rng.random(rows) < 0.01,
        "blocked_term": pa.nulls(rows, pa.string()),
        "clip_score": rng.normal(0.3, 0.05, rows).astype(np.float32),
        "aesthetic": rng.normal(5.3, 0.8, rows).astype(np.float32),
        "nsfw": rng.beta(1, 30, rows).astype(np.float32), "watermark": rng.beta(1, 6, rows).astype(np.float32),
        "style": pa.array(STYLES[rng.choice(len(STYLES), rows, p=STYLE_P)]), "style_prob": unit(0.3, 1),
    })
    if step.any():   # a walk step passes every per-row rule: the walks are among the survivors
        passing = {"entropy": 6.0, "edge_density": 0.2, "zh_ratio": 0.9, "latin_ratio": 0.05, "repeat_ratio": 0.0,
                   "caption_junk": False, "clip_score": 0.35, "aesthetic": 6.0, "nsfw": 0.01, "watermark": 0.05}
        for name, value in passing.items():
            column = scores.column(name).to_numpy(zero_copy_only=False).copy()
            column[step] = value
            scores = scores.set_column(scores.schema.get_field_index(name), name, pa.array(column))
        errors = pc.if_else(pa.array(step), pa.nulls(rows, pa.string()), scores.column("score_error"))
        scores = scores.set_column(scores.schema.get_field_index("score_error"), "score_error", errors)
    run.storage.write_parquet(scores.cast(arrow_schema(scores.column_names)), run.scores(shard))
    buf = io.BytesIO()
    np.save(buf, emb.astype(np.float16))
    run.storage.write_bytes(run.embeddings(shard), buf.getvalue())
    run.mark("score", shard, {"rows": rows})
    if shape.viral_per_row:   # which rows hold the viral image: the benchmark's planted largest group
        run.storage.write_json(run.uri("_planted", f"{shard}.json"), {"viral": np.flatnonzero(viral).tolist()})
    return int(ok.sum())


def make_run(root: str, rows: int, cfg: InputConfig, workers: int = 2, seed: int = 0,
             shape: Shape = DEFAULT) -> list[str]:
    """The whole synthetic run under `root`, planned as if cut from `cfg`; returns its shard names."""
    shard_rows = cfg.shard_rows
    count = -(-rows // shard_rows)
    sizes = [min(shard_rows, rows - i * shard_rows) for i in range(count)]
    walk = walks(count, shard_rows, shape, seed)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(make_shard, [root] * count, range(count), sizes, [count] * count, [seed] * count,
                      [shape] * count, [walk] * count))
    shards = [f"{i:05d}" for i in range(count)]
    run = RunDir(root, Storage())
    run.storage.write_json(run.plan, {"shards": shards, "rows": rows, "sources": [], "input": signature(cfg)})
    run.storage.write_json(run.file("models.json"), {"enabled": ["clip_score", "aesthetic", "nsfw", "watermark",
                                                                 "style"], "weights": "synthetic"})
    return shards
