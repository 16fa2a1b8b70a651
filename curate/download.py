"""Phase 1, download: img2dataset fetches each input shard inside a Ray task.

We drive img2dataset's `Downloader` and `Resizer` directly (no process pool, no logger
process) with our own sample writer, so samples land under our keys in raw/{shard}.tar and
every input row, fetched or not, lands in raw/{shard}.parquet with its status and error.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from curate.config import Config, DownloadConfig
from curate.fetch import Fetcher, scheme_error
from curate.rundir import RunDir
from curate.storage import Storage
from filters.image import to_rgb
from manifests.schema import conform

RAW_COLUMNS = ["status", "error", "width", "height", "original_width", "original_height", "sha256"]


class _RawShardWriter:
    """img2dataset sample writer that keeps image bytes under our keys and metadata in memory."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        self.folder = Path(output_folder)
        self.tar = tarfile.open(self.folder / "images.tar", "w")
        self.meta: list[dict] = []

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            info = tarfile.TarInfo(f"{meta['row_key']}.jpg")
            info.size = len(img_str)
            info.mtime = 0  # identical bytes on every run
            self.tar.addfile(info, pa.BufferReader(img_str))
        self.meta.append(dict(meta))

    def close(self):
        self.tar.close()
        pq.write_table(pa.Table.from_pylist(self.meta), self.folder / "meta.parquet")


class _GuardedResizer:
    """img2dataset's resizer behind two checks its OpenCV decode lacks.

    The header is read first (PIL, no pixel decode): an image claiming more than max_pixels
    is refused before any allocation, and 16-bit images, which OpenCV would store as
    black JPEGs, are brought to 8 bits.
    """

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            img = Image.open(img_stream)
            width, height = img.size
        except Image.DecompressionBombError as exc:
            return None, None, None, None, None, f"image too large: {exc}"
        except Exception:  # not for PIL: let OpenCV try, and say why it fails
            img_stream.seek(0)
            return self.resizer(img_stream, blurring_bbox_list)
        if width * height > self.max_pixels:
            return None, None, None, None, None, f"image too large: {width}x{height} pixels"
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            buf = io.BytesIO()
            to_rgb(img).save(buf, format="PNG")
            img_stream = buf
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


def _downloader(cfg: DownloadConfig, folder: Path, n_rows: int):
    from img2dataset import downloader as i2d
    from img2dataset.resizer import Resizer

    # img2dataset looks its fetch function up at call time; ours adds the address guard,
    # the redirect check and the size cap.
    i2d.download_image = Fetcher(cfg.allow_networks, cfg.max_bytes)
    resizer = _GuardedResizer(Resizer(image_size=cfg.image_size, resize_mode="keep_ratio",
                                      resize_only_if_bigger=True, encode_quality=cfg.encode_quality,
                                      encode_format="jpg"), cfg.max_pixels)
    return i2d.Downloader(
        sample_writer_class=_RawShardWriter, resizer=resizer, thread_count=cfg.thread_count,
        save_caption=False, extract_exif=False, output_folder=str(folder),
        column_list=["url", "caption", "row_key"], timeout=cfg.timeout,
        number_sample_per_shard=max(n_rows, 10), oom_shard_count=5, compute_hash="sha256",
        verify_hash_type=None, encode_format="jpg", retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives or None,
    )


def _merge(rows: pa.Table, meta: pa.Table | None, extra: list[str]) -> pa.Table:
    """One output row per input row: img2dataset's result where it has one, `rejected` otherwise."""
    keys = rows.column("key").to_pylist()
    found: dict[str, dict] = {}
    if meta is not None and meta.num_rows:
        for rec in meta.select(["row_key", "status", "error_message", "width", "height",
                                "original_width", "original_height", "sha256"]).to_pylist():
            found[rec.pop("row_key")] = rec
    cols: dict[str, list] = {c: [] for c in RAW_COLUMNS}
    for key, url in zip(keys, rows.column("url").to_pylist()):
        rec = found.get(key)
        if rec is None:
            refused = scheme_error(url)
            rec = {"status": "rejected" if refused else "failed_to_download",
                   "error_message": refused or "no result from the downloader"}
        cols["status"].append(rec["status"])
        cols["error"].append(rec.get("error_message"))
        for c in RAW_COLUMNS[2:]:
            cols[c].append(rec.get(c))
    out = rows
    for c in RAW_COLUMNS:
        out = out.append_column(c, pa.array(cols[c]))
    return conform(out, extra)


def download_shard(cfg: Config, shard: str) -> dict:
    """Fetch one input shard; write raw/{shard}.tar, raw/{shard}.parquet, then the done marker.

    img2dataset works in a scratch folder on the worker's local disk, which the task removes;
    the run directory (possibly an object store) only ever receives finished objects.
    """
    run = RunDir(cfg.run_dir, Storage(cfg.storage))
    started = time.time()
    rows = run.storage.read_parquet(run.input_shard(shard))
    with tempfile.TemporaryDirectory(prefix=f"curate-download-{shard}-") as scratch:
        tmp = Path(scratch)
        urls = rows.column("url").to_pylist()
        fetchable = rows.filter(pa.array([scheme_error(u) is None for u in urls]))
        meta = None
        if fetchable.num_rows:
            job = fetchable.select(["url", "caption"]).append_column("row_key", fetchable.column("key"))
            with pa.OSFile(str(tmp / "input.arrow"), "wb") as sink, pa.ipc.new_file(sink, job.schema) as w:
                w.write_table(job)
            downloader = _downloader(cfg.download, tmp, fetchable.num_rows)
            downloader.download_shard((int(shard), str(tmp / "input.arrow")))
            meta = pq.read_table(tmp / "meta.parquet")
        table = _merge(rows, meta, cfg.input.extra_cols)
        images = tmp / "images.tar"
        if not images.exists():
            tarfile.open(images, "w").close()
        with open(images, "rb") as src, run.storage.open_output(run.raw_tar(shard)) as dest:
            shutil.copyfileobj(src, dest, 1 << 20)
        tar_bytes = images.stat().st_size
    run.storage.write_parquet(table, run.raw_table(shard))
    ok = int(pc.sum(pc.equal(table.column("status"), "success")).as_py() or 0)
    run.mark("download", shard, {"rows": table.num_rows, "success": ok, "tar_bytes": tar_bytes})
    return {"shard": shard, "rows": table.num_rows, "success": ok, "seconds": time.time() - started}

