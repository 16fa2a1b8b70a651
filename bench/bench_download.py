"""Download phase vs plain img2dataset: images/s on one URL list, from one host and from many.

Ours is our own fetch loop (per-host caps, retries, address guard) around img2dataset's Resizer;
the single-host ratio prices all of it. Both get the same thread count and resize settings
(keep_ratio, resize only if bigger, 1024 px, jpg, sha256 of the bytes) and our defaults
otherwise (ours: download.per_host_connections; img2dataset has no such limit). Each is
timed on the shard's download itself: ours around `download_shard`, img2dataset from the
start/end times its own stats file records. Process and Ray start-up are excluded from
both (img2dataset's CLI start-up is reported separately); the timed work includes reading
the input shard and writing the tar and parquet.

The many-hosts case serves the same images from 16 loopback addresses (bench.hosts_server),
with the URL list sorted by host and half of it on the first host, as crawled lists are:
it reports both contenders' images/s and the peak connections any one host saw.

The tarpit case serves TARPIT_URLS URLs evenly from TARPIT_HOSTS hosts, sorted by host, of which
20% drip their answers (bench.hosts_server: 40 bytes, one every 0.5 s): images/s counts the good
hosts' images over the whole shard, for both. Run it alone with `python -m bench.bench_download tarpits [DRIP_BYTES]`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ROOT, photos, rate, served, side_by_side, timer
from curate.config import DownloadConfig

SIZES = {"smoke": 8, "quick": 500, "full": 3000}
HOSTS = 16
TARPIT_HOSTS, TARPITS = 10, 2          # 20% of the hosts
TARPIT_URLS = {"smoke": 10, "quick": 200, "full": 200}


@contextmanager
def served_hosts(folder: Path, count: int, tarpits: int = 0, drip_bytes: int = 40) -> Iterator[list[str]]:
    """bench.hosts_server in its own process; yields the base URL of each host (the last `tarpits` drip)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.hosts_server", str(folder), str(count), str(tarpits),
                             str(drip_bytes)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        bases = [proc.stdout.readline().strip() for _ in range(count)]
        if not all(b.startswith("http://127.0.1.") for b in bases):
            raise RuntimeError(f"the benchmark's host server did not start (exit {proc.poll()})")
        yield bases
    finally:
        proc.terminate()
        proc.wait(10)


def peaks(bases: list[str]) -> list[int]:
    """Each host's peak concurrent connections since the last call (which resets them)."""
    return [json.loads(urllib.request.urlopen(f"{b}/_peak", timeout=10).read())["peak"] for b in bases]


def sorted_many_hosts(bases: list[str], names: list[str]) -> list[str]:
    """Half the URLs on the first host, the rest spread over the others, sorted by host."""
    half = len(names) // 2
    urls = [f"{bases[0]}/{n}" for n in names[:half]]
    urls += [f"{bases[1 + i % (len(bases) - 1)]}/{n}" for i, n in enumerate(names[half:])]
    return sorted(urls)


def _ours(urls: Path, work: Path, threads: int, allow: str = "127.0.0.1/32", expect: int | None = None) -> float:
    from curate import config as config_mod
    from curate.download import download_shard
    from curate.inputs import plan
    from curate.rundir import RunDir

    shutil.rmtree(work, ignore_errors=True)
    rows = pq.ParquetFile(urls).metadata.num_rows
    cfg = config_mod.resolve(config_mod.validate({
        "run_dir": str(work), "input": {"paths": [str(urls)], "shard_rows": rows},
        "download": {"thread_count": threads, "allow_networks": [allow]},
    }))
    (shard,) = plan(cfg.input, RunDir(work))
    elapsed = timer()
    result = download_shard(cfg, shard)
    seconds = elapsed()
    expect = rows if expect is None else expect
    assert result["success"] == expect, f"ours fetched {result['success']} of {expect}"
    return seconds


def _img2dataset(urls: Path, work: Path, threads: int, cfg: DownloadConfig, startup: list[float],
                 expect: int | None = None) -> float:
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
    expect = rows if expect is None else expect
    assert stats["successes"] == expect, f"img2dataset fetched {stats['successes']} of {expect}"
    seconds = stats["end_time"] - stats["start_time"]
    startup.append(round(wall - seconds, 2))
    return seconds


