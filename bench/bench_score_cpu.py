"""CPU part of score: images/s per core of decode + every CPU metric, against the alternatives.

Contenders, each in one process on one core, on the same JPEGs (512-1024 px) and captions:
- ours: `curate.phases.score.phase.score_cpu` (one decode per image, JPEG draft) plus the image size read
  from the header (the download phase records it in the pipeline);
- careful_loop: the loop a competent user would write with our metric functions: one full
  PIL decode per image, then every metric of ours on that one image (gray thumbnail, every
  pHash view, entropy, edges, bpp, graphic score, aspect ratio) and the caption metrics.
  It differs from ours only in decoding at full size (no JPEG draft) and in running outside
  the pipeline's batch code; it is the per-core baseline of bench_score_stage too;
- Data-Juicer: `py-data-juicer` in its own venv (bench/.venv-dj, installed on first use),
  np=1 (one core, like the others), use_cache=false (repeats must do the work), running the
  closest ops it has to ours (DJ_OPS); its fixed cost (imports, dataset set-up) is excluded
  by timing a run on half the images and one on all of them and taking the difference.
  What still differs is listed in the JSON's `not_like_for_like`.
sha256 of the bytes comes from our download phase; every contender hashes the bytes here,
so all of them pay for it.
The clock is the process's CPU time: per-core throughput of single-process work, and far less
sensitive than wall time to the other jobs of a shared machine.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import ROOT, cpu_timer, photos, rate, side_by_side, summary
from curate import config as config_mod
from curate.phases.score.phase import score_cpu
from filters.graphic import graphic_score
from filters.image import METRIC_SIDE, decode, edge_density, entropy, to_rgb
from filters.multihash import VIEWS, view_hashes
from filters.text import caption_columns

SIZES = {"smoke": 8, "quick": 120, "full": 600}
DJ_VENV = ROOT / "bench" / ".venv-dj"
DJ_PACKAGES = ["py-data-juicer==1.6.1", "aiohttp", "imagededup"]
# The closest Data-Juicer has to our metrics: image size/shape/aspect ratio, a perceptual-hash
# dedup, and three pure-Python caption metrics (length, repetition, special characters).
DJ_OPS = ["image_shape_filter", "image_aspect_ratio_filter", "image_size_filter", "image_deduplicator",
          "text_length_filter", "character_repetition_filter", "special_characters_filter"]
NOT_LIKE_FOR_LIKE = [
    "Data-Juicer loads its input from jsonl and exports jsonl on every run (inside executor.run()); "
    "ours is handed the bytes in memory and returns an Arrow table",
    "Data-Juicer's image_deduplicator computes one pHash per image (imagededup) and deduplicates; "
    "ours computes 12 pHash views (whole, mirror, 5 windows at 2 sizes) and leaves dedup to the decide phase",
    "Data-Juicer has no entropy, edge-density, JPEG bits-per-pixel or graphic (photo/drawn) metric: "
    "ours computes them, Data-Juicer does not (its figure does less work)",
    "caption metrics differ: Data-Juicer's text length, character repetition and special characters "
    "against our normalisation, length, script shares, junk and repetition checks and segmentation",
    "Data-Juicer's filters drop rows that fail their defaults; these images and captions pass them all, "
    "so every op sees every row",
    "Data-Juicer decodes each image in each image op (its per-op loading); ours decodes once",
]

# Runs inside Data-Juicer's venv: a warm-up (imports, op set-up), then per repeat a timed run on
# half the rows and one on all rows; the difference is its cost for half the rows, fixed cost excluded.
DJ_DRIVER = """
import hashlib, json, os, sys, time
from data_juicer.config import init_configs
from data_juicer.core import DefaultExecutor
small, full, paths, repeats = sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read()), int(sys.argv[4])

def cpu():  # this process and its reaped children: Data-Juicer maps in worker processes even with np=1
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

def timed(config, hashed):
    executor = DefaultExecutor(init_configs(args=["--config", config]))
    start, wall = cpu(), time.perf_counter()
    executor.run()
    for p in hashed:
        hashlib.sha256(open(p, "rb").read()).hexdigest()
    print("DJ_WALL", time.perf_counter() - wall, file=sys.stderr)
    return cpu() - start

