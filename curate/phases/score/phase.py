"""Phase 2, score: every score column of every downloaded shard, written per shard with its marker.

Without a model scorer to run, the CPU stage is the whole stage: one plain Ray task per shard
(score_cpu_shard) streams its parquet + tar a batch at a time, decodes once (image metrics,
caption metrics), keeps the score columns (small) and writes scores/{shard}.parquet and the
marker itself. With model scorers, a Ray Data stream: the same CPU stage (read fused in, plus the
model view) -> model actors (when view scorers are enabled) -> OCR actors (when ocr is enabled);
the last of these writes each batch's score columns to storage as a part of its shard and
returns only (shard, rows, error), and when a shard is complete a small task merges its parts
into scores/{shard}.parquet (sorted by key) and writes the shard's marker.
OCR is its own actor pool, sized apart from the model actors, and it is handed the stored JPEG
bytes rather than a decoded view: it needs a larger view (models.ocr_side) than the models, and
bytes are about a tenth of that view's pixels in the object store; its decode is cheap next to
its detection (see bench/bench_ocr.py).
No score row ever reaches the driver, and a worker holds one batch of images, never a shard's.
Scoring never decides anything; per-row failures become `score_error`, never exceptions.
Where the stage's time goes, and why the CPU-only stage is not a Ray Data stream: bench/README.md,
"Score stage breakdown".
"""
from __future__ import annotations

import io
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config, ConfigError
from curate.guards import check_weights_where_actors_run
from curate.phases.score import provenance
from curate.phases.score.provenance import Producer, Work
from curate.run.rundir import RunDir
from curate.run.runtime import Progress, Window, error_text, log, windowed
from curate.run.storage import join
from filters.image import aspect_ratio, decode, image_columns, model_views
from filters.models.options import ModelOptions
from filters.registry import BY_NAME, SCORERS
from filters.text import caption_columns
from manifests.schema import MODEL, build, conform

RAW_FIELDS = ["key", "shard", "caption", "status", "original_width", "original_height"]
# What a partial re-score reads back from the scores on disk when the CPU scorers are up to date.
KEPT_INPUTS = ["caption_norm", "score_error"]
# CPUs each actor reserves: shares, so the CPU tasks always find room beside the pools; an OCR
# actor runs one onnxruntime thread, so more cores want more models.ocr_actors.
MODEL_ACTOR_CPUS, OCR_ACTOR_CPUS = 0.5, 0.25
STREAM_BLOCK_BYTES = 8 * 2**20   # the model stream's block size: about one CPU batch of views (64 x 224^2 x 3)


def written_columns(names: frozenset[str]) -> list[str]:
    """The columns a score run of these scorers writes, in manifest order (key and shard first)."""
    cols = ["key", "shard", *(c for s in SCORERS if s.name in names for c in s.column_names)]
    return cols + (["image_embedding"] if "embedding" in names else [])


