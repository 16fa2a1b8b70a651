"""Phase 1, download: each input shard is fetched inside one Ray task by our own threaded loop.

Why not img2dataset's Downloader any more: its thread pool takes URLs in input order, so a
per-host cap would stall every thread behind one busy host and a Retry-After would hold a
thread asleep. `HostQueue` (curate/hosts.py) decides which URL a fetch thread takes next;
`Fetcher` (curate/fetch.py) fetches it behind the address guard. img2dataset's Resizer still
decodes, resizes and re-encodes every image, on this task's main thread (it swaps stdout with
os.dup2, which threads cannot share). The result keeps img2dataset's shape: fetched images
under our keys in raw/{shard}.tar, and every input row in raw/{shard}.parquet with its
status, error and error_kind.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

import pyarrow as pa
from PIL import Image

from curate.config import Config, DownloadConfig
from curate.fetch import Fetched, Fetcher, host_of, scheme_error
from curate.hosts import HostQueue, Job, host_summary
from curate.rundir import RunDir
from curate.storage import Storage
from curate.tario import TarWriter
from filters.image import to_rgb
from manifests.schema import conform

RAW_COLUMNS = ["status", "error", "error_kind", "width", "height", "original_width", "original_height", "sha256"]


@dataclass(frozen=True)
class Row:
    """One input row's download result, in RAW_COLUMNS order."""
    status: str
    error: str | None = None
    error_kind: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None


class _Images:
    """img2dataset's Resizer behind two checks its OpenCV decode lacks.

    The header is read first (PIL, no pixel decode): an image claiming more than max_pixels
    is refused before any allocation, and 16-bit images, which OpenCV would store as
    black JPEGs, are brought to 8 bits.
    """

    def __init__(self, cfg: DownloadConfig):
        from img2dataset.resizer import Resizer

        self.resizer = Resizer(image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
                               encode_quality=cfg.encode_quality, encode_format="jpg")
        self.max_pixels = cfg.max_pixels

    def __call__(self, body: bytes) -> tuple[bytes | None, Row]:
        stream = io.BytesIO(body)
        try:
            img = Image.open(stream)
            width, height = img.size
        except Image.DecompressionBombError as exc:
            return None, Row("failed_to_resize", f"image too large: {exc}", "too_large")
        except Exception:  # not for PIL: let OpenCV try, and say why it fails
            img = None
        if img is not None and width * height > self.max_pixels:
            return None, Row("failed_to_resize", f"image too large: {width}x{height} pixels", "too_large")
        if img is not None and img.mode in ("I;16", "I;16B", "I;16L", "I"):
            stream = io.BytesIO()
            to_rgb(img).save(stream, format="PNG")
        stream.seek(0)
        image, width, height, original_width, original_height, error = self.resizer(stream)
        if error is not None:
            return None, Row("failed_to_resize", error, "not_an_image")
        return image, Row("success", None, None, width, height, original_width, original_height,
                          hashlib.sha256(body).hexdigest())


def _jobs(urls: list[str | None], rows: list[Row | None]) -> list[Job]:
    """A job per fetchable URL; rows that are never fetched get their result here."""
    jobs = []
    for i, url in enumerate(urls):
        refused = scheme_error(url)
        host = host_of(url) if not refused else None
        if refused:
            rows[i] = Row("rejected", refused, "bad_url")
        elif host is None:
            rows[i] = Row("failed_to_download", "URL has no host", "bad_url")
        else:
            jobs.append(Job(i, url, host))
    return jobs


