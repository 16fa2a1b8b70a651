"""bench_scale: decide and write on synthetic scored runs of growing size (the data plane's proof).

Each size is a synthetic scored run (bench/scale_run.py: realistic columns, tiny real JPEGs,
failed downloads, exact and near copies across shards, shared captions, 12 view hashes and
768-d embeddings clustered in families of look-alike images) on local disk; a fresh process runs
the real `decide` and `write` phases on it through an embedded Ray with the machine's cores. The
decide phase is the whole of it: reading every shard, the per-row rules (the zh_web thresholds),
exact, near (12-view pHash) and semantic dedup, the style rebalance and writing the decisions;
its own seconds per row are reported beside the total. We sample the PSS of the driver process
and of every Ray process under it.

Headline figures (goals from the data-plane issue):
- `scale.sec_per_row_max_over_min`: decide+write seconds per row at the largest size over the
  smallest (≤ 1.2: cost per row stays flat);
- `scale.driver_peak_max_over_min`: the driver's peak PSS, largest over smallest (≤ 1.2);
- `scale.driver_peak_mb_at_max`: the driver's peak PSS at the largest size (≤ 2,000 MB);
- `scale.write_samples_per_s_per_core`: kept samples written per second per core at the largest
  size (≥ 5,000 on tiny images).
Not like for like with anything outside: there is no other tool that decides and writes from
per-shard score files, so the comparison is the pipeline against itself at 10x the rows.
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

from bench.common import ROOT, PeakMemory

SIZES = {"smoke": (20_000, 60_000), "quick": (200_000, 1_000_000), "full": (1_000_000, 10_000_000)}
SHARD_ROWS = {"smoke": 2_000, "quick": 10_000, "full": 10_000}
SAMPLES_PER_SHARD = 1000
SEMANTIC_THRESHOLD = 0.95   # near copies sit at about 0.995 cosine, look-alike families at about 0.6

CHILD = """
import json, sys, time
from bench.bench_scale import config
from curate.pipeline import run_phases
from curate.runtime import init_ray
cfg = config(sys.argv[1], int(sys.argv[2]))
init_ray(cfg.ray)
start = time.perf_counter()
outcome = run_phases(cfg, ("decide", "write"))
seconds = time.perf_counter() - start
print("SCALE", json.dumps({"seconds": seconds, "failures": outcome.failures, "kept": outcome.stats["shards"]["samples"],
                           "out_shards": outcome.stats["shards"]["count"], "funnel": outcome.stats["funnel"]}))
"""


def config(root: str, shard_rows: int):
    """The run's config: every decide step on (the zh_web preset's thresholds, exact, near and semantic
    dedup, a style rebalance), the synthetic input's shard size, 1,000-sample shards."""
    from curate.config import validate

    return validate({"run_dir": root, "input": {"paths": ["synthetic.parquet"], "shard_rows": shard_rows},
                     "filters": {"clip_min": 0.2, "aesthetic_min": 5.0},
                     "dedupe": {"semantic_threshold": SEMANTIC_THRESHOLD},
                     "rebalance": {"styles": {"photo": {"max_share": 0.5}, "painting": {"min_share": 0.05}}},
                     "write": {"samples_per_shard": SAMPLES_PER_SHARD}})


def duplicate_kinds(root: str) -> dict[str, int]:
    """Rows dropped as duplicates, by what links each to its kept row: the same sha256 (exact), whole
    hashes within the distance (near), else the embeddings (semantic, or near on a crop view)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.rundir import RunDir
    from curate.storage import Storage

    run = RunDir(root, Storage())
    shards = run.shard_names()
    dup = pa.concat_tables([run.storage.read_parquet(run.decisions(s), columns=["key", "reason", "dup_of"])
                            for s in shards])
    dup = dup.filter(pc.equal(dup.column("reason"), "duplicate"))
    facts = pa.concat_tables([
        run.storage.read_parquet(run.raw_table(s), columns=["key", "sha256"]).append_column(
            "phash", run.storage.read_parquet(run.scores(s), columns=["phash"]).column("phash")) for s in shards])
    index = {k: i for i, k in enumerate(facts.column("key").to_pylist())}
    me = np.array([index[k] for k in dup.column("key").to_pylist()], np.int64)
    kept = np.array([index[k] for k in dup.column("dup_of").to_pylist()], np.int64)
    sha = facts.column("sha256").to_numpy(zero_copy_only=False)
    phash = facts.column("phash").fill_null(0).to_numpy().astype(np.uint64)
    exact = sha[me] == sha[kept]
    bits = np.unpackbits((phash[me] ^ phash[kept]).view(np.uint8).reshape(-1, 8), axis=1).sum(1)
    near = ~exact & (bits <= config(root, 1).dedupe.phash_max_distance)
    return {"exact": int(exact.sum()), "near": int(near.sum()), "semantic_or_crop_view": int((~exact & ~near).sum())}


def one_size(rows: int, shard_rows: int, folder: Path) -> dict:
    """Build the synthetic run, then decide and write it in a fresh process; seconds and peaks."""
    from bench.scale_run import make_run
    from curate.storage import Storage

    root = str(folder / f"run-{rows}")
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    make_run(root, rows, config(root, shard_rows).input, workers=len(os.sched_getaffinity(0)))
    built = time.perf_counter() - started
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, root, str(shard_rows)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid, every=0.5) as memory:
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("SCALE ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"decide+write of {rows} rows exited {proc.returncode}: {stderr.strip()[-1500:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    phases = Storage().read_json(str(Path(root) / "timings.json"))
    kinds = duplicate_kinds(root)
    shutil.rmtree(root, ignore_errors=True)
    cores = len(os.sched_getaffinity(0))
    return {"rows": rows, "shards": -(-rows // shard_rows), "build_s": round(built, 1),
            "seconds": round(result["seconds"], 2), "phases_s": phases,
            "sec_per_row": result["seconds"] / rows, "us_per_row": round(result["seconds"] / rows * 1e6, 2),
            "kept": result["kept"], "out_shards": result["out_shards"], "failures": result["failures"],
            "write_samples_per_s_per_core": round(result["kept"] / phases["write"] / cores, 1),
            "decide_us_per_row": round(phases["decide"] / rows * 1e6, 2), "funnel": result["funnel"],
            "duplicates_by_kind": kinds,
            "peak_mb": memory.result()}


def run(mode: str) -> dict:
    sizes, shard_rows = SIZES[mode], SHARD_ROWS[mode]
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=os.environ.get("BENCH_SCALE_DIR")) as tmp:
        per_size = [one_size(n, shard_rows, Path(tmp)) for n in sizes]
    small, large = per_size[0], per_size[-1]
    return {
        "sizes": list(sizes), "shard_rows": shard_rows, "samples_per_shard": SAMPLES_PER_SHARD,
        "cores": len(os.sched_getaffinity(0)), "per_size": per_size,
        "ratios": {
            "scale.sec_per_row_max_over_min": round(large["sec_per_row"] / small["sec_per_row"], 3),
            "scale.driver_peak_max_over_min": round(large["peak_mb"]["driver_mb"] / small["peak_mb"]["driver_mb"], 3),
            "scale.driver_peak_mb_at_max": large["peak_mb"]["driver_mb"],
            "scale.write_samples_per_s_per_core": large["write_samples_per_s_per_core"],
        },
    }