def read_raw(batch: dict[str, np.ndarray], run: RunDir, rows: int,
             kept: list[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Stream a raw shard's rows with their image bytes, `rows` at a time, in tar order.

    Memory holds one batch of images, not the shard. Rows without an image (failed downloads)
    follow the tar's. An unreadable or truncated tar marks the rows with `_shard_error`, so the
    shard is recorded as failed and left unscored; a truncated tar also loses its download
    marker, so the next run downloads the shard again. `kept`: score columns read back from the
    shard's scores file (a partial re-score), row for row.
    """
    storage = run.storage
    for shard in batch["shard"]:
        storage.delete_dir(run.score_parts(shard))  # parts left by a killed attempt
        raw = storage.read_parquet(run.raw_table(shard), columns=RAW_FIELDS)
        if kept:
            old = storage.read_parquet(run.scores(shard), columns=["key", *kept])
            if not old.column("key").equals(raw.column("key")):
                raise ValueError(f"scores/{shard}.parquet does not hold the rows of raw/{shard}.parquet")
            for name in kept:
                raw = raw.append_column(name, old.column(name))
        cols = raw.to_pydict()
        index = {key: i for i, key in enumerate(cols["key"])}
        sent = np.zeros(len(index), dtype=bool)
        pending: list[tuple[int, bytes | None]] = []
        error = ""
        try:
            expected = storage.read_json(run.marker("download", shard))["tar_bytes"]
            if storage.size(run.raw_tar(shard)) != expected:
                run.unmark("download", shard)
                raise ValueError(f"truncated: {storage.size(run.raw_tar(shard))} of {expected} bytes; "
                                 f"it will be downloaded again on the next run")
            with storage.open_input(run.raw_tar(shard)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
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


def _failed_batch(keys: list, shards: list, exc: BaseException, stage: str) -> pa.Table:
    """A batch whose stage raised: its rows carry the error, so their shard fails alone."""
    error = f"{stage} failed: {type(exc).__name__}: {exc}"[:500]
    return pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shards, pa.string()),
                     "_shard_error": pa.array([error] * len(keys), pa.string())})


def read_and_score_cpu(batch: dict[str, np.ndarray], run: RunDir, cfg: Config, model_side: int | None,
                       keep_image: bool, scorers: frozenset[str] = frozenset({"image", "caption"})
                       ) -> Iterator[pa.Table]:
    """The model stream's CPU stage, reading fused in: each shard streamed a batch at a time and scored
    in the same task.

    The image bytes never pass through the object store unless a later stage reads them, and a lone
    operator gets every CPU (beside a separate read, Ray Data's reservations ran one scoring task at a
    time on 2 CPUs). `scorers`: the CPU scorers to run; without them (a partial re-score) their columns
    the later stages read come back from the scores on disk."""
    kept = [] if {"image", "caption"} <= scorers else KEPT_INPUTS
    for raw in read_raw(batch, run, cfg.score.batch_size, kept):
        yield score_cpu(raw, cfg, model_side, keep_image, scorers)


def score_cpu(batch: dict[str, np.ndarray], cfg: Config, model_side: int | None, keep_image: bool = False,
              scorers: frozenset[str] = frozenset({"image", "caption"})) -> pa.Table:
    """Image and caption metrics for a batch; an unexpected exception fails the batch's shards, not the run.

    `keep_image` passes the image bytes on (as `_image`) for the OCR actors."""
    try:
        table = _score_cpu(batch, cfg, model_side, scorers)
    except Exception as exc:
        return _failed_batch(batch["key"].tolist(), batch["shard"].tolist(), exc, "CPU scoring")
    if keep_image:
        table = table.append_column("_image", pa.array(list(batch["_image"]), pa.binary()))
    return table


def _score_cpu(batch: dict[str, np.ndarray], cfg: Config, model_side: int | None,
               scorers: frozenset[str]) -> pa.Table:
    """Image and caption metrics for a batch, from one decode per image, typed by the schema; of the
    CPU scorers not in `scorers`, only the columns later stages read (KEPT_INPUTS) pass through."""
    decode_side = max(cfg.score.decode_size, model_side or 0)
    images = list(batch["_image"])
    cols: dict[str, object] = {"key": batch["key"].tolist(), "shard": batch["shard"].tolist()}
    views: list = []
    if "image" in scorers:
        image_cols, views = image_columns(images, decode_side=decode_side, max_pixels=cfg.download.max_pixels,
                                          model_side=model_side)
        for i, (status, data) in enumerate(zip(batch["status"], images)):
            if status == "success" and data is None:
                image_cols["score_error"][i] = "image missing from the raw shard"
        ratio = aspect_ratio(batch["original_width"].astype(float), batch["original_height"].astype(float))
        cols.update(aspect_ratio=ratio, **image_cols)
    else:
        cols["score_error"] = batch["score_error"].tolist()
        if model_side:
            fine = [data if error is None else None for data, error in zip(images, batch["score_error"])]
            views = model_views(fine, decode_side=decode_side, max_pixels=cfg.download.max_pixels,
                                model_side=model_side)
    if "caption" in scorers:
        cols.update(caption_columns(list(batch["caption"]), cfg.text))
    else:
        cols["caption_norm"] = batch["caption_norm"].tolist()
    table = build(cols)
    table = table.append_column("_shard_error", pa.array(batch["_shard_error"].tolist(), type=pa.string()))
    if model_side:
        from ray.data.extensions import ArrowTensorArray  # here, not at the top: the CPU-only tasks skip Ray Data

        column = np.empty(len(views), dtype=object)  # ragged: one array per image, empty when none
        column[:] = [v if v is not None else np.zeros((0, 0, 3), dtype=np.uint8) for v in views]
        table = table.append_column("_view", ArrowTensorArray.from_numpy(column))
    return table


def _with_scores(batch: pa.Table, scores: dict[str, np.ndarray], consumed: str | None) -> pa.Table:
    """The batch less its `consumed` input column (None: a later stage still reads it), plus the score
    columns (typed by the schema); the columns already there pass through untouched (pHash stays uint64)."""
    from ray.data.extensions import ArrowTensorArray

    batch = batch.drop_columns([consumed]) if consumed else batch
    for name, values in scores.items():
        column = ArrowTensorArray.from_numpy(values) if name == "image_embedding" else \
            pa.array(values.tolist() if values.dtype == object else values, type=MODEL[name].type)
        batch = batch.append_column(name, column)
    return batch


class ModelStage:
    """Ray actor: loads every enabled model once, then scores batches of model views: the CPU stage's
    `_view`s, or with models.gpu_decode views it decodes itself from the stored bytes (`_image`).

    As the last stage (`columns` set) it writes the parts and returns summaries."""

    def __init__(self, cfg: Config, run: RunDir | None = None, columns: list[str] | None = None,
                 device: str | None = None, scorer=None):
        """`scorer`: an already built ModelScorer for these options (benchmarks share one between stages)."""
        from filters.models import ModelScorer

        m = cfg.models
        self.scorer = scorer or ModelScorer(m, device)
        self.run, self.columns = run, columns
        self.gpu_decode, self.side, self.max_pixels = m.gpu_decode, m.image_size, cfg.download.max_pixels
        self.column = "_image" if m.gpu_decode else "_view"
        self.consumed = None if m.gpu_decode and "ocr" in m.enabled else self.column   # OCR reads _image next

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self._score(batch)
        return write_parts(out, self.run, self.columns) if self.columns is not None else out

    def _score(self, batch: pa.Table) -> pa.Table:
        """Arrow in, Arrow out; a batch that fails (here or before) carries its error onwards."""
        if self.column not in batch.column_names:
            return batch
        try:
            return _with_scores(batch, self.scorer(self.views(batch), batch.column("caption_norm").to_pylist()),
                                self.consumed)
        except Exception as exc:
            return _failed_batch(batch.column("key").to_pylist(), batch.column("shard").to_pylist(), exc, "models")

    def views(self, batch: pa.Table) -> list[np.ndarray | None]:
        """The batch's RGB views; None where the CPU stage found no image."""
        if self.gpu_decode:
            from filters.models.images import decode_views

            ok = pc.is_null(batch.column("score_error")).to_pylist()
            images = [data if fine else None for data, fine in zip(batch.column("_image").to_pylist(), ok)]
            return decode_views(images, self.side, self.scorer.device, self.max_pixels)
        return [v if v.size else None for c in batch.column("_view").chunks for v in c.to_numpy()]


class OcrStage:
    """Ray actor: PP-OCRv4 on the stored image bytes, decoded at models.ocr_side; the last stage
    when it runs, so it writes the parts and returns summaries."""

    def __init__(self, cfg: Config, run: RunDir, columns: list[str]):
        from filters.models.ocr import Ocr

        m = cfg.models
        self.side, self.max_pixels = m.ocr_side, cfg.download.max_pixels
        self.ocr = Ocr(m.ocr_side, m.ocr_recognize, m.ocr_text_max, "cuda" if ocr_gpus(cfg) else "cpu",
                       threads=1, screen_side=m.ocr_screen_side)
        self.run, self.columns = run, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_parts(self._ocr(batch), self.run, self.columns)

    def _ocr(self, batch: pa.Table) -> pa.Table:
        if "_image" not in batch.column_names:
            return batch
        try:
            return _with_scores(batch, self.ocr(self._views(batch.column("_image").to_pylist())), "_image")
        except Exception as exc:
            return _failed_batch(batch.column("key").to_pylist(), batch.column("shard").to_pylist(), exc, "ocr")

    def _views(self, images: list[bytes | None]) -> list[np.ndarray | None]:
        """RGB views no smaller than needed (JPEG draft); None where the CPU stage already found no image."""
        views = []
        for data in images:
            try:
                views.append(np.asarray(decode(data, self.side, self.max_pixels)[0]) if data else None)
            except Exception:   # its score_error is already the CPU stage's decode error
                views.append(None)
        return views


def write_parts(batch: pa.Table, run: RunDir, columns: list[str]) -> pa.Table:
    """Last stage: write each shard's slice of a batch as a part file; return one summary row per slice."""
    out: dict[str, list] = {"shard": [], "rows": [], "error": []}
    for shard in pc.unique(batch.column("shard")).to_pylist():
        part = batch.filter(pc.equal(batch.column("shard"), shard))
        error = part.column("_shard_error")[0].as_py() or None
        if error is None:
            part = part.select([c for c in columns if c in part.column_names])
            if "image_embedding" in part.column_names:
                emb = np.concatenate([np.asarray(c.to_numpy()) for c in part.column("image_embedding").chunks])
                flat = pa.array(emb.astype(np.float32).ravel())
                part = part.set_column(part.column_names.index("image_embedding"), "image_embedding",
                                       pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))
            first = pc.min(part.column("key")).as_py()
            run.storage.write_parquet(part, join(run.score_parts(shard), f"{first}.parquet"))
        out["shard"].append(shard)
        out["rows"].append(part.num_rows)
        out["error"].append(error)
    return pa.table({"shard": pa.array(out["shard"], pa.string()), "rows": pa.array(out["rows"], pa.int64()),
                     "error": pa.array(out["error"], pa.string())})


def finish_shard(run: RunDir, shard: str, expected: int, work: Work, wanted: dict[str, Producer]) -> str | None:
    """Merge a shard's parts into scores/{shard}.parquet (+ embeddings), drop the parts, mark it done.

    A partial re-score (work.partial) joins the new columns to the scores on disk, replacing the
    re-run scorers' columns and removing those of scorers no longer enabled. Returns None when done,
    else why not (rows missing: a retried batch may still be on its way). Idempotent: Ray re-runs a
    finished task whose result died with its node; that second run finds the marker written.
    """
    storage = run.storage
    folder = run.score_parts(shard)
    if storage.exists(run.marker("score", shard)):   # parts landing after the merge are re-runs' copies
        storage.delete_dir(folder)
        return None
    parts = [storage.read_parquet(join(folder, n)) for n in storage.list(folder)]
    if not parts and expected:
        return f"scoring returned 0 of {expected} rows"
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("key") if parts else None
    if table is not None and table.num_rows:
        first = pc.not_equal(table.column("key").slice(1), table.column("key").slice(0, table.num_rows - 1))
        table = table.filter(pa.concat_arrays([pa.array([True]), first.combine_chunks()]))
    return store_shard(run, shard, table, expected, work, wanted)


def store_shard(run: RunDir, shard: str, table: pa.Table | None, expected: int, work: Work,
                wanted: dict[str, Producer]) -> str | None:
    """Write a shard's score columns (sorted by key) as scores/{shard}.parquet (+ embeddings), drop any
    parts, then the marker; None when done, else why not (a re-executed batch can write overlapping parts)."""
    storage = run.storage
    if table is not None and table.num_rows != expected:
        return f"scoring returned {table.num_rows} of {expected} rows"
    if table is not None and "image_embedding" in table.column_names:
        column = table.column("image_embedding").combine_chunks()
        emb = column.flatten().to_numpy().reshape(len(column), -1).astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, emb)
        storage.write_bytes(run.embeddings(shard), buf.getvalue())
        table = table.drop_columns(["image_embedding"])
    if work.partial:
        table = _join_kept(run, shard, table, work)
    storage.write_parquet(conform(_ordered(table)), run.scores(shard))
    storage.delete_dir(run.score_parts(shard))   # before the marker: a kill in between leaves the shard unscored
    run.mark("score", shard, work.marker(table.num_rows, wanted))
    return None


