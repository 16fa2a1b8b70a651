"""Phase 1, download: each input shard is fetched inside one Ray task by our own threaded loop.

Why not img2dataset's Downloader any more: its thread pool takes URLs in input order, so a
per-host cap would stall every thread behind one busy host and a Retry-After would hold a
thread asleep. `HostQueue` (curate/phases/download/hosts.py) decides which URL a fetch thread takes next;
`Fetcher` (curate/phases/download/fetch.py) fetches it behind the address guard, and robots.txt requests
(curate/phases/download/robots.py) go through the same fetcher. img2dataset's Resizer still resizes and
re-encodes every image, on this task's main thread (it swaps stdout with os.dup2, which
threads cannot share), but only bytes whose format and size PIL identified first ever reach a
decoder (`_Images`). The result keeps img2dataset's shape: fetched images under our keys in
raw/{shard}.tar, and every input row in raw/{shard}.parquet with its status, error and error_kind.

Memory: the task's response bodies share one `Budget` (download.memory_mb less the decode
reserve) and spill to the task's scratch folder past it; one image is decoded at a time.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import shutil
import sys
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
from curate.phases.download.fetch import Budget, Fetched, Fetcher, host_of, scheme_error
from curate.phases.download.hosts import HostQueue, Job, host_summary, merge_summaries
from curate.phases.download.robots import ROBOTS_MAX_BYTES
from curate.run.rundir import RunDir
from curate.run.runtime import log
from curate.run.storage import Storage
from curate.run.tario import TarWriter, TruncatedTar, members
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


# Formats handed to OpenCV as served, by the magic at offset 0 that OpenCV's own sniffing reads too
# (it tries its decoders in turn, HDR, PAM, PFM, ... included), so the decoder is the one PIL named.
_OPENCV_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "MPO": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",),
                 "WEBP": (b"RIFF",)}
# Modes OpenCV decodes to at most three 8-bit channels. Others (alpha, 16-bit) are decoded by PIL:
# img2dataset mattes a 4-channel array in float64, about 70 bytes per pixel.
_OPENCV_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr"}


def _opencv_reads(img: Image.Image, head: bytes) -> bool:
    magics = _OPENCV_MAGIC.get(img.format or "")
    if not magics or img.mode not in _OPENCV_MODES or "transparency" in img.info:
        return False
    return head.startswith(magics) and (img.format != "WEBP" or head[8:12] == b"WEBP")


def limit_opencv(max_pixels: int) -> bool:
    """Set OpenCV's pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS, read once when cv2 loads) to max_pixels;
    False when cv2 was loaded before, which keeps its own limit (2^30): the identify-first check in
    `_Images` is what holds the line either way."""
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
    return "cv2" not in sys.modules


class _Images:
    """img2dataset's Resizer behind an identify-first check.

    PIL reads the header (no pixel decode): bytes it cannot identify are refused, an image claiming
    more than max_pixels is refused before any allocation, and only then does a decoder run. JPEG,
    PNG and WebP of up to three 8-bit channels go to OpenCV as served; every other format or mode
    is decoded by PIL itself, the parser that identified it (alpha composited on white, 16 bits
    brought to 8), and handed on as a fast PNG.
    """

    def __init__(self, cfg: DownloadConfig):
        if not limit_opencv(cfg.max_pixels):
            log.info("download: OpenCV was loaded before this task; its pixel limit stays its own")
        from img2dataset.resizer import Resizer

        self.resizer = Resizer(image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
                               encode_quality=cfg.encode_quality, encode_format="jpg")
        self.max_pixels = cfg.max_pixels

    def __call__(self, body: bytes) -> tuple[bytes | None, Row]:
        try:
            img = Image.open(io.BytesIO(body))
            width, height = img.size
        except Image.DecompressionBombError as exc:
            return None, Row("failed_to_resize", f"image too large: {exc}", "too_large")
        except Exception:  # noqa: BLE001 - whatever it is, no decoder may see it
            return None, Row("failed_to_resize", "not an image format identified before decoding", "not_an_image")
        if width * height > self.max_pixels:
            return None, Row("failed_to_resize", f"image too large: {width}x{height} pixels", "too_large")
        if _opencv_reads(img, body[:16]):
            stream = io.BytesIO(body)
        else:
            try:
                rgb = to_rgb(img)
                stream = io.BytesIO()
                rgb.save(stream, format="PNG", compress_level=1)
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file of a known format
                return None, Row("failed_to_resize", f"cannot decode {img.format}: {exc}", "not_an_image")
            del rgb
            stream.seek(0)
        del img
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


def fetch_rows(cfg: DownloadConfig, urls: list[str | None], keys: list[str], tar: TarWriter,
               scratch: str | None = None, tls=None) -> tuple[list[Row], HostQueue, Budget]:
    """Fetch every URL under the politeness rules; images go into `tar`, one Row per URL comes back.

    Bodies past the memory budget spill to `scratch`; `tls` replaces the system's trust store (tests)."""
    rows: list[Row | None] = [None] * len(urls)
    hosts = HostQueue(_jobs(urls, rows), cfg)
    budget = Budget(cfg.body_buffer(), scratch)
    fetcher = Fetcher(cfg.allow_networks, cfg.max_bytes, cfg.dns_ttl, proxy=cfg.proxy,
                      lookup_threads=2 * cfg.thread_count + 4, tls=tls, budget=budget)
    done: queue.Queue = queue.Queue(maxsize=2 * cfg.thread_count)   # bodies waiting for the decoder
    last: dict[int, Fetched] = {}   # each retried row's latest failure, for rows given up on later

    def fetch_loop() -> None:
        try:
            while (job := hosts.take()) is not None:
                if job.robots is not None:
                    got = fetcher(job.url, cfg.timeout, cfg.user_agent_token, limit=ROBOTS_MAX_BYTES, truncate=True)
                    hosts.settle_robots(job, got)
                    if got.body is not None:
                        got.body.close()
                    continue
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
    try:
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
                image, row = images(got.body.read())
                got.body.close()
                if image is not None:
                    tar.add(f"{keys[job.index]}.jpg", image)
            rows[job.index] = row
            hosts.record(job, row.error_kind)
    finally:
        fetcher.close()
    if crashed is not None:
        raise crashed
    for job, kind, error in hosts.ended:
        rows[job.index] = Row("rejected", error, kind)
        hosts.record(job, kind)
    for job in hosts.given_up:
        got = last.get(job.index)
        rows[job.index] = Row("failed_to_download", f"{got.error}; not retried: {hosts.give_up_reason}",
                              got.kind) if got else \
            Row("failed_to_download", f"not fetched: {job.host} was paused and {hosts.give_up_reason}",
                "host_unavailable")
        hosts.record(job, rows[job.index].error_kind)
    missing = [keys[i] for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"the fetch loop lost {len(missing)} row(s), e.g. {missing[:3]}")
    return rows, hosts, budget


