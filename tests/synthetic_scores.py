"""A joined raw+scores table where every row passes the per-row rules, for decide's tests."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from manifests.schema import build


def scores_table(n: int, *, phash=None, sha256=None, captions=None, aesthetic=None, style=None,
                 shards: int = 1) -> pa.Table:
    """n good rows in `shards` shards (keys sorted within each); columns given override the defaults."""
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    shard = [f"{i // per:05d}" for i in range(n)]
    return build({
        "key": [f"{s}_{i % per:06d}" for i, s in enumerate(shard)], "shard": shard,
        "status": ["success"] * n, "score_error": [None] * n,
        "original_width": [640] * n, "original_height": [480] * n, "width": [640] * n, "height": [480] * n,
        "sha256": sha256 if sha256 is not None else [f"{i:064x}" for i in range(n)],
        "aspect_ratio": [640 / 480] * n, "entropy": [7.0] * n, "edge_density": [0.1] * n,
        "caption_norm": captions if captions is not None else [f"第{i}张图片，一只橘猫在窗台上" for i in range(n)],
        "n_chars": [14] * n, "n_words": [6] * n, "zh_ratio": [1.0] * n, "latin_ratio": [0.0] * n,
        "repeat_ratio": [0.0] * n, "n_sentences": [1] * n, "caption_junk": [False] * n, "blocked_term": [None] * n,
        "phash": phash if phash is not None else rng.integers(0, 2**63, n, dtype=np.uint64) * 2 + 1,
        "clip_score": [0.3] * n, "aesthetic": aesthetic if aesthetic is not None else [5.0] * n,
        "nsfw": [0.01] * n, "watermark": [0.01] * n, "style": style if style is not None else [None] * n,
    })