def score_cpu_shard(run: RunDir, cfg: Config, shard: str, expected: int, work: Work, wanted: dict[str, Producer],
                    columns: list[str]) -> Iterator[dict]:
    """A plain Ray task (a streaming generator) that scores one shard whose last stage is the CPU one.

    It streams the shard a batch at a time (read_raw), keeps only the score columns (small: no image
    survives its batch), then writes scores/{shard}.parquet and the marker itself: no Ray Data
    operator, no part files, no merge task. Yields {"rows"} per batch (the driver's progress) and
    last {"rows", "error", "done"}: error None when the shard is done, else why it failed.
    """
    scorers = frozenset(n for n in work.run if BY_NAME[n].stage == "cpu")
    kept = [] if {"image", "caption"} <= scorers else KEPT_INPUTS
    tables: list[pa.Table] = []
    for raw in read_raw({"shard": np.array([shard], dtype=object)}, run, cfg.score.batch_size, kept):
        table = score_cpu(raw, cfg, None, False, scorers)
        error = table.column("_shard_error")[0].as_py() if table.num_rows else None
        if error:
            yield {"rows": 0, "error": error, "done": True}
            return
        tables.append(table.select([c for c in columns if c in table.column_names]))
        yield {"rows": table.num_rows}
    table = pa.concat_tables(tables).sort_by("key") if tables else build({c: [] for c in columns})   # no rows
    yield {"rows": 0, "error": store_shard(run, shard, table, expected, work, wanted), "done": True}