def fetch_rows(cfg: DownloadConfig, urls: list[str | None], keys: list[str], tar: TarWriter) -> tuple[list[Row], HostQueue]:
    """Fetch every URL under the politeness rules; images go into `tar`, one Row per URL comes back."""
    rows: list[Row | None] = [None] * len(urls)
    hosts = HostQueue(_jobs(urls, rows), cfg)
    fetcher = Fetcher(cfg.allow_networks, cfg.max_bytes, cfg.dns_ttl)
    done: queue.Queue = queue.Queue(maxsize=2 * cfg.thread_count)   # bounds the bodies held in memory
    last: dict[int, Fetched] = {}   # each retried row's latest failure, for rows given up on later

    def fetch_loop() -> None:
        try:
            while (job := hosts.take()) is not None:
                got = fetcher(job.url, cfg.timeout, cfg.user_agent_token, cfg.disallowed_header_directives)
                if hosts.settle(job, got.kind, got.retry_after):
                    done.put((job, got))
                else:
                    last[job.index] = got
        except BaseException as exc:   # a bug, not a row's failure: stop the shard, loudly
            hosts.close()
            done.put(exc)
        finally:
            done.put(None)

    threads = [threading.Thread(target=fetch_loop, daemon=True, name=f"curate-fetch-{i}")
               for i in range(cfg.thread_count)]
    for t in threads:
        t.start()
    images, running, crashed = _Images(cfg), len(threads), None
    while running:
        item = done.get()
        if item is None:
            running -= 1
            continue
        if isinstance(item, BaseException):
            crashed = item
            continue
        job, got = item
        row = Row("failed_to_download", got.error, got.kind)
        if got.body is not None:
            image, row = images(got.body)
            if image is not None:
                tar.add(f"{keys[job.index]}.jpg", image)
        rows[job.index] = row
        hosts.record(job, row.error_kind)
    if crashed is not None:
        raise crashed
    for job in hosts.given_up:
        got = last.get(job.index)
        rows[job.index] = Row("failed_to_download", f"{got.error}; not retried: the shard's wait budget "
                                                    f"(download.max_wait) was spent", got.kind) if got else \
            Row("failed_to_download", f"not fetched: {job.host} stayed paused past the shard's wait budget "
                                      f"(download.max_wait)", "host_unavailable")
        hosts.record(job, rows[job.index].error_kind)
    missing = [keys[i] for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"the fetch loop lost {len(missing)} row(s), e.g. {missing[:3]}")
    return rows, hosts


def _table(rows: pa.Table, results: list[Row], extra: list[str]) -> pa.Table:
    out = rows
    for name in RAW_COLUMNS:
        out = out.append_column(name, pa.array([getattr(r, name) for r in results]))
    return conform(out, extra)


def not_requested(rows: pa.Table) -> tuple[list[Row | None], list[int]]:
    """The result of every row a before-download rule dropped (curate/screen.py: `before_download`), and the
    indices of the rows to fetch: the dropped ones are never requested."""
    reasons = rows.column("before_download").to_pylist() if "before_download" in rows.column_names \
        else [None] * rows.num_rows
    skipped = [None if r is None else Row("not_requested", f"not requested: {r} (a rule before download)")
               for r in reasons]
    return skipped, [i for i, r in enumerate(reasons) if r is None]


def download_shard(cfg: Config, shard: str) -> dict:
    """Fetch one input shard; write raw/{shard}.tar, raw/{shard}.parquet, then the done marker.

    Images are collected in a scratch tar on the worker's local disk, which the task removes;
    the run directory (possibly an object store) only ever receives finished objects. The
    marker carries the shard's counts, error kinds, wait and per-host stats for stats.json.
    """
    run = RunDir(cfg.run_dir, Storage(cfg.storage))
    started = time.time()
    rows = run.storage.read_parquet(run.input_shard(shard))
    skipped, asked = not_requested(rows)
    with tempfile.TemporaryDirectory(prefix=f"curate-download-{shard}-") as scratch:
        images = Path(scratch) / "images.tar"
        with open(images, "wb") as f:
            tar = TarWriter(f)
            urls, keys = rows.column("url").to_pylist(), rows.column("key").to_pylist()
            fetched, hosts = fetch_rows(cfg.download, [urls[i] for i in asked], [keys[i] for i in asked], tar)
            tar.close()
        results = list(skipped)
        for i, row in zip(asked, fetched):
            results[i] = row
        with open(images, "rb") as src, run.storage.open_output(run.raw_tar(shard)) as dest:
            shutil.copyfileobj(src, dest, 1 << 20)
        tar_bytes = images.stat().st_size
    table = _table(rows, results, cfg.input.extra_cols)
    run.storage.write_parquet(table, run.raw_table(shard))
    ok = sum(r.status == "success" for r in results)
    kinds = Counter(r.error_kind for r in results if r.error_kind)
    run.mark("download", shard, {"rows": table.num_rows, "success": ok, "tar_bytes": tar_bytes,
                                 "not_requested": table.num_rows - len(asked),
                                 "error_kinds": dict(kinds.most_common()), "wait_s": round(hosts.waited, 3),
                                 "hosts": host_summary(hosts)})
    return {"shard": shard, "rows": table.num_rows, "success": ok, "seconds": time.time() - started}
