"""Download phase vs plain img2dataset: images/s on one URL list from one local HTTP server.

Ours wraps img2dataset's Downloader in-process, so the ratio prices the wrapper (address
guard, our tar writer, the per-row manifest). Both get the same thread count and resize
settings (keep_ratio, resize only if bigger, 1024 px, jpg, sha256 of the bytes). Each is
timed on the shard's download itself: ours around `download_shard`, img2dataset from the
start/end times its own stats file records. Process and Ray start-up are excluded from
both (img2dataset's CLI start-up is reported separately); the timed work includes reading
the input shard and writing the tar and parquet.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import photos, rate, served, side_by_side, timer
from curate.config import DownloadConfig

SIZES = {"smoke": 8, "quick": 500, "full": 3000}


def _ours(urls: Path, work: Path, threads: int) -> float:
    from curate import config as config_mod
    from curate.download import download_shard
    from curate.inputs import plan
    from curate.rundir import RunDir

    shutil.rmtree(work, ignore_errors=True)
    rows = pq.ParquetFile(urls).metadata.num_rows
    cfg = config_mod.resolve(config_mod.validate({
        "run_dir": str(work), "input": {"paths": [str(urls)], "shard_rows": rows},
        "download": {"thread_count": threads, "allow_networks": ["127.0.0.1/32"]},
    }))
    (shard,) = plan(cfg.input, RunDir(work))
    elapsed = timer()
    result = download_shard(cfg, shard)
    seconds = elapsed()
    assert result["success"] == rows, f"ours fetched {result['success']} of {rows}"
    return seconds


def _img2dataset(urls: Path, work: Path, threads: int, cfg: DownloadConfig, startup: list[float]) -> float:
    shutil.rmtree(work, ignore_errors=True)
    rows = pq.ParquetFile(urls).metadata.num_rows
    cmd = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(urls), "--input_format", "parquet",
           "--url_col", "url", "--output_format", "webdataset", "--output_folder", str(work),
           "--processes_count", "1", "--thread_count", str(threads), "--number_sample_per_shard", str(rows),
           "--image_size", str(cfg.image_size), "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
           "--encode_format", "jpg", "--encode_quality", str(cfg.encode_quality), "--compute_hash", "sha256",
           "--extract_exif", "False", "--timeout", str(int(cfg.timeout)), "--retries", str(cfg.retries),
           "--enable_wandb", "False", "--distributor", "multiprocessing"]
    elapsed = timer()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    wall = elapsed()
    stats = json.loads((work / "00000_stats.json").read_text())
    assert stats["successes"] == rows, f"img2dataset fetched {stats['successes']} of {rows}"
    seconds = stats["end_time"] - stats["start_time"]
    startup.append(round(wall - seconds, 2))
    return seconds


def run(mode: str) -> dict:
    """Both contenders on the same served URL list; the warm-up also fills the page cache."""
    n = SIZES[mode]
    repeats = 1 if mode == "smoke" else 3
    cfg = DownloadConfig()
    threads = cfg.thread_count
    with tempfile.TemporaryDirectory(prefix="bench_dl_") as tmp:
        root = Path(tmp)
        files = photos(root / "images", n, 512, 1536)
        with served(root / "images") as base:
            urls = root / "urls.parquet"
            pq.write_table(pa.table({"url": [f"{base}/{p.name}" for p in files],
                                     "caption": [f"样例图片 {i}" for i in range(n)]}), urls)
            startup: list[float] = []
            timings = side_by_side({
                "ours": lambda: _ours(urls, root / "ours", threads),
                "img2dataset": lambda: _img2dataset(urls, root / "i2d", threads, cfg, startup),
            }, repeats, warm=() if mode == "smoke" else None)
    ours_rate, i2d_rate = rate(n, timings["ours"]), rate(n, timings["img2dataset"])
    return {
        "sizes": {"images": n, "sides_px": [512, 1536], "thread_count": threads, "repeats": repeats},
        "settings": {"image_size": cfg.image_size, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
                     "encode_format": "jpg", "encode_quality": cfg.encode_quality, "compute_hash": "sha256",
                     "extract_exif": False, "img2dataset_processes": 1, "server": "ThreadingHTTPServer, own process"},
        "timings": timings,
        "images_per_s": {"ours": ours_rate, "img2dataset": i2d_rate},
        "img2dataset_cli_startup_s": startup[-repeats:],
        "ratios": {"download.ours_over_img2dataset": round(ours_rate / i2d_rate, 3)},
        "notes": "timed: the shard's download (ours: download_shard; img2dataset: its stats start/end); "
                 "start-up of the img2dataset CLI (listed) and of Ray excluded from both",
    }