def _join_kept(run: RunDir, shard: str, new: pa.Table | None, work: Work) -> pa.Table:
    """The scores on disk less the re-run and dropped scorers' columns, plus the new columns."""
    replaced = {c for n in work.run | work.drop for c in BY_NAME[n].column_names}
    old = run.storage.read_parquet(run.scores(shard))
    old = old.drop_columns([c for c in old.column_names if c in replaced])
    if new is None:
        return old
    if not new.column("key").equals(old.column("key")):
        raise ValueError(f"the re-scored rows of shard {shard} are not the rows of scores/{shard}.parquet")
    for name in new.column_names:
        if name not in old.column_names:
            old = old.append_column(name, new.column(name))
    return old


def _ordered(table: pa.Table) -> pa.Table:
    """Columns in manifest order, whichever run wrote them."""
    order = {c: i for i, c in enumerate(written_columns(frozenset(BY_NAME)))}
    return table.select(sorted(table.column_names, key=lambda c: order.get(c, len(order))))


def ocr_gpus(cfg: Config) -> float | None:
    """GPUs per OCR actor: models.num_gpus when this onnxruntime has CUDA (onnxruntime-gpu), else none:
    a CPU-only onnxruntime would hold a GPU it cannot use."""
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return cfg.models.num_gpus if cuda and cfg.models.num_gpus > 0 else None