def _many_hosts(root: Path, files: list[Path], threads: int, cfg: DownloadConfig, repeats: int, warm) -> dict:
    """Both contenders on the sorted 16-host list; every run's peak per-host connections recorded."""
    with served_hosts(root / "images", HOSTS) as bases:
        urls = root / "urls_hosts.parquet"
        listed = sorted_many_hosts(bases, [p.name for p in files])
        pq.write_table(pa.table({"url": listed, "caption": [f"样例图片 {i}" for i in range(len(listed))]}), urls)
        seen: dict[str, list[list[int]]] = {"ours": [], "img2dataset": []}

        def measured(name: str, fn):
            def go() -> float:
                peaks(bases)   # reset
                seconds = fn()
                seen[name].append(peaks(bases))
                return seconds
            return go

        timings = side_by_side({
            "ours": measured("ours", lambda: _ours(urls, root / "ours_h", threads, "127.0.1.0/24")),
            "img2dataset": measured("img2dataset", lambda: _img2dataset(urls, root / "i2d_h", threads, cfg, [])),
        }, repeats, warm=warm)
    n = len(listed)
    return {
        "hosts": HOSTS, "urls_on_first_host": sum(u.startswith(bases[0] + "/") for u in listed),
        "per_host_connections": cfg.per_host_connections, "timings": timings,
        "images_per_s": {k: rate(n, t) for k, t in timings.items()},
        "peak_per_host": {k: max(max(run) for run in runs) for k, runs in seen.items()},
        "peak_first_host": {k: max(run[0] for run in runs) for k, runs in seen.items()},
        "peaks_per_run": seen,
    }


def tarpits(mode: str, drip_bytes: int = 40) -> dict:
    """Both contenders once on a sorted list over TARPIT_HOSTS hosts, TARPITS of them slow-drip tarpits
    (each answer `drip_bytes` long: img2dataset's time follows it, ours is bounded by download.timeout)."""
    from bench import hosts_server

    cfg = DownloadConfig()
    n = TARPIT_URLS[mode]
    with tempfile.TemporaryDirectory(prefix="bench_tarpit_") as tmp:
        root = Path(tmp)
        files = photos(root / "images", n, 512, 1536)
        with served_hosts(root / "images", TARPIT_HOSTS, TARPITS, drip_bytes) as bases:
            listed = sorted(f"{bases[i % TARPIT_HOSTS]}/{p.name}" for i, p in enumerate(files))
            good = sum(not any(u.startswith(b + "/") for b in bases[-TARPITS:]) for u in listed)
            urls = root / "urls_tarpit.parquet"
            pq.write_table(pa.table({"url": listed, "caption": [f"样例图片 {i}" for i in range(n)]}), urls)
            timings = side_by_side({
                "ours": lambda: _ours(urls, root / "ours_t", cfg.thread_count, "127.0.1.0/24", expect=good),
                "img2dataset": lambda: _img2dataset(urls, root / "i2d_t", cfg.thread_count, cfg, [], expect=good),
            }, 1, warm=())
    return {"hosts": TARPIT_HOSTS, "tarpit_hosts": TARPITS, "urls": n, "good_urls": good,
            "drip": {"bytes": drip_bytes, "seconds_per_byte": hosts_server.DRIP_SECONDS},
            "settings": {"timeout": cfg.timeout, "retries": cfg.retries, "host_window": cfg.host_window,
                         "host_pause": cfg.host_pause, "max_wait": cfg.max_wait, "thread_count": cfg.thread_count},
            "timings": timings, "images_per_s": {k: rate(good, t) for k, t in timings.items()}}


def run(mode: str) -> dict:
    """Both contenders on the same served URL lists; the warm-up also fills the page cache."""
    n = SIZES[mode]
    repeats = 1 if mode == "smoke" else 3
    warm = () if mode == "smoke" else None
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
            }, repeats, warm=warm)
        many = _many_hosts(root, files, threads, cfg, repeats, warm)
    pits = tarpits(mode) if mode != "smoke" else None   # its drips take a minute however few the URLs
    ours_rate, i2d_rate = rate(n, timings["ours"]), rate(n, timings["img2dataset"])
    return {
        "sizes": {"images": n, "sides_px": [512, 1536], "thread_count": threads, "repeats": repeats},
        "settings": {"image_size": cfg.image_size, "resize_mode": "keep_ratio", "resize_only_if_bigger": True,
                     "encode_format": "jpg", "encode_quality": cfg.encode_quality, "compute_hash": "sha256",
                     "extract_exif": False, "img2dataset_processes": 1, "server": "ThreadingHTTPServer, own process",
                     "per_host_connections": cfg.per_host_connections, "retries": cfg.retries},
        "timings": timings,
        "images_per_s": {"ours": ours_rate, "img2dataset": i2d_rate},
        "img2dataset_cli_startup_s": startup[-repeats:],
        "many_hosts": many,
        "tarpits": pits,
        "ratios": {"download.ours_over_img2dataset": round(ours_rate / i2d_rate, 3),
                   "download.many_hosts_ours_over_img2dataset": round(
                       many["images_per_s"]["ours"] / many["images_per_s"]["img2dataset"], 3)},
        "notes": "timed: the shard's download (ours: download_shard; img2dataset: its stats start/end); "
                 "start-up of the img2dataset CLI (listed) and of Ray excluded from both; many_hosts: "
                 f"{HOSTS} loopback hosts, sorted list, half on the first; peaks are connections open at once",
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["tarpits"]:   # [DRIP_BYTES]
        print(json.dumps(tarpits("quick", *(int(a) for a in sys.argv[2:3])), indent=1))