def _table(rows: pa.Table, results: list[Row], extra: list[str]) -> pa.Table:
    out = rows
    for name in RAW_COLUMNS:
        out = out.append_column(name, pa.array([getattr(r, name) for r in results]))
    return conform(out, extra)


def not_requested(rows: pa.Table) -> tuple[list[Row | None], list[int]]:
    """The result of every row a before-download rule dropped (curate/phases/download/screen.py:
    `before_download`), and the indices of the rows to fetch: the dropped ones are never requested."""
    reasons = rows.column("before_download").to_pylist() if "before_download" in rows.column_names \
        else [None] * rows.num_rows
    skipped = [None if r is None else Row("not_requested", f"not requested: {r} (a rule before download)")
               for r in reasons]
    return skipped, [i for i, r in enumerate(reasons) if r is None]


def _earlier(run: RunDir, shard: str, rows: pa.Table) -> list[Row | None]:
    """Each row's result in the shard's earlier download (raw/{shard}.parquet), None where it was not requested."""
    raw = run.storage.read_parquet(run.raw_table(shard), columns=["key", *RAW_COLUMNS])
    if not raw.column("key").equals(rows.column("key")):
        raise RuntimeError(f"raw/{shard}.parquet does not hold the rows of input_shards/{shard}.parquet")
    return [None if r["status"] == "not_requested" else Row(**r) for r in raw.select(RAW_COLUMNS).to_pylist()]