half = paths[:len(paths) // 2]
timed(small, half)
pairs = [(timed(small, half), timed(full, paths)) for _ in range(repeats)]
print("DJ_SECONDS", json.dumps(pairs), file=sys.stderr)
"""


def _config() -> config_mod.Config:
    return config_mod.validate({"run_dir": "/nonexistent", "input": {"paths": ["/nonexistent"]}})


def ours(images: list[bytes], captions: list[str], cfg: config_mod.Config) -> float:
    """The pipeline's CPU stage on one batch, plus the header sizes and sha256; CPU seconds."""
    elapsed = cpu_timer()
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    batch = {"key": np.array([str(i) for i in range(len(images))], dtype=object),
             "shard": np.array(["00000"] * len(images), dtype=object),
             "caption": np.array(captions, dtype=object), "status": np.array(["success"] * len(images), dtype=object),
             "original_width": np.array([w for w, _ in sizes]), "original_height": np.array([h for _, h in sizes]),
             "_image": np.array(images, dtype=object),
             "_shard_error": np.array([""] * len(images), dtype=object)}
    score_cpu(batch, cfg, model_side=None)
    for b in images:
        hashlib.sha256(b).hexdigest()
    return elapsed()


def captions_only(captions: list[str], cfg: config_mod.Config) -> float:
    """The caption scorer alone (normalise, metrics, segmentation): it must not be the bottleneck."""
    elapsed = cpu_timer()
    caption_columns(captions, cfg.text)
    return elapsed()


def careful_loop(images: list[bytes], captions: list[str], cfg: config_mod.Config) -> float:
    """One full decode per image, then every metric of ours on it; sha256 and captions too; CPU seconds."""
    elapsed = cpu_timer()
    rows = []
    for data in images:
        try:   # a bad image is that row's error, as in the pipeline
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.download.max_pixels:
                raise ValueError(f"image claims {w}x{h} pixels, over the limit")
            rgb = to_rgb(img)   # full decode, once
            gray_img = rgb.convert("L")
            gray_img.thumbnail((METRIC_SIDE, METRIC_SIDE), Image.BILINEAR)
            gray = np.asarray(gray_img)
            hashes = view_hashes(gray)
            rows.append({"aspect_ratio": max(w, h) / min(w, h), "entropy": entropy(gray),
                         "edge_density": edge_density(gray), "jpeg_bpp": 8.0 * len(data) / (w * h),
                         "phash": int(hashes[0]), "phash_views": hashes[1:].tolist(),
                         "graphic": graphic_score(rgb, gray), "sha256": hashlib.sha256(data).hexdigest()})
        except Exception as exc:
            rows.append({"score_error": f"decode error: {exc}"})
    caption_columns(captions, cfg.text)
    return elapsed()


def view_hash_cost(images: list[bytes], cfg: config_mod.Config, repeats: int) -> dict:
    """CPU seconds of hashing the score stage's gray thumbnails with every view and with the whole
    image alone (medians over `repeats`): their difference is what the extra views cost."""
    grays = []
    for data in images:
        rgb, _ = decode(data, cfg.score.decode_size, cfg.download.max_pixels)
        gray = rgb.convert("L")
        gray.thumbnail((METRIC_SIDE, METRIC_SIDE), Image.BILINEAR)
        grays.append(np.asarray(gray))

    def hashing(views) -> float:
        elapsed = cpu_timer()
        for gray in grays:
            view_hashes(gray, views)
        return elapsed()

    return side_by_side({"every_view": lambda: hashing(VIEWS), "whole_only": lambda: hashing(VIEWS[:1])},
                        repeats, warm=None)


def data_juicer_python() -> Path:
    """Data-Juicer's own venv (so its dependencies never touch ours), created on first use."""
    python = DJ_VENV / "bin" / "python"
    probe = [str(python), "-c", "import data_juicer, imagededup, aiohttp"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(DJ_VENV)], check=True, capture_output=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *DJ_PACKAGES],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip install {' '.join(DJ_PACKAGES)} failed: {done.stderr.strip()[-800:]}")
    return python


def _dj_config(root: Path, name: str, paths: list[Path], captions: list[str]) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": c, "images": [str(p)]}, ensure_ascii=False) + "\n"
                            for p, c in zip(paths, captions)), encoding="utf-8")
    config = root / f"{name}.yaml"
    ops = "".join(f"  - {op}: {{}}\n" for op in DJ_OPS)
    config.write_text(f"project_name: bench\ndataset_path: {data}\nexport_path: {root / name}-out/out.jsonl\n"
                      f"np: 1\nuse_cache: false\nprocess:\n{ops}", encoding="utf-8")
    return config


