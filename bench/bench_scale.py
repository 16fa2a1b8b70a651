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

`run_1b` (benchmark `scale1b`) is the same decide and write at the shape of a 1B-row run,
scaled down to this machine: what matters per piece and per task is kept, the rows are not.
- groups x partitions: 1,000 x 500 as at 1B (one shard per group, `dedupe.partitions` 500), so
  every task sends or receives as many pieces as at 1B, each under Ray's 100 KiB inline limit;
- the sub-band bucket cap (`curate.phases.decide.dedupe.MAX_BUCKET`) scaled by rows / 1B, so buckets overflow it
  as they would at 1B;
- copies at web rates with one viral image (N/1000 copies: a million at 1B) and look-alike walks
  of N/100 distinct images (tens of millions at 1B) (bench/scale_run.py `BILLION`);
- download markers with per-host tables (51 hosts each).
Headline figures: `scale1b.driver_peak_mb` (≤ 2,048), `scale1b.skipped_hashes` (0),
`scale1b.components_bytes_per_edge_row` (docs/scale.md's bound), `scale1b.largest_group_over_planted`
(≤ 1.5: the largest group found against the viral group planted) and
`scale1b.shuffle_bytes_per_survivor` (the candidates shuffle's records, search records and each
row's attributes, per surviving row, from `_decided.json`'s `dedupe.candidates_payload_bytes`; the
slices' framing, which grows with groups x partitions and not with rows, is reported apart per
piece, since at this scale a piece holds a handful of records where at 1B it holds thousands).
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
from curate.run.runtime import init_ray
cfg = config(sys.argv[1], int(sys.argv[2]))
init_ray(cfg.ray.address, cfg.ray.num_cpus)
start = time.perf_counter()
outcome = run_phases(cfg, ("decide", "write"))
seconds = time.perf_counter() - start
print("SCALE", json.dumps({"seconds": seconds, "failures": outcome.failures, "kept": outcome.stats["shards"]["samples"],
                           "out_shards": outcome.stats["shards"]["count"], "funnel": outcome.stats["funnel"]}))
"""


def config(root: str, shard_rows: int, partitions: int | None = None):
    """The run's config: every decide step on (the zh_web preset's thresholds, exact, near and semantic
    dedup, a style rebalance), the synthetic input's shard size, 1,000-sample shards."""
    from curate.config import validate

    dedupe = {"semantic_threshold": SEMANTIC_THRESHOLD, **({"partitions": partitions} if partitions else {})}
    return validate({"run_dir": root, "input": {"paths": ["synthetic.parquet"], "shard_rows": shard_rows},
                     "filters": {"clip_min": 0.2, "aesthetic_min": 5.0},
                     # the synthetic scores' scorers, as the score phase that wrote them would have had them
                     "models": {"enabled": ["clip_score", "aesthetic", "nsfw", "watermark", "style"]},
                     "dedupe": dedupe,
                     "rebalance": {"styles": {"photo": {"max_share": 0.5}, "painting": {"min_share": 0.05}}},
                     "write": {"samples_per_shard": SAMPLES_PER_SHARD}})