def actor_pool(opts: ModelOptions, resources: dict[str, float]) -> tuple[int, int]:
    """(min, max) model actors for models.num_actors on a cluster with these Ray resources.

    auto: one actor per models.num_gpus share of the GPUs Ray reports; one actor where the model
    actors run on CPU (num_gpus 0): CPU inference competes with the CPU scoring tasks, so more
    actors only help when a number is asked for. A fixed N is (N, N); "MIN-MAX" autoscales.
    """
    if isinstance(opts.num_actors, int):
        return opts.num_actors, opts.num_actors
    if opts.num_actors != "auto":
        low, high = opts.num_actors.split("-")
        return int(low), int(high)
    if opts.num_gpus <= 0:
        return 1, 1
    gpus = resources.get("GPU", 0.0)
    if gpus < opts.num_gpus:
        raise ConfigError(f"models.num_actors=auto: models.num_gpus={opts.num_gpus:g} per actor but the cluster "
                          f"reports "
                          f"{gpus:g} GPUs: set models.num_gpus=0 to run the models on CPU, or a number of actors")
    count = int(gpus / opts.num_gpus + 1e-9)
    return count, count


def check_room(cfg: Config, views_on: bool, ocr_on: bool, cpus: float, model_actors: int = 1) -> None:
    """Refuse actor pools that would leave no CPU for a scoring task: the stream would wait forever.

    `model_actors` is the pool's resolved largest size (actor_pool)."""
    reserved = model_actors * MODEL_ACTOR_CPUS * views_on + cfg.models.ocr_actors * OCR_ACTOR_CPUS * ocr_on
    if reserved + cfg.score.num_cpus > cpus:
        raise ConfigError(f"score: the model and OCR actors reserve {reserved:g} CPUs and a CPU scoring task needs "
                          f"score.num_cpus={cfg.score.num_cpus:g}, more than the cluster's {cpus:g}: lower "
                          f"models.num_actors, models.ocr_actors or score.num_cpus")


