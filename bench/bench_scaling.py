"""How time and memory grow with input: the demo pipeline end to end, models off, at two row counts.

The demo corpus (every kind of trouble a crawl holds) is generated once, untimed, at the
largest size and cached; each size uses its first n rows, served from 127.0.0.1 by a server in
its own process. Every run is a fresh process running the demo config (models off, so the cost
is the pipeline's own) through all four phases, timed from after Ray's start to the end of write.

Start-up is excluded by subtracting a tiny run: seconds per 1,000 rows at n rows is
(t(n) - t(tiny)) * 1000 / (n - tiny), so Ray Data's start-up, worker imports and the per-phase
fixed costs, which dominate small runs, drop out at every size alike.

Memory: a sampler outside the run reads every process's PSS (and its anonymous / shared-memory
parts, from /proc/PID/smaps_rollup): the driver (the run's process) and its descendants (Ray's
daemons and workers). Shared-memory pages are the object store's: a worker that maps a block
has its pages counted in its own PSS. At the end of the score phase the run itself records
what Ray says (`ray memory --stats-only`, the workers from ray.util.state with psutil's USS and
PSS for each). Models off, the score phase runs plain tasks, not the Ray Data stream, so the
stream's object-store cap (score.object_store_mb_per_cpu) has nothing to bound here and is not A/B'd.

Smoke mode runs the same measurement in this process on the Ray already running (the test
session's), at tens of rows, so it takes seconds: it checks the code, not the figures.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ROOT, PeakMemory, _children, served

# (tiny run, measured sizes): the tiny run's time is the fixed cost subtracted at every size.
SIZES = {"smoke": (10, [30, 60]), "quick": (50, [1_000, 10_000]), "full": (50, [10_000, 100_000])}
OVERRIDES = ["models.enabled=[]"]   # the pipeline's own cost: no model (bench_models and bench_ocr time those)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "curate-bench"
SEED = 0

# One run, in its own process: Ray first (untimed), then the phases as `curate demo` runs them; at the
# end of score, what Ray itself says about memory.
CHILD = """
import json, sys, time
from pathlib import Path
from bench.bench_scaling import ray_memory
from curate.demo.run import demo_config
from curate.pipeline import run_phases
from curate.run.runtime import init_ray
out = Path(sys.argv[1])
cfg = demo_config(out, sys.argv[2:])
init_ray(cfg.ray.address, cfg.ray.num_cpus)
start = time.perf_counter()
failures = run_phases(cfg, ("download",)).failures
failures += run_phases(cfg, ("score",), skip_missing_models=True).failures
memory = ray_memory()
failures += run_phases(cfg, ("decide", "write")).failures
seconds = time.perf_counter() - start
print("SCALING", json.dumps({"seconds": seconds, "failures": failures, "ray_memory": memory,
                             "phases": json.loads((out / "timings.json").read_text())}))
"""


def ray_memory() -> dict:
    """What Ray reports after the score phase: the object store's use (`ray memory --stats-only`)
    and each live worker's USS and PSS (psutil), the workers listed by ray.util.state where the
    dashboard runs, else found in this process's tree (the embedded Ray starts without a dashboard)."""
    import psutil
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    stats = [line.strip() for line in summary.splitlines()
             if any(word in line for word in ("Plasma memory usage", "Spilled", "Restored", "Objects consumed"))]
    try:
        from ray.util.state import list_workers

        pids = [w.pid for w in list_workers(filters=[("worker_type", "=", "WORKER"), ("is_alive", "=", True)],
                                            detail=True, raise_on_missing_output=False)]
        source = "ray.util.state.list_workers"
    except Exception:
        pids = [p.pid for p in psutil.Process().children(recursive=True) if _kind(p.pid) == "worker"]
        source = "psutil process tree (ray:: processes)"
    workers = []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        workers.append({"pid": pid, "uss_mb": round(info.uss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1),
                        "shared_mb": round(info.shared / 2**20, 1)})
    return {"object_store_capacity_mb": round(ray.cluster_resources().get("object_store_memory", 0) / 2**20),
            "ray_memory_stats": stats, "workers_from": source, "workers": workers,
            "workers_uss_mb": round(sum(w["uss_mb"] for w in workers), 1),
            "workers_pss_mb": round(sum(w["pss_mb"] for w in workers), 1)}


