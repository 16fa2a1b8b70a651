"""How time and memory grow with input: the demo pipeline end to end at several row counts.

The demo corpus (every kind of trouble a crawl holds) is generated once, untimed, at the
largest size and cached; each size uses its first n rows, served from 127.0.0.1 by a server
in its own process. Every run is a fresh process running the demo config through all four
phases; timed from after Ray's start to the end of write. A sampler outside the run reads
the PSS of that process (the driver) and of its descendants (Ray and its workers).
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

from bench.common import ROOT, PeakMemory, served, summary

SIZES = {"smoke": [20, 40], "quick": [1_000, 10_000], "full": [1_000, 10_000, 100_000]}
# The smoke run only checks that the benchmark still works: no model, so it takes seconds, not minutes.
OVERRIDES = {"smoke": ["models.enabled=[]"], "quick": [], "full": []}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "curate-bench"
SEED = 0

# One run, in its own process: Ray first (untimed), then the phases as `curate demo` runs them.
CHILD = """
import json, sys, time
from pathlib import Path
from curate.demo import demo_config
from curate.pipeline import run_phases
from curate.runtime import init_ray
out = Path(sys.argv[1])
cfg = demo_config(out, sys.argv[2:])
init_ray(cfg.ray)
start = time.perf_counter()
failures = run_phases(cfg, ("download",)).failures
failures += run_phases(cfg, ("score", "decide", "write"), skip_missing_models=True).failures
seconds = time.perf_counter() - start
print("SCALING", json.dumps({"seconds": seconds, "failures": failures,
                             "phases": json.loads((out / "timings.json").read_text())}))
"""


def corpus(n: int) -> Path:
    """The demo corpus of n rows, generated once per (n, seed) and kept in the user's cache."""
    from curate.demo_corpus import generate

    folder = CACHE / f"corpus-{n}-{SEED}"
    table = folder / "rows.parquet"
    if not table.exists():
        shutil.rmtree(folder, ignore_errors=True)
        samples = generate(folder / "images", n=n, seed=SEED)
        pq.write_table(pa.table({"name": [s.name for s in samples], "caption": [s.caption for s in samples],
                                 "kind": [s.kind for s in samples]}), folder / "rows.tmp")
        (folder / "rows.tmp").rename(table)
    return folder


def one_run(rows: pa.Table, base: str, out: Path, overrides: list[str]) -> dict:
    """The first rows of the corpus through the pipeline in a fresh process; seconds and peak memory."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "input").mkdir(parents=True)
    urls = pa.array([f"{base}/{name}" for name in rows.column("name").to_pylist()])
    pq.write_table(pa.table({"url": urls, "caption": rows.column("caption"), "kind": rows.column("kind")}),
                   out / "input" / "urls.parquet")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("SCALING ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"pipeline run of {rows.num_rows} rows exited {proc.returncode}: {stderr.strip()[-800:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    shutil.rmtree(out, ignore_errors=True)
    return {**result, "peak_mb": memory.result()}


def _warm_page_cache(folder: Path) -> None:
    """Read every image once, so no run pays for the disk and the first one is not the slow one."""
    for path in folder.iterdir():
        path.read_bytes()


def run(mode: str) -> dict:
    """Each size in fresh processes: three runs at 1k (and at 10k under full), one at the larger sizes.

    Larger sizes run once to keep `make bench` within minutes; the JSON lists the repeats.
    """
    sizes = SIZES[mode]
    repeats = {n: 1 if mode == "smoke" else 3 if n <= 1_000 or (mode == "full" and n <= 10_000) else 1
               for n in sizes}
    folder = corpus(max(sizes))
    _warm_page_cache(folder / "images")
    table = pq.read_table(folder / "rows.parquet")
    per_size = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp, served(folder / "images") as base:
        for n in sizes:
            runs = [one_run(table.slice(0, n), base, Path(tmp) / f"run-{n}", OVERRIDES[mode])
                    for _ in range(repeats[n])]
            timing = summary([r["seconds"] for r in runs])
            per_size[str(n)] = {
                "rows": n, "repeats": repeats[n], "timing": timing,
                "sec_per_1k": round(timing["median_s"] * 1000 / n, 3),
                "phases_s": [r["phases"] for r in runs],
                "peak_mb": {k: max(r["peak_mb"][k] for r in runs) for k in ("driver_mb", "workers_mb", "total_mb")},
                "failures": [f for r in runs for f in r["failures"]],
            }
    points = list(per_size.values())
    per_1k = [s["sec_per_1k"] for s in points]
    peaks = [s["peak_mb"]["total_mb"] for s in points]
    return {
        "sizes": {"rows": sizes, "repeats": repeats, "config": "jobs/demo.yaml", "overrides": OVERRIDES[mode]},
        "per_size": per_size,
        # Between consecutive sizes: the cost of 1,000 more rows, which leaves out the fixed cost per run
        # (worker imports, model loading, Ray Data start-up) that dominates small runs.
        "marginal_sec_per_1k": {f"{a['rows']}->{b['rows']}": round(
            (b["timing"]["median_s"] - a["timing"]["median_s"]) * 1000 / (b["rows"] - a["rows"]), 3)
            for a, b in zip(points, points[1:])},
        "ratios": {"scaling.sec_per_1k_max_over_min": round(max(per_1k) / min(per_1k), 3),
                   "scaling.peak_mem_max_over_min": round(max(peaks) / min(peaks), 3)},
        "notes": "timed from after Ray start to the end of write, in a fresh process per run; corpus generation "
                 "excluded; peak memory is PSS (shared pages split), sampled every 0.2 s over the run's process "
                 "tree: driver = the run's process, workers = its descendants (Ray and its workers)",
    }
