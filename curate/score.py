"""Phase 2, score: a Ray Data stream over the raw shards that computes every score column.

read raw shard (tar + parquet) -> CPU stage (decode once: image metrics, caption metrics,
model view) -> model actors (when models are enabled) -> the driver gathers the small score
columns per shard and writes scores/{shard}.parquet when the shard is complete.
Scoring never decides anything; per-row failures become `score_error`, never exceptions.
"""
from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.extensions import ArrowTensorArray

from curate.config import Config
from curate.rundir import RunDir, atomic_path, write_json, write_parquet
from curate.runtime import Progress, log
from filters.image import aspect_ratio, image_columns
from filters.text import caption_columns
from manifests.schema import IMAGE, MODEL, TEXT, build, conform

RAW_FIELDS = ["key", "shard", "caption", "status", "original_width", "original_height"]
SCORE_COLUMNS = ["key", "shard", *IMAGE, *TEXT]


def read_raw(batch: dict[str, np.ndarray], run_dir: str, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream a raw shard's rows with their image bytes, `rows` at a time, in tar order.

    Memory holds one batch of images, not the shard. Rows without an image (failed downloads)
    follow the tar's. An unreadable tar marks the rows not yet sent with `_shard_error`, so the
    driver records the failure and leaves the shard unscored (a re-run retries it).
    """
    run = RunDir(Path(run_dir))
    for shard in batch["shard"]:
        cols = pq.read_table(run.raw / f"{shard}.parquet", columns=RAW_FIELDS).to_pydict()
        index = {key: i for i, key in enumerate(cols["key"])}
        sent = np.zeros(len(index), dtype=bool)
        pending: list[tuple[int, bytes | None]] = []
        error = ""
        try:
            with tarfile.open(run.raw / f"{shard}.tar") as tar:
                for member in tar:
                    i = index.get(member.name.rsplit(".", 1)[0]) if member.isfile() else None
                    if i is None or sent[i]:
                        continue
                    pending.append((i, tar.extractfile(member).read()))
                    sent[i] = True
                    if len(pending) == rows:
                        yield _raw_batch(cols, pending, error)
                        pending = []
        except Exception as exc:
            error = f"raw shard {shard} unreadable: {exc}"
        pending += [(int(i), None) for i in np.flatnonzero(~sent)]
        for start in range(0, len(pending), rows):
            yield _raw_batch(cols, pending[start:start + rows], error)


def _raw_batch(cols: dict[str, list], items: list[tuple[int, bytes | None]], error: str) -> dict[str, np.ndarray]:
    out = {name: np.array([values[i] for i, _ in items], dtype=object) for name, values in cols.items()}
    out["_image"] = np.array([data for _, data in items] + [None], dtype=object)[:-1]
    out["_shard_error"] = np.array([error] * len(items), dtype=object)
    return out


def score_cpu(batch: dict[str, np.ndarray], cfg: Config, model_side: int | None) -> pa.Table:
    """Image and caption metrics for a batch, from one decode per image, typed by the schema."""
    decode_side = max(cfg.score.decode_size, model_side or 0)
    image_cols, views = image_columns(list(batch["_image"]), decode_side=decode_side,
                                      max_pixels=cfg.download.max_pixels, model_side=model_side)
    for i, (status, data) in enumerate(zip(batch["status"], batch["_image"])):
        if status == "success" and data is None:
            image_cols["score_error"][i] = "image missing from the raw shard"
    ratio = aspect_ratio(batch["original_width"].astype(float), batch["original_height"].astype(float))
    table = build({
        "key": batch["key"].tolist(), "shard": batch["shard"].tolist(), "aspect_ratio": ratio,
        **image_cols, **caption_columns(list(batch["caption"]), cfg.text),
    })
    table = table.append_column("_shard_error", pa.array(batch["_shard_error"].tolist(), type=pa.string()))
    if model_side:
        column = np.empty(len(views), dtype=object)  # ragged: one array per image, empty when none
        column[:] = [v if v is not None else np.zeros((0, 0, 3), dtype=np.uint8) for v in views]
        table = table.append_column("_view", ArrowTensorArray.from_numpy(column))
    return table


class ModelStage:
    """Ray actor: loads every enabled model once, then scores batches of model views."""

    def __init__(self, cfg: Config):
        from filters.models import ModelScorer

        self.scorer = ModelScorer(cfg.models)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Arrow in, Arrow out: the score columns pass through untouched (pHash stays uint64)."""
        views = [v if v.size else None for c in batch.column("_view").chunks for v in c.to_numpy()]
        scores = self.scorer(views, batch.column("caption_norm").to_pylist())
        batch = batch.drop_columns(["_view"])
        for name, values in scores.items():
            column = ArrowTensorArray.from_numpy(values) if name == "image_embedding" else \
                pa.array(values.tolist() if values.dtype == object else values, type=MODEL[name].type)
            batch = batch.append_column(name, column)
        return batch


def _write_scores(run: RunDir, shard: str, parts: list[pa.Table]) -> None:
    """Write a complete shard: scores/{shard}.parquet, and embeddings/{shard}.npy in key order if kept."""
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("key")
    if "image_embedding" in table.column_names:
        emb = np.concatenate([np.asarray(c.to_numpy()) for c in table.column("image_embedding").chunks])
        with atomic_path(run.root / "embeddings" / f"{shard}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, emb.astype(np.float16))
        table = table.drop_columns(["image_embedding"])
    write_parquet(conform(table), run.scores / f"{shard}.parquet")


def _done(run: RunDir, shard: str) -> bool:
    return (run.scores / f"{shard}.parquet").exists()


def run_score(cfg: Config, shards: list[str]) -> list[dict]:
    """Score every shard without a scores file; return failures (shard, error) for the caller."""
    import ray

    run = RunDir(Path(cfg.run_dir))
    todo = [s for s in shards if not _done(run, s)]
    if not todo:
        log.info("score: all %d shards already scored, nothing to do", len(shards))
        return []
    expected = {s: pq.ParquetFile(run.raw / f"{s}.parquet").metadata.num_rows for s in todo}
    models_on = bool(cfg.models.enabled)
    model_side = cfg.models.image_size if models_on else None
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    # Reading is light: its own small CPU share keeps it from fusing with scoring, so one
    # shard's batches spread over every scoring task.
    ds = ds.map_batches(read_raw, batch_size=1, num_cpus=0.25,
                        fn_kwargs={"run_dir": cfg.run_dir, "rows": cfg.score.batch_size})
    ds = ds.map_batches(score_cpu, batch_size=cfg.score.batch_size, num_cpus=cfg.score.num_cpus,
                        fn_kwargs={"cfg": cfg, "model_side": model_side})
    if models_on:
        ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.models.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=cfg.models.num_actors), batch_format="pyarrow",
                            num_gpus=cfg.models.num_gpus or None, num_cpus=0.5)
    keep_cols = SCORE_COLUMNS + (list(MODEL) if models_on else [])
    if models_on and cfg.models.keep_embeddings:
        keep_cols.append("image_embedding")
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    failures: dict[str, str] = {}
    progress = Progress("score", sum(expected.values()))
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.add(batch.num_rows)
        for shard in pc.unique(batch.column("shard")).to_pylist():
            part = batch.filter(pc.equal(batch.column("shard"), shard))
            error = part.column("_shard_error")[0].as_py()
            if error:
                failures[shard] = error
            else:
                pending[shard].append(part.select([c for c in keep_cols if c in part.column_names]))
            counts[shard] += part.num_rows
            if counts[shard] == expected[shard] and shard not in failures:
                _write_scores(run, shard, pending.pop(shard))
    for shard in todo:  # a shard whose rows did not all come back is a failure, never a silent gap
        if counts[shard] != expected[shard] and shard not in failures:
            failures[shard] = f"scoring returned {counts[shard]} of {expected[shard]} rows"
    seconds = progress.finish()
    log.info("score: %d shards in %.1fs", len(todo) - len(failures), seconds)
    return [{"phase": "score", "shard": s, "error": e} for s, e in sorted(failures.items())]