def _rollup(pid: int) -> dict[str, float]:
    """PSS and its anonymous and shared-memory (object store) parts, in MB."""
    out = {"Pss": 0.0, "Pss_Anon": 0.0, "Pss_Shmem": 0.0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def _kind(pid: int) -> str:
    """raylet, gcs_server, a Ray worker (ray::...) or other (dashboard, log monitor, ...)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "gone"
    if cmd.startswith("ray::"):
        return "worker"
    name = Path(cmd).name
    return name if name in ("raylet", "gcs_server") else "other"


class Breakdown(PeakMemory):
    """PeakMemory plus the peaks of the descendants' shared-memory (object store) and anonymous PSS,
    the peak PSS of each kind of process (raylet, gcs_server, workers, other) and the most Ray worker
    processes alive at once."""

    def __init__(self, pid: int | None = None, every: float = 0.5):
        super().__init__(pid, every)
        self.peaks: dict[str, float] = {}

    def sample(self) -> None:
        super().sample()
        tree, todo = [], _children(self.pid)
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += _children(pid)
        sums: dict[str, float] = {"workers_shmem_mb": 0.0, "workers_anon_mb": 0.0, "worker_processes": 0}
        for pid in tree:
            roll = _rollup(pid)
            sums["workers_shmem_mb"] += roll["Pss_Shmem"]
            sums["workers_anon_mb"] += roll["Pss_Anon"]
            kind = _kind(pid)
            sums[f"{kind}_mb"] = sums.get(f"{kind}_mb", 0.0) + roll["Pss"]
            sums["worker_processes"] += kind == "worker"   # each Ray worker costs its own imports
        sums["driver_shmem_mb"] = _rollup(self.pid)["Pss_Shmem"]
        for key, value in sums.items():
            self.peaks[key] = max(self.peaks.get(key, 0.0), value)

    def result(self) -> dict:
        return {**super().result(), **{k: round(v, 1) for k, v in sorted(self.peaks.items())}}


def corpus(n: int) -> Path:
    """The demo corpus of n rows, generated once per (n, seed) and kept in the user's cache."""
    from curate.demo.corpus import generate

    folder = CACHE / f"corpus-{n}-{SEED}"
    table = folder / "rows.parquet"
    if not table.exists():
        shutil.rmtree(folder, ignore_errors=True)
        samples = generate(folder / "images", n=n, seed=SEED)
        pq.write_table(pa.table({"name": [s.name for s in samples], "caption": [s.caption for s in samples],
                                 "kind": [s.kind for s in samples]}), folder / "rows.tmp")
        (folder / "rows.tmp").rename(table)
    return folder


def _input(rows: pa.Table, base: str, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    (out / "input").mkdir(parents=True)
    urls = pa.array([f"{base}/{name}" for name in rows.column("name").to_pylist()])
    pq.write_table(pa.table({"url": urls, "caption": rows.column("caption"), "kind": rows.column("kind")}),
                   out / "input" / "urls.parquet")


def one_run(rows: pa.Table, base: str, out: Path, overrides: list[str]) -> dict:
    """The first rows of the corpus through the pipeline in a fresh process; seconds and peak memory."""
    _input(rows, base, out)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Breakdown(proc.pid) as memory:
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("SCALING ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"pipeline run of {rows.num_rows} rows exited {proc.returncode}: {stderr.strip()[-800:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    shutil.rmtree(out, ignore_errors=True)
    return {**result, "rows": rows.num_rows, "peak_mb": memory.result()}


def in_process_run(rows: pa.Table, base: str, out: Path, overrides: list[str]) -> dict:
    """Smoke mode: the same phases in this process, on the Ray already started (no start-up to pay)."""
    from curate.demo.run import demo_config
    from curate.pipeline import run_phases

    _input(rows, base, out)
    cfg = demo_config(out, overrides)
    with Breakdown(os.getpid(), every=0.2) as memory:
        start = time.perf_counter()
        failures = run_phases(cfg, ("download",)).failures
        failures += run_phases(cfg, ("score",), skip_missing_models=True).failures
        store = ray_memory()
        failures += run_phases(cfg, ("decide", "write")).failures
        seconds = time.perf_counter() - start
    phases = json.loads((out / "timings.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "failures": failures, "ray_memory": store, "phases": phases,
            "rows": rows.num_rows, "peak_mb": memory.result()}


def _warm_page_cache(folder: Path) -> None:
    """Read every image once, so no run pays for the disk and the first one is not the slow one."""
    for path in folder.iterdir():
        path.read_bytes()


def _point(run: dict, tiny: dict) -> dict:
    """One size's figures: seconds per 1,000 rows beyond the tiny run's fixed cost, peaks, phases."""
    extra = run["seconds"] - tiny["seconds"]
    return {"rows": run["rows"], "seconds": round(run["seconds"], 2),
            "sec_per_1k": round(extra * 1000 / (run["rows"] - tiny["rows"]), 3),
            "sec_per_1k_with_startup": round(run["seconds"] * 1000 / run["rows"], 3),
            "phases_s": run["phases"], "peak_mb": run["peak_mb"], "ray_memory": run["ray_memory"],
            "failures": run["failures"]}


def run(mode: str) -> dict:
    """A tiny run twice (a warm-up, then the fixed cost), then each size once, each in a fresh process (in
    this one in smoke mode)."""
    tiny_rows, sizes = SIZES[mode]
    launch = in_process_run if mode == "smoke" else one_run
    folder = corpus(max(sizes))
    _warm_page_cache(folder / "images")
    table = pq.read_table(folder / "rows.parquet")
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp, served(folder / "images") as base:
        def go(n: int, extra: list[str] = ()) -> dict:
            print(f"bench_scaling: {n:,} rows {' '.join(extra)}", flush=True)
            return launch(table.slice(0, n), base, Path(tmp) / f"run-{n}", OVERRIDES + list(extra))

        go(tiny_rows)   # warm-up, discarded: the first run pays cold caches (imports, the served files)
        tiny = go(tiny_rows)
        per_size = {str(n): _point(go(n), tiny) for n in sizes}
    points = list(per_size.values())
    per_1k = [s["sec_per_1k"] for s in points]
    peak = {who: [s["peak_mb"][who] for s in points] for who in ("driver_mb", "workers_mb")}
    out = {
        "sizes": {"tiny": tiny_rows, "rows": sizes, "config": "jobs/demo.yaml", "overrides": OVERRIDES,
                  "in_process": mode == "smoke"},
        "tiny": {"rows": tiny_rows, "seconds": round(tiny["seconds"], 2), "phases_s": tiny["phases"]},
        "per_size": per_size,
        "ratios": {"scaling.sec_per_1k_max_over_min": round(max(per_1k) / min(per_1k), 3) if min(per_1k) > 0 else None,
                   "scaling.peak_mem_max_over_min": round(max(max(v) / min(v) for v in peak.values()), 3)},
        "notes": "seconds per 1k rows exclude start-up: (t(n) - t(tiny)) / (n - tiny); timed from after Ray "
                 "start to the end of write, in a fresh process per run; corpus generation excluded; peak memory "
                 "is PSS (shared pages split), sampled every 0.5 s over the run's process tree: driver = the "
                 "run's process, workers = its descendants (Ray's daemons and workers); *_shmem_mb is the "
                 "object store's share of it; peak_mem_max_over_min is the larger of the driver's and the "
                 "workers' ratios",
    }
    return out