def data_juicer(python: Path, root: Path, paths: list[Path], captions: list[str], repeats: int) -> dict:
    """Data-Juicer's repeats in one process (its import alone takes tens of seconds here).

    Each repeat's figure is the all-rows run's CPU seconds less those of the half-rows run (its
    fixed cost per job cancels), scaled to all rows; both raw figures are kept.
    """
    half = len(paths) // 2
    small = _dj_config(root, "half", paths[:half], captions[:half])
    full = _dj_config(root, "full", paths, captions)
    (root / "paths.json").write_text(json.dumps([str(p) for p in paths]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(python), "-c", DJ_DRIVER, str(small), str(full), str(root / "paths.json"),
                           str(repeats)], cwd=root, capture_output=True, text=True, env=env)
    for line in done.stderr.splitlines():
        if line.startswith("DJ_SECONDS"):
            pairs = json.loads(line.split(" ", 1)[1])
            per_repeat = [(f - s) * len(paths) / (len(paths) - half) for s, f in pairs]
            walls = [float(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("DJ_WALL")]
            return {**summary(per_repeat), "runs_half_rows_s": [round(s, 3) for s, _ in pairs],
                    "runs_all_rows_s": [round(f, 3) for _, f in pairs],
                    "wall_s_half_and_all_rows": [round(w, 3) for w in walls[1:]]}
    raise RuntimeError(f"Data-Juicer exited {done.returncode}: {done.stderr.strip()[-800:]}")


def run(mode: str) -> dict:
    """All three contenders side by side; Data-Juicer is replaced by its error if it cannot run here."""
    n = SIZES[mode]
    repeats = 1 if mode == "smoke" else 3
    cfg = _config()
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        root = Path(tmp)
        paths = photos(root / "images", n, 512, 1024, seed=1)
        images = [p.read_bytes() for p in paths]
        captions = [f"一只在草地上奔跑的小狗，高清摄影 {i}" for i in range(n)]
        contenders = {"ours": lambda: ours(images, captions, cfg),
                      "careful_loop": lambda: careful_loop(images, captions, cfg),
                      "captions_only": lambda: captions_only(captions, cfg)}
        timings = side_by_side(contenders, repeats, warm=() if mode == "smoke" else None)
        hash_cost = view_hash_cost(images, cfg, repeats)
        dj_error = None
        try:
            if mode == "smoke":
                raise RuntimeError("not run in the smoke test: one Data-Juicer process takes about a minute")
            timings["data_juicer"] = data_juicer(data_juicer_python(), root, paths, captions, repeats)
        except Exception as exc:  # recorded in the JSON instead of a figure
            dj_error = f"{type(exc).__name__}: {exc}"[:1200]
    per_core = {name: rate(n, t) for name, t in timings.items()}
    captions_per_core = per_core.pop("captions_only")
    extra = hash_cost["every_view"]["median_s"] - hash_cost["whole_only"]["median_s"]
    ratios = {"score_cpu.ours_over_careful_loop": round(per_core["ours"] / per_core["careful_loop"], 3),
              "score_cpu.view_hashes_overhead": round(extra / (timings["ours"]["median_s"] - extra), 4),
              "score_cpu.ours_over_data_juicer": (round(per_core["ours"] / per_core["data_juicer"], 3)
                                                  if "data_juicer" in per_core else None)}
    return {
        "sizes": {"images": n, "sides_px": [512, 1024], "repeats": repeats, "cores_per_contender": 1},
        "timings": timings,
        "images_per_s_per_core": per_core,
        "captions_per_s_per_core": captions_per_core,
        "view_hashes": {"views": len(VIEWS), "cpu_s": hash_cost,
                        "overhead": "extra views' CPU time over ours without them (ours less that time)"},
        "captions_over_ours_images": round(captions_per_core / per_core["ours"], 2),
        "careful_loop": "one full PIL decode per image, then every metric of ours on it: it differs from ours "
                        "only in the decode (full size; ours uses JPEG draft at score.decode_size)",
        "data_juicer": {"ops": DJ_OPS, "settings": {"np": 1, "use_cache": False}, "packages": DJ_PACKAGES,
                        "fixed_cost": "excluded: CPU time of a run on all rows less that of a run on half of them",
                        "error": dj_error},
        "not_like_for_like": {"data_juicer": NOT_LIKE_FOR_LIKE},
        "ratios": ratios,
        "clock": "CPU time of the process (Data-Juicer: plus its reaped worker processes)",
        "notes": "one process each, one core; sha256 of the bytes hashed by every contender; ours and the "
                 "careful loop take turns each repeat after a warm-up; Data-Juicer's repeats run in one "
                 "process after them (its import alone takes tens of seconds)",
    }