def duplicate_kinds(root: str) -> dict[str, int]:
    """Rows dropped as duplicates, by what links each to its kept row: the same sha256 (exact), whole
    hashes within the distance (near), else the embeddings (semantic, or near on a crop view)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.run.rundir import RunDir
    from curate.run.storage import Storage

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
    from curate.run.storage import Storage

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
            "write_samples_per_s_per_core": round(result["kept"] / phases["write"]["seconds"] / cores, 1),
            "decide_us_per_row": round(phases["decide"]["seconds"] / rows * 1e6, 2), "funnel": result["funnel"],
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


# -- the 1B shape ------------------------------------------------------------------------------

ROWS_1B = 1_000_000_000
# rows, rows per shard (= per group: one shard per group), partitions; quick keeps 1,000 groups x 500
# partitions in under 10 minutes on 2 cores (the fan-out, not the rows, sets its time)
SHAPE_1B = {"smoke": (10_000, 200, 20), "quick": (50_000, 50, 500), "full": (2_000_000, 2_000, 500)}

CHILD_1B = """
import json, sys, time
import curate.phases.decide.phase, curate.phases.decide.dedupe
from bench.bench_scale import config
from curate.pipeline import run_phases
from curate.run.runtime import init_ray
root, shard_rows, partitions, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
curate.phases.decide.phase.ROWS_PER_GROUP = shard_rows    # one shard per group: as many groups as a 1B run has
curate.phases.decide.dedupe.MAX_BUCKET = cap               # the bucket cap scaled to the rows
cfg = config(root, shard_rows, partitions)
init_ray(cfg.ray.address, cfg.ray.num_cpus)
start = time.perf_counter()
outcome = run_phases(cfg, ("decide", "write"))
seconds = time.perf_counter() - start
print("SCALE", json.dumps({"seconds": seconds, "failures": outcome.failures, "funnel": outcome.stats["funnel"]}))
"""


def bucket_cap(rows: int) -> int:
    """MAX_BUCKET scaled by rows / 1B: a bucket holds survivors x 12 / 2^17 distinct hashes on even
    hashes, so at this cap the buckets overflow as often as at 1B (at least 2, so a cap still exists)."""
    from curate.phases.decide.dedupe import MAX_BUCKET

    return max(2, round(MAX_BUCKET * rows / ROWS_1B))


def plan_seconds(rows: int, folder: Path) -> float:
    """The download phase's input plan (curate.phases.download.plan.plan, with its URL-hash shuffle) on a URL list
    of `rows` rows in 1,000-row parquet row groups, as a crawl's export has them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.config import InputConfig
    from curate.phases.download.plan import plan
    from curate.run.rundir import RunDir

    src = folder / "urls.parquet"
    ids = np.arange(rows)
    pq.write_table(pa.table({"url": pa.array([f"http://img{i % 997}.example.cn/{i}.jpg" for i in ids.tolist()]),
                             "caption": pa.array([f"图片 {i}" for i in ids.tolist()])}), src, row_group_size=1000)
    run = RunDir(str(folder / "plan-run"))
    started = time.perf_counter()
    plan(InputConfig(paths=[str(src)], shard_rows=10_000), run)
    seconds = time.perf_counter() - started
    shutil.rmtree(folder / "plan-run", ignore_errors=True)
    src.unlink()
    return seconds


