"""score_gpu: the pipeline's model stage against the models alone, on the same batches, on one GPU.

The production towers (the zh_web preset's models: OpenAI ViT-L/14 for the aesthetic and NSFW
heads and, with clip_backend taiyi, for clip_score and style beside Taiyi-CLIP's RoBERTa-large
text encoder; the watermark EfficientNet-B3) are built with random weights in the preset's dtype
(auto: bf16 where the GPU has it). The same JPEGs (512-1024 px photos) go once, untimed, through
the real CPU stage (`curate.phases.score.phase.score_cpu`), which gives the Arrow batches the model actors get.
Then, taking turns on those batches:

- pipeline: `curate.phases.score.phase.ModelStage` itself (Arrow views -> numpy, CPU preprocessing, copy to
  the GPU, every tower and head, Arrow out), as the actor pool runs it;
- pipeline_gpu_decode: the same stage with models.gpu_decode (JPEG bytes decoded by nvJPEG);
- model_alone: `ModelScorer.forward` on inputs prepared and copied to the GPU beforehand: every
  tower and head's forward pass and nothing else (the captions' tokenisation, small, in both).

`score_gpu.pipeline_over_model_alone` = pipeline images/s over model_alone images/s (goal >= 0.8).
Also the CPU stage's images/s per core on the same images, on this machine's CPUs, so the JSON says
how many cores keep one GPU fed: `score_gpu.cores_per_gpu` (goal: at most the machine's cores per GPU).
Without CUDA the JSON says "not run: no CUDA" and carries no rate (null ratios); the smoke mode then runs
the same functions on CPU with a small tower (ViT-B-32, fp32) under `cpu_check`, never as a GPU figure.

    make bench-gpu        # installs the project, runs this through bench/run.py, records the table
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import ROOT, cpu_timer, photos

SIZES = {"smoke": (4, 2), "quick": (1024, 128), "full": (4096, 128)}   # images, batch size
REPEATS = {"smoke": 1, "quick": 3, "full": 5}
NOT_RUN = "not run: no CUDA (torch.cuda.is_available() is False on this machine)"


def production_models(batch_size: int):
    """The zh_web preset's model options less OCR (its own CPU actor pool), with random weights."""
    from curate.config import load

    models = load(ROOT / "jobs" / "zh_web.yaml").models
    enabled = [s for s in models.enabled if s != "ocr"]
    return models.model_copy(update={"enabled": enabled, "weights": "random", "batch_size": batch_size})


def tiny_models(batch_size: int):
    """Small stand-ins for the CPU check: ViT-B-32 as both towers, open_clip's bundled tokenizer."""
    from filters.models import ModelOptions

    return ModelOptions(enabled=["clip_score", "aesthetic", "nsfw", "watermark", "style"], weights="random",
                        clip_backend="open_clip", clip_model="ViT-B-32", l14_model="ViT-B-32",
                        l14_pretrained="frozen_laion5b_s13b_b90k", batch_size=batch_size)   # one shared tower


