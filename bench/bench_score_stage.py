"""The score stage itself: `curate.phases.score.phase.run_score` through Ray on this machine, against the loop to beat.

One demo run (photos, cartoons, text images, broken and hostile files) is downloaded once,
untimed, from a server on 127.0.0.1; a second run holds its shards `CLONES` times over (rows
copied under new keys and shard names, `clone_run`), so the same rows come at two sizes with no
second download. Then, taking turns every repeat:
- the stage, models off: wall seconds of run_score from scratch (its `_done/score` and `scores/`
  deleted first), Ray already started, at both sizes;
- the loop to beat: bench_score_cpu.careful_loop (one full decode per image, then every metric of
  ours, and the caption metrics) in a multiprocessing pool of as many processes as Ray has CPUs,
  on the same images and captions (the pool started before the clock), wall seconds, both sizes;
- ours in a loop: read_raw + score_cpu on the stage's own batches, one process, CPU time.
The marginal rate of each is (rows of the big run - rows of the small) / (seconds big - small): the
fixed cost (task launch, worker imports, pool hand-off) cancels, so a small run's fixed cost can
neither hide nor fake the rate. `ray_over_loop` = stage marginal rate / pool marginal rate (goal
>= 0.8); the rates with start-up (rows / seconds at the big size) are beside them.
Start-up: `curate run CONFIG` in a fresh process with its embedded Ray, on the small run (downloads
done, so the download phase only checks its markers), from launch to the driver's "first rows
scored" log line: models off (`startup_s`, the whole run then finishes) and with the demo's
open_nsfw and OCR (`startup_models_s`, the run is interrupted at that line); the other lines'
arrival times break it down.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_score_cpu import careful_loop
from bench.common import ROOT, cpu_timer, rescore_seconds, summary

SIZES = {"smoke": 40, "quick": 1000, "full": 5000}
CLONES = {"smoke": 2, "quick": 5, "full": 4}   # the big run holds the small run's shards this many times
REPEATS = {"smoke": 1, "quick": 2, "full": 3}
MODELS_OFF = ["models.enabled=[]"]
MODELS_ON = ["models.enabled=[nsfw,ocr]"]    # the demo's: open_nsfw (ONNX ResNet-50) and PP-OCRv4 detection
FIRST_ROWS = "score: first rows scored"
MILESTONES = {"config_loaded_ray_starting": "starting a local Ray", "download_checked": "download: all",
              "score_started": "score: ", "first_rows_scored": FIRST_ROWS}
CLI = "import sys; from curate.cli import main; sys.argv[0] = 'curate'; main()"


def clone_run(src: Path, dst: Path, times: int) -> int:
    """A run whose raw shards are `src`'s, `times` over, under new shard names and keys (tar members,
    parquet keys and download markers rewritten): the same work per row, with no second download."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.rmtree(dst, ignore_errors=True)
    (dst / "raw").mkdir(parents=True)
    (dst / "_done" / "download").mkdir(parents=True)
    (dst / "input").mkdir()
    shutil.copy(src / "input" / "urls.parquet", dst / "input" / "urls.parquet")
    shards = sorted(p.stem for p in (src / "raw").glob("*.parquet"))
    for n in range(times * len(shards)):
        old, new = shards[n % len(shards)], f"{n:05d}"
        table = pq.read_table(src / "raw" / f"{old}.parquet")
        keys = pc.replace_substring_regex(table.column("key"), f"^{old}_", f"{new}_")
        table = table.set_column(table.column_names.index("key"), "key", keys)
        table = table.set_column(table.column_names.index("shard"), "shard", pa.array([new] * table.num_rows))
        pq.write_table(table, dst / "raw" / f"{new}.parquet")
        with tarfile.open(src / "raw" / f"{old}.tar") as tin, tarfile.open(dst / "raw" / f"{new}.tar", "w") as tout:
            for member in tin:
                data = tin.extractfile(member).read() if member.isfile() else None
                member.name = member.name.replace(f"{old}_", f"{new}_", 1)
                tout.addfile(member, io.BytesIO(data) if data is not None else None)
        marker = json.loads((src / "_done" / "download" / f"{old}.json").read_text())
        marker["tar_bytes"] = (dst / "raw" / f"{new}.tar").stat().st_size
        (dst / "_done" / "download" / f"{new}.json").write_text(json.dumps(marker))
    return times * len(shards)