def run_score(cfg: Config, run: RunDir, shards: list[str]) -> tuple[list[dict], list[str]]:
    """Score every downloaded shard whose scores are not up to date with this config; return the
    failures and the shards it worked on.

    Per shard, provenance.plan names the scorers to run (new, or their settings, weights or input
    changed) and the columns to remove (scorers no longer enabled); a shard scored with [nsfw] and
    now asked for [nsfw, ocr] runs OCR alone and gains its columns. A shard's marker is removed
    before it is re-scored, so a killed attempt leaves it unscored (re-scored in full), never
    half-updated under an old marker.
    """
    wanted = provenance.producers(cfg)
    works = provenance.plan(run, cfg, shards, wanted)
    if not works:
        log.info("score: all %d shards up to date with these scorers and settings, nothing to do", len(shards))
        return [], []
    check_weights_where_actors_run(cfg)
    provenance.record_producers(run, wanted)
    todo = sorted(works)
    for shard in todo:
        run.unmark("score", shard)
    expected = {s: m["rows"] for s, m in zip(todo, run.markers("download", todo))}
    groups: dict[Work, list[str]] = {}
    for shard in todo:
        w = works[shard]
        groups.setdefault(Work(w.run, w.drop, w.partial, ""), []).append(shard)
    failures: list[dict] = []
    for kind, group in groups.items():
        _log_work(kind, group, wanted)
        shard_work = {s: works[s] for s in group}
        if kind.run:
            failures += _score_stream(cfg, run, group, expected, shard_work, wanted)
        else:
            failures += _drop_columns(run, shard_work, expected, wanted)
    return failures, todo


def _log_work(kind: Work, shards: list[str], wanted: dict[str, Producer]) -> None:
    if not kind.partial:
        log.info("score: %d shards: running every scorer (%s)", len(shards), ", ".join(wanted))
        return
    kept = ", ".join(n for n in wanted if n not in kind.run) or "nothing"
    gone = f"; removing the columns of {', '.join(sorted(kind.drop))} (no longer enabled)" if kind.drop else ""
    if kind.run:
        log.info("score: %d shards: running only %s; keeping %s%s", len(shards), ", ".join(sorted(kind.run)), kept,
                 gone)
    else:
        log.info("score: %d shards: nothing to run; keeping %s%s", len(shards), kept, gone)