def _copy_stored(run: RunDir, shard: str, names: set[str], tar: TarWriter) -> set[str]:
    """Copy the images `names` from the shard's raw tar into `tar` (the same member bytes); the names copied.
    A tar that ends early gives what it holds: the rest are fetched again."""
    copied: set[str] = set()
    if not names:
        return copied
    try:
        with run.storage.open_input(run.raw_tar(shard)) as f:
            for name, data in members(f, names):
                tar.add(name, data)
                copied.add(name)
    except (FileNotFoundError, TruncatedTar) as exc:
        log.warning("download: raw/%s.tar gives %d of its %d images (%s); the others are fetched again",
                    shard, len(copied), len(names), exc)
    return copied


def download_shard(cfg: Config, shard: str, increment: str | None = None) -> dict:
    """Fetch one input shard; write raw/{shard}.tar, raw/{shard}.parquet, then the done marker.

    Images are collected in a scratch tar on the worker's local disk, which the task removes;
    the run directory (possibly an object store) only ever receives finished objects. The
    marker carries the shard's counts, error kinds, wait and per-host stats for stats.json.

    `increment` (the plan's increment after a loosened setting, curate/phases/download/screen.py
    `rescreen`): the shard was downloaded before, and only the rows that download did not request and
    the plan now admits are fetched. Every other row keeps its earlier result, and its image is copied
    from the earlier raw tar without a request. The shard's markers go first (download, score and on),
    so until the new marker is written no phase reads it half-changed; the new marker adds the earlier
    one's host counts and wait (a retried task, whose earlier marker is gone, counts its own alone).
    """
    run = RunDir(cfg.run_dir, Storage(cfg.storage))
    started = time.time()
    rows = run.storage.read_parquet(run.input_shard(shard))
    skipped, asked = not_requested(rows)
    keys = rows.column("key").to_pylist()
    earlier: list[Row | None] = [None] * rows.num_rows
    before: dict = {}
    if increment is not None and run.storage.exists(run.raw_table(shard)):
        earlier = _earlier(run, shard, rows)
        if run.storage.exists(run.marker("download", shard)):
            before = run.storage.read_json(run.marker("download", shard))
        run.invalidate(shard, "download")
    with tempfile.TemporaryDirectory(prefix=f"curate-download-{shard}-") as scratch:
        images = Path(scratch) / "images.tar"
        with open(images, "wb") as f:
            tar = TarWriter(f)
            stored = _copy_stored(run, shard, {f"{keys[i]}.jpg" for i, r in enumerate(earlier)
                                               if r is not None and r.status == "success"}, tar)
            earlier = [None if r is not None and r.status == "success" and f"{keys[i]}.jpg" not in stored else r
                       for i, r in enumerate(earlier)]
            asked = [i for i in asked if earlier[i] is None]
            urls = rows.column("url").to_pylist()
            fetched, hosts, budget = fetch_rows(cfg.download, [urls[i] for i in asked], [keys[i] for i in asked],
                                                tar, scratch)
            tar.close()
        results = [e if e is not None else s for e, s in zip(earlier, skipped)]
        for i, row in zip(asked, fetched):
            results[i] = row
        with open(images, "rb") as src, run.storage.open_output(run.raw_tar(shard)) as dest:
            shutil.copyfileobj(src, dest, 1 << 20)
        tar_bytes = images.stat().st_size
    table = _table(rows, results, cfg.input.extra_cols)
    run.storage.write_parquet(table, run.raw_table(shard))
    ok = sum(r.status == "success" for r in results)
    kinds = Counter(r.error_kind for r in results if r.error_kind)
    info = {"rows": table.num_rows, "success": ok, "tar_bytes": tar_bytes,
            "not_requested": sum(r.status == "not_requested" for r in results),
            "error_kinds": dict(kinds.most_common()), "wait_s": round(hosts.waited + before.get("wait_s", 0.0), 3),
            "bodies": {"peak_mb": round(budget.peak / 2**20, 1), "spilled": budget.spilled},
            "hosts": merge_summaries(before.get("hosts", {}), host_summary(hosts))}
    if increment is not None:   # what this download did: the requests it made, the images it kept
        info["increment"] = {"screen": increment, "requested": len(asked), "stored": len(stored)}
    run.mark("download", shard, info)
    return {"shard": shard, "rows": table.num_rows, "success": ok, "requested": len(asked),
            "stored": len(stored), "seconds": time.time() - started}