def _rows(run) -> tuple[list[bytes], list[str]]:
    """The run's downloaded images and every row's caption, as the stage's reader yields them."""
    import numpy as np

    from curate.phases.score.phase import read_raw

    images, captions = [], []
    for batch in read_raw({"shard": np.array(sorted(run.done("download")), dtype=object)}, run, 256):
        images += [b for b in batch["_image"] if b is not None]
        captions += [c or "" for c in batch["caption"]]
    return images, captions


def _ours_loop(cfg, run) -> float:
    """The stage's own read and CPU scoring, batch by batch, in this process; CPU seconds."""
    import numpy as np

    from curate.phases.score.phase import read_raw, score_cpu

    elapsed = cpu_timer()
    shards = np.array(sorted(run.done("download")), dtype=object)
    for batch in read_raw({"shard": shards}, run, cfg.score.batch_size):
        score_cpu(batch, cfg, model_side=None)
    return elapsed()


def _careful_chunk(args) -> float:
    """One pool process's share: the careful loop on its images and captions."""
    images, captions, cfg = args
    return careful_loop(images, captions, cfg)


def pool_seconds(pool, processes: int, images: list[bytes], captions: list[str], cfg) -> float:
    """The careful loop over every row, split evenly across the pool's processes; wall seconds, the
    hand-off of the bytes to the processes included (the stage reads its tars inside its time too)."""
    step_i, step_c = -(-len(images) // processes), -(-len(captions) // processes)
    chunks = [(images[i * step_i:(i + 1) * step_i], captions[i * step_c:(i + 1) * step_c], cfg)
              for i in range(processes)]
    start = time.perf_counter()
    pool.map(_careful_chunk, chunks, chunksize=1)
    return time.perf_counter() - start


def startup(out: Path, root: Path, overrides: list[str], stop_at_first_rows: bool) -> dict:
    """`curate run` in a fresh process: seconds from launch to each milestone line; interrupted (SIGINT,
    so Ray shuts down) at the first scored rows when `stop_at_first_rows`."""
    config = root / "startup.yaml"
    shutil.copy(out / "config.yaml", config)
    for name in ("scores", "_done/score", "_done/decide", "_done/write"):
        shutil.rmtree(out / name, ignore_errors=True)
    launched = time.perf_counter()
    command = [sys.executable, "-c", CLI, "run", str(config), *(a for o in overrides for a in ("--set", o))]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    tail: list[str] = []
    interrupted = False
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        for name, marker in MILESTONES.items():
            if marker in line and name not in seen:
                seen[name] = round(time.perf_counter() - launched, 2)
        if stop_at_first_rows and "first_rows_scored" in seen and not interrupted:
            proc.send_signal(signal.SIGINT)   # Ray shuts down on the way out; killed if it has not in a minute
            watchdog = threading.Timer(60, proc.kill)
            watchdog.start()
            interrupted = True
    proc.wait()
    if interrupted:
        watchdog.cancel()
    total = round(time.perf_counter() - launched, 2)
    if "first_rows_scored" not in seen or (proc.returncode and not interrupted):
        raise RuntimeError(f"curate run exited {proc.returncode} without a '{FIRST_ROWS}' line: " + "\n".join(tail))
    for name in ("scores", "_done/score"):   # an interrupted run leaves parts and markers behind
        shutil.rmtree(out / name, ignore_errors=True)
    return {"startup_s": seen["first_rows_scored"], "milestones_s": seen, "whole_run_s": total,
            "command": f"curate run {config.name} {' '.join('--set ' + o for o in overrides)} (downloads done)"
                       + (", interrupted at the first scored rows" if interrupted else "")}


def marginal(rows: tuple[int, int], seconds: tuple[float, float]) -> float | None:
    """Rows per second beyond the fixed cost: the rows the big run adds over the seconds it adds."""
    extra = seconds[1] - seconds[0]
    return round((rows[1] - rows[0]) / extra, 2) if extra > 0 else None


def run(mode: str) -> dict:
    import ray

    from curate.demo.run import demo_config, run_demo
    from curate.run.rundir import RunDir

    n, repeats, times = SIZES[mode], REPEATS[mode], CLONES[mode]
    with tempfile.TemporaryDirectory(prefix="curate-bench-stage-") as tmp:
        small, big = Path(tmp) / "run", Path(tmp) / "big"
        outcome = run_demo(small, n=n, seed=0, overrides=MODELS_OFF, later=())   # untimed
        if not outcome.ok:
            raise RuntimeError(f"demo download failed: {outcome.failures}")
        clone_run(small, big, times)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        cfg = demo_config(small, MODELS_OFF)
        small_run = RunDir(cfg.run_dir)
        images, captions = _rows(small_run)
        rows = (len(captions), len(captions) * times)
        with multiprocessing.get_context("spawn").Pool(cpus) as pool:
            pool_seconds(pool, cpus, images[:cpus], captions[:cpus], cfg)   # imports in every process
            contenders = {
                "stage_small": lambda: rescore_seconds(small, MODELS_OFF),
                "stage_big": lambda: rescore_seconds(big, MODELS_OFF),
                "pool_small": lambda: pool_seconds(pool, cpus, images, captions, cfg),
                "pool_big": lambda: pool_seconds(pool, cpus, images * times, captions * times, cfg),
                "ours_loop": lambda: _ours_loop(cfg, small_run)}
            runs: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(repeats):
                for name, fn in contenders.items():
                    runs[name].append(fn())
        start = startup(small, Path(tmp), MODELS_OFF, stop_at_first_rows=False)
        models = (startup(small, Path(tmp), MODELS_ON, stop_at_first_rows=True) if mode != "smoke" else
                  {"startup_s": None, "not_run": "smoke mode: open_nsfw and OCR load for tens of seconds"})
    timings = {k: summary(r) for k, r in runs.items()}
    med = {k: t["median_s"] for k, t in timings.items()}
    stage = marginal(rows, (med["stage_small"], med["stage_big"]))
    loop = marginal(rows, (med["pool_small"], med["pool_big"]))
    with_startup = {"stage": round(rows[1] / med["stage_big"], 2), "pool": round(rows[1] / med["pool_big"], 2)}
    ours = round(rows[0] / med["ours_loop"], 2)
    return {
        "rows": rows[0], "rows_big": rows[1], "images": len(images), "repeats": repeats, "ray_cpus": cpus,
        "pool_processes": cpus,
        "rows_per_s_marginal": {"stage": stage, "careful_loop_pool": loop},
        "rows_per_s_with_startup": with_startup,
        "fixed_cost_s": {"stage": round(med["stage_small"] - rows[0] / stage, 2) if stage else None,
                         "careful_loop_pool": round(med["pool_small"] - rows[0] / loop, 2) if loop else None},
        "stage_rows_per_s": {"models_off": with_startup["stage"]},
        "loop_rows_per_s_per_core": {"careful_loop": round(loop / cpus, 2) if loop else None, "ours_loop": ours},
        "timings": timings,
        "stage_over_ours_loop_x_cpus": round(stage / (ours * cpus), 3) if stage else None,
        "startup": start, "startup_models": models,
        "ratios": {"score_stage.ray_over_loop": round(stage / loop, 3) if stage and loop else None,
                   "score_stage.ray_over_loop_with_startup": round(with_startup["stage"] / with_startup["pool"], 3),
                   "score_stage.startup_s": start["startup_s"],
                   "score_stage.startup_models_s": models["startup_s"]},
        "clock": "stage and pool: wall seconds (the stage: run_score with Ray started; the pool: map over its "
                 "started processes); ours_loop: CPU seconds of one process",
        "notes": "ray_over_loop = the stage's marginal rows/s over the careful loop's in a pool of ray_cpus "
                 "processes, both from the small and big runs (fixed costs cancel); ..._with_startup compares "
                 "rows / seconds at the big size; the demo corpus holds broken, huge and missing images on "
                 "purpose, and every row is counted",
    }