def _drop_columns(run: RunDir, works: dict[str, Work], expected: dict[str, int],
                  wanted: dict[str, Producer]) -> list[dict]:
    """Shards whose only change is a scorer no longer enabled: its columns leave the scores files."""
    import ray

    finish = ray.remote(num_cpus=0.25)(finish_shard)
    done = windowed(works, lambda shard: finish.remote(run, shard, 0, works[shard], wanted), limit=8)
    return [{"phase": "score", "shard": s, "error": e} for s, e in sorted(done) if e]


def _score_tasks(cfg: Config, run: RunDir, todo: list[str], expected: dict[str, int], works: dict[str, Work],
                 wanted: dict[str, Producer], columns: list[str]) -> list[dict]:
    """The CPU stage alone (no model scorer to run): one plain Ray task per shard (score_cpu_shard),
    at most two per CPU in flight. Measured against the Ray Data stream it replaces here, this has
    no executor in the driver, no per-batch blocks, parts or merge tasks, and starts at once
    (bench/README.md, score stage breakdown)."""
    import ray

    task = ray.remote(num_cpus=cfg.score.num_cpus, max_retries=3, num_returns="streaming")(score_cpu_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    waiting = iter(todo)
    running: dict = {}
    failures: dict[str, str] = {}
    progress = Progress("score", sum(expected.values()))
    first_seen = False
    while True:
        while len(running) < window and (shard := next(waiting, None)) is not None:
            running[task.remote(run, cfg, shard, expected[shard], works[shard], wanted, columns)] = shard
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        for gen in ready:
            shard = running[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:   # ended without its last item: cannot happen unless the task is cut short
                failures.setdefault(shard, "scoring ended without a result")
                del running[gen]
                continue
            except Exception as exc:   # the task failed after Ray's retries
                item = {"rows": 0, "error": f"CPU scoring failed: {error_text(exc)}", "done": True}
            if item["rows"] and not first_seen:   # start-up made visible (bench_score_stage reads this line)
                first_seen = True
                log.info("score: first rows scored, %.1fs after the phase started", time.time() - progress.start)
            progress.add(item["rows"])
            if item.get("done"):
                del running[gen]
                if item["error"]:
                    failures[shard] = item["error"]
    seconds = progress.finish()
    log.info("score: %d shards in %.1fs", len(todo) - len(failures), seconds)
    return [{"phase": "score", "shard": s, "error": e} for s, e in sorted(failures.items())]


def _score_stream(cfg: Config, run: RunDir, todo: list[str], expected: dict[str, int], works: dict[str, Work],
                  wanted: dict[str, Producer]) -> list[dict]:
    """Score shards that share one kind of work: plain tasks when only CPU scorers run, else the model
    stream under its own object-store budget and block size (restored for the phases after)."""
    import ray
    import ray.data

    names = next(iter(works.values())).run
    models = [n for n in names if BY_NAME[n].stage == "model" and n != "embedding"]
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"enabled": [n for n in cfg.models.enabled if n in names], "keep_embeddings": "embedding" in names})})
    models_on = bool(cfg.models.enabled)
    views_on = bool(models)
    ocr_on = "ocr" in names
    gpu_decode = views_on and cfg.models.gpu_decode   # the model actors decode their own views from the bytes
    model_side = cfg.models.image_size if views_on and not gpu_decode else None
    columns = written_columns(names)
    if not models_on:
        return _score_tasks(cfg, run, todo, expected, works, wanted, columns)
    context = ray.data.DataContext.get_current()
    limits, block = context.execution_options.resource_limits, context.target_max_block_size
    if cfg.score.object_store_mb_per_cpu:   # the stream's own budget; restored for later phases below
        budget = cfg.score.object_store_mb_per_cpu * 2**20 * ray.cluster_resources().get("CPU", 1.0)
        context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    # A CPU task's batches leave it one by one: at Ray Data's default (128 MiB) a whole shard's views
    # were one block, so the model actors waited for the shard's last batch.
    context.target_max_block_size = STREAM_BLOCK_BYTES
    try:
        return _model_stream(cfg, run, todo, expected, works, wanted, names, model_side, ocr_on, views_on,
                             gpu_decode, columns)
    finally:
        context.execution_options.resource_limits, context.target_max_block_size = limits, block