def groups_found(root: str) -> dict:
    """Duplicate groups as the decisions name them (a kept row and the rows whose dup_of is it),
    against the viral group planted (its rows that passed every per-row rule)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.run.rundir import RunDir
    from curate.run.storage import Storage

    run = RunDir(root, Storage())
    shards = run.shard_names()
    dec = pa.concat_tables([run.storage.read_parquet(run.decisions(s), columns=["key", "reason", "dup_of"])
                            for s in shards])
    reason = dec.column("reason")
    dup_of = dec.column("dup_of").filter(pc.equal(reason, "duplicate"))
    counts = pc.value_counts(dup_of)
    sizes = counts.field("counts").to_numpy() + 1 if len(counts) else np.empty(0, np.int64)
    viral = set()
    for s in shards:
        viral.update(f"{s}_{i:06d}" for i in run.storage.read_json(run.uri("_planted", f"{s}.json"))["viral"])
    survived = pc.or_(pc.is_null(reason), pc.is_in(reason, pa.array(["duplicate", "rebalanced"]))).to_numpy(False)
    keys = dec.column("key").to_numpy(zero_copy_only=False)
    planted = int(sum(1 for k, ok in zip(keys.tolist(), survived.tolist()) if ok and k in viral))
    hist = np.bincount(np.minimum(sizes, 1 << 20).astype(np.int64)) if len(sizes) else np.empty(0)
    return {"groups": int(len(sizes)), "rows_in_groups": int(sizes.sum()), "largest": int(sizes.max(initial=1)),
            "planted_largest": planted, "size_histogram": {str(i): int(n) for i, n in enumerate(hist.tolist()) if n}}


def run_1b(mode: str) -> dict:
    """Decide and write at a 1B run's per-piece and per-task shape (module docstring)."""
    from bench.bench_scaling import Breakdown
    from bench.scale_run import BILLION, make_run
    from curate.run.storage import Storage

    rows, shard_rows, partitions = SHAPE_1B[mode]
    cap = bucket_cap(rows)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench_scale1b_", dir=os.environ.get("BENCH_SCALE_DIR")) as tmp:
        root = str(Path(tmp) / "run")
        started = time.perf_counter()
        make_run(root, rows, config(root, shard_rows).input, workers=cores, shape=BILLION)
        built = time.perf_counter() - started
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.Popen([sys.executable, "-c", CHILD_1B, root, str(shard_rows), str(partitions), str(cap)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Breakdown(proc.pid, every=0.5) as memory:
            stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("SCALE ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"decide+write at the 1B shape exited {proc.returncode}: "
                               f"{stdout.strip()[-1000:]} {stderr.strip()[-1000:]}")
        result = json.loads(lines[-1].split(" ", 1)[1])
        storage = Storage()
        phases = storage.read_json(str(Path(root) / "timings.json"))
        decided = storage.read_json(str(Path(root) / "decisions" / "_decided.json"))
        groups = groups_found(root)
        plan_s = plan_seconds(rows, Path(tmp))
    funnel = result["funnel"]
    survivors = funnel["kept"] + sum(funnel["dropped"].get(r, 0) for r in ("duplicate", "rebalanced"))
    dedupe = decided["dedupe"]
    candidates = dedupe["shuffle_bytes"]["candidates"]
    peak = memory.result()
    return {
        "rows": rows, "shard_rows": shard_rows, "groups": -(-rows // shard_rows), "partitions": partitions,
        "bucket_cap": cap, "cores": cores, "build_s": round(built, 1), "seconds": round(result["seconds"], 2),
        "phases_s": phases, "failures": result["failures"], "funnel": funnel, "survivors": survivors,
        "dedupe": dedupe, "groups_found": groups, "peak_mb": peak, "plan_s": round(plan_s, 2),
        "candidates_shuffle": {   # records per survivor apart from the framing per slice (groups x partitions x 2)
            "bytes_per_survivor_with_framing": round(candidates / max(survivors, 1), 1),
            "framing_bytes_per_piece": round((candidates - dedupe["candidates_payload_bytes"])
                                             / max(dedupe["candidates_pieces"], 1), 1)},
        "ratios": {
            "scale1b.driver_peak_mb": peak["driver_mb"],
            "scale1b.object_store_peak_mb": round(peak.get("workers_shmem_mb", 0) + peak.get("driver_shmem_mb", 0), 1),
            "scale1b.skipped_hashes": dedupe.get("near_dup_skipped_hashes", 0),   # nothing skips since the split levels
            "scale1b.components_bytes_per_edge_row": round(dedupe["components"]["bytes"]
                                                           / max(dedupe["components"]["rows"], 1), 1),
            "scale1b.largest_group_over_planted": round(groups["largest"] / max(groups["planted_largest"], 1), 3),
            "scale1b.shuffle_bytes_per_survivor": round(dedupe["candidates_payload_bytes"] / max(survivors, 1), 1),
            "scale1b.plan_us_per_input_row": round(plan_s / rows * 1e6, 2),
            "scale1b.decide_us_per_row": round(phases["decide"]["seconds"] / rows * 1e6, 2),
            "scale1b.us_per_row": round(result["seconds"] / rows * 1e6, 2),
        },
    }