def cpu_batches(models, images: int, batch_size: int, folder: Path) -> tuple[list[pa.Table], float]:
    """JPEGs through the real CPU stage, in the model stage's batch size: the model actors' input
    (with `_view` and, for gpu_decode, `_image`). Returns the batches and the stage's images/s per core."""
    from curate.config import validate
    from curate.phases.score.phase import score_cpu

    cfg = validate({"run_dir": str(folder), "input": {"paths": ["x.parquet"]}, "models": models.model_dump()})
    paths = photos(folder, images, 512, 1024)
    data = [p.read_bytes() for p in paths]
    captions = [f"一张照片，第{i}张，风景与城市" for i in range(images)]
    batches, clock = [], cpu_timer()
    for start in range(0, images, batch_size):
        chunk = range(start, min(images, start + batch_size))
        raw = {"key": np.array([f"00000_{i:06d}" for i in chunk], dtype=object),
               "shard": np.array(["00000"] * len(chunk), dtype=object),
               "caption": np.array([captions[i] for i in chunk], dtype=object),
               "status": np.array(["success"] * len(chunk), dtype=object),
               "original_width": np.zeros(len(chunk)), "original_height": np.zeros(len(chunk)),
               "_image": np.array([data[i] for i in chunk] + [None], dtype=object)[:-1],
               "_shard_error": np.array([""] * len(chunk), dtype=object)}
        batches.append(score_cpu(raw, cfg, models.image_size, keep_image=True))
    seconds = clock()
    return batches, round(images / seconds, 2)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(models, images: int, batch_size: int, repeats: int, device: str, folder: Path,
            warm: bool = True) -> dict:
    """Pipeline stage (views, and gpu_decode) and the models alone on the same batches, taking turns."""
    import torch

    from bench.common import side_by_side
    from curate.config import validate
    from curate.phases.score.phase import ModelStage
    from filters.models.images import decode_views
    from filters.models.scorer import _autocast_dtype

    build = time.perf_counter()
    batches, cpu_per_core = cpu_batches(models, images, batch_size, folder)
    cfg = validate({"run_dir": str(folder), "input": {"paths": ["x.parquet"]}, "models": models.model_dump()})
    decode_cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"gpu_decode": True})})
    stage = ModelStage(cfg, device=device)
    decoding = ModelStage(decode_cfg, device=device, scorer=stage.scorer)   # one copy of the towers
    scorer = stage.scorer
    views = [stage.views(b) for b in batches]
    captions = [b.column("caption_norm").to_pylist() for b in batches]
    prepared = [scorer.prepare(v) for v in views]
    without_views = [b.drop_columns(["_view"]) for b in batches]
    build_s = time.perf_counter() - build
    outputs: dict[str, list] = {}

    def pipeline() -> float:
        _sync(device)
        start = time.perf_counter()
        outputs["pipeline"] = [stage(b) for b in batches]
        _sync(device)
        return time.perf_counter() - start

    def pipeline_gpu_decode() -> float:
        _sync(device)
        start = time.perf_counter()
        outputs["pipeline_gpu_decode"] = [decoding(b) for b in without_views]
        _sync(device)
        return time.perf_counter() - start

    def model_alone() -> float:
        _sync(device)
        start = time.perf_counter()
        outputs["model_alone"] = [scorer.forward(x, v, c) for x, v, c in zip(prepared, views, captions)]
        _sync(device)
        return time.perf_counter() - start

    def decode_alone() -> float:
        _sync(device)
        start = time.perf_counter()
        for b in without_views:
            decode_views(b.column("_image").to_pylist(), models.image_size, device, cfg.download.max_pixels)
        _sync(device)
        return time.perf_counter() - start

    timings = side_by_side({"pipeline": pipeline, "pipeline_gpu_decode": pipeline_gpu_decode,
                            "model_alone": model_alone, "gpu_decode_alone": decode_alone}, repeats,
                           warm=None if warm else ())
    for name in ("pipeline", "pipeline_gpu_decode"):
        failed = [t for t in outputs[name] if "_shard_error" in t.column_names and t.column("_shard_error")[0].as_py()]
        if failed or any("aesthetic" not in t.column_names for t in outputs[name]):
            why = failed[0].column('_shard_error')[0] if failed else 'no scores'
            raise RuntimeError(f"{name}: a batch failed: {why}")
    rates = {name: round(images / t["median_s"], 2) for name, t in timings.items()}
    dtype = _autocast_dtype(models, device)
    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "dtype": str(dtype).replace("torch.", "") if dtype else "fp32",
        "models": {"enabled": models.enabled, "clip_backend": models.clip_backend, "l14_model": models.l14_model,
                   "towers": [getattr(t, "name", type(t).__name__) for t in scorer._towers]},
        "images": images, "batch_size": batch_size, "repeats": repeats, "build_s": round(build_s, 1),
        "timing": timings, "images_per_s_per_gpu": rates,
        "cpu_stage_images_per_s_per_core": cpu_per_core,
        "cpu_cores_to_feed_one_gpu": round(rates["pipeline"] / cpu_per_core, 1),
        "pipeline_over_model_alone": round(rates["pipeline"] / rates["model_alone"], 3),
        "gpu_decode_pipeline_over_model_alone": round(rates["pipeline_gpu_decode"] / rates["model_alone"], 3),
    }


def run(mode: str) -> dict:
    """bench/run.py's entry: the measurement on CUDA; elsewhere the reason (and, in smoke, the CPU check)."""
    import torch

    images, batch_size = SIZES[mode]
    notes = ("model_alone: every tower and head's forward pass on inputs already on the GPU; pipeline: "
             "curate.phases.score.phase.ModelStage on the CPU stage's Arrow batches (the actor's work, Ray's "
             "scheduling not included); both tokenise the captions; random weights (speed does not depend on them)")
    if not torch.cuda.is_available():
        result: dict = {"error": NOT_RUN, "notes": notes,
                        "ratios": {"score_gpu.pipeline_over_model_alone": None, "score_gpu.cores_per_gpu": None}}
        if mode == "smoke":
            with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
                result["cpu_check"] = {
                    "what": "the benchmark's functions on CPU at a tiny size (ViT-B-32, fp32): not a GPU figure",
                    **measure(tiny_models(batch_size), images, batch_size, REPEATS[mode], "cpu", Path(tmp), warm=False)}
        return result
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        figures = measure(production_models(batch_size), images, batch_size, REPEATS[mode], "cuda", Path(tmp))
    goal = round((os.cpu_count() or 1) / torch.cuda.device_count(), 1)
    return {**figures, "notes": notes, "cores_per_gpu_goal": goal,
            "cores_per_gpu": "the model stage's images/s per GPU over the CPU stage's images/s per core, both "
                             f"measured on this machine; goal: at most its cores per GPU ({goal})",
            "ratios": {"score_gpu.pipeline_over_model_alone": figures["pipeline_over_model_alone"],
                       "score_gpu.cores_per_gpu": figures["cpu_cores_to_feed_one_gpu"],
                       "score_gpu.gpu_decode_pipeline_over_model_alone":
                           figures["gpu_decode_pipeline_over_model_alone"]}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(SIZES), default="quick")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print(json.dumps(run(parser.parse_args().mode), indent=2, default=str))