def _model_stream(cfg: Config, run: RunDir, todo: list[str], expected: dict[str, int], works: dict[str, Work],
                  wanted: dict[str, Producer], names: frozenset[str], model_side: int | None, ocr_on: bool,
                  views_on: bool, gpu_decode: bool, columns: list[str]) -> list[dict]:
    """The Ray Data stream of the CPU stage into the model and OCR actor pools (see the module's doc)."""
    import ray

    resources = ray.cluster_resources()
    low, high = actor_pool(cfg.models, resources) if views_on else (0, 0)
    check_room(cfg, views_on, ocr_on, resources.get("CPU", 0.0), high)
    # Three operators at most: the CPU stage (read fused in), then the model and OCR actor pools;
    # whichever comes last writes the parts, so no separate write operator holds back a CPU share.
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(read_and_score_cpu, batch_size=1, num_cpus=cfg.score.num_cpus,
                        fn_kwargs={"run": run, "cfg": cfg, "model_side": model_side,
                                   "keep_image": ocr_on or gpu_decode,
                                   "scorers": frozenset(n for n in names if BY_NAME[n].stage == "cpu")})
    if views_on:
        log.info("score: %s model actors (models.num_actors=%s, %g GPUs each, cluster GPUs %g)",
                 low if low == high else f"{low}-{high}", cfg.models.num_actors, cfg.models.num_gpus,
                 resources.get("GPU", 0.0))
        pool = ray.data.ActorPoolStrategy(size=low) if low == high else \
            ray.data.ActorPoolStrategy(min_size=low, max_size=high)
        ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"cfg": cfg, "run": run,
                                                               "columns": None if ocr_on else columns},
                            batch_size=cfg.models.batch_size, compute=pool, batch_format="pyarrow",
                            num_gpus=cfg.models.num_gpus or None, num_cpus=MODEL_ACTOR_CPUS)
    if ocr_on:
        ds = ds.map_batches(OcrStage, fn_constructor_kwargs={"cfg": cfg, "run": run, "columns": columns},
                            batch_size=cfg.score.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=cfg.models.ocr_actors), batch_format="pyarrow",
                            num_gpus=ocr_gpus(cfg), num_cpus=OCR_ACTOR_CPUS)
    counts: dict[str, int] = defaultdict(int)
    failures: dict[str, str] = {}
    short: dict[str, str | None] = {}
    finish = ray.remote(num_cpus=0.25)(finish_shard)
    window = Window(limit=8)
    progress = Progress("score", sum(expected.values()))
    first_seen = False
    for summary in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if summary.num_rows and not first_seen:   # start-up made visible (bench_score_stage reads this line)
            first_seen = True
            log.info("score: first rows scored, %.1fs after the phase started", time.time() - progress.start)
        for shard, rows, error in zip(*(summary.column(c).to_pylist() for c in ("shard", "rows", "error"))):
            progress.add(rows)
            counts[shard] += rows
            if error:
                failures.setdefault(shard, error)
            elif counts[shard] >= expected[shard] and shard not in failures:
                short.update(window.submit(finish.remote(run, shard, expected[shard], works[shard], wanted), shard))
    short.update(window.drain())
    for shard in todo:  # a shard whose rows did not all come back is a failure, never a silent gap
        if shard in failures:
            continue
        if counts[shard] < expected[shard]:
            failures[shard] = f"scoring returned {counts[shard]} of {expected[shard]} rows"
        elif short.get(shard):  # parts of a re-executed batch may have landed after the first merge
            why = Window.outcome(finish.remote(run, shard, expected[shard], works[shard], wanted))
            if why:
                failures[shard] = why
    seconds = progress.finish()
    log.info("score: %d shards in %.1fs", len(todo) - len(failures), seconds)
    return [{"phase": "score", "shard": s, "error": e} for s, e in sorted(failures.items())]
