"""recaption: images per second per GPU of the recaption engine, Qwen2-VL-2B-Instruct at its real size.

The model is built with random weights at Qwen2-VL-2B-Instruct's published architecture
(filters/models/recaption.py QWEN2_VL_2B) in the engine's dtype (auto: bf16 where the GPU has it);
speed does not depend on the weights. Random weights stop at no particular token, so every caption
is exactly TOKENS new tokens (min_new_tokens = max_new_tokens): about the length of a dense Chinese
caption (~150 characters). Photos of 512-1024 px go in at recaption.image_side (448: at most 256
image tokens each). Taking turns, per batch size:

- engine: `TransformersEngine.generate` as a recaption actor calls it on decoded images (the processor's
  resize and patching, the chat template, the copy to the GPU, generate, decoding);
- generate_alone: `model.generate` on inputs already prepared and on the GPU.

`recaption.engine_over_generate_alone` = engine images/s over generate_alone images/s at the best batch
size; `recaption.images_per_s_per_gpu` the engine's best rate, and `recaption.gpu_hours_per_100m` what
100M kept rows cost at it (docs/scale.md). Without CUDA the JSON says "not run: no CUDA" and carries no
rate; the smoke mode then runs the same functions on CPU with the tiny random model under `cpu_check`,
never as a GPU figure.

    make bench-recaption   # beside bench-gpu: installs the project, runs this through bench/run.py
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import photos, rate, side_by_side

SIZES = {"smoke": (4, (2,)), "quick": (64, (8, 16, 32)), "full": (256, (8, 16, 32, 64))}   # images, batch sizes
REPEATS = {"smoke": 1, "quick": 2, "full": 3}
TOKENS = {"smoke": 4, "quick": 128, "full": 128}
NOT_RUN = "not run: no CUDA (torch.cuda.is_available() is False on this machine)"
RATIOS = ("recaption.engine_over_generate_alone", "recaption.images_per_s_per_gpu", "recaption.gpu_hours_per_100m")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def engine_seconds(engine, chunks: list, device: str) -> float:
    """Every chunk through the engine, as a recaption actor calls it."""
    start = time.perf_counter()
    for images, prompts in chunks:
        engine.generate(images, prompts)
    _sync(device)
    return time.perf_counter() - start


def alone_seconds(model, processor, prepared: list, tokens: int, device: str) -> float:
    """model.generate alone on the prepared inputs."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for inputs in prepared:
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
    _sync(device)
    return time.perf_counter() - start


def measure(size: str, images: int, batch_sizes: tuple[int, ...], repeats: int, tokens: int, device: str,
            folder: Path) -> dict:
    """Both contenders at each batch size on the same decoded images; rates, timings and the best batch."""
    import torch
    from PIL import Image

    from filters.models.recaption import RecaptionOptions, TransformersEngine, random_parts, torch_dtype

    opts = RecaptionOptions(enabled=True, max_new_tokens=tokens)
    dtype = torch_dtype(opts.dtype, device)
    started = time.perf_counter()
    processor, model = random_parts(folder / "tokenizer", size, device=device, dtype=dtype)
    engine = TransformersEngine(processor, model, opts, device, min_new_tokens=tokens)
    build_s = time.perf_counter() - started
    pictures = [Image.open(p).convert("RGB") for p in photos(folder / "photos", images, 512, 1024)]
    prompts = [opts.prompt] * images
    per_batch = {}
    for bs in batch_sizes:
        chunks = [(pictures[i:i + bs], prompts[i:i + bs]) for i in range(0, images, bs)]
        prepared = [engine.inputs(ims, ps) for ims, ps in chunks]
        timing = side_by_side({"engine": partial(engine_seconds, engine, chunks, device),
                               "generate_alone": partial(alone_seconds, model, processor, prepared, tokens, device)},
                              repeats)
        per_batch[str(bs)] = {"timing": timing, "images_per_s": {k: rate(images, t) for k, t in timing.items()}}
    best = max(per_batch, key=lambda b: per_batch[b]["images_per_s"]["engine"])
    rates = per_batch[best]["images_per_s"]
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "model": size,
            "parameters": sum(p.numel() for p in model.parameters()), "images": images, "tokens_per_caption": tokens,
            "image_side": opts.image_side, "repeats": repeats, "build_s": round(build_s, 1),
            "per_batch_size": per_batch, "best_batch_size": int(best), "images_per_s_per_gpu": rates["engine"],
            "engine_over_generate_alone": round(rates["engine"] / rates["generate_alone"], 3),
            "gpu_hours_per_100m": round(1e8 / rates["engine"] / 3600, 1)}


def run(mode: str) -> dict:
    """bench/run.py's entry: the measurement on CUDA; elsewhere the reason (and, in smoke, the CPU check)."""
    import torch

    images, batch_sizes = SIZES[mode]
    notes = ("random weights at Qwen2-VL-2B-Instruct's architecture, every caption exactly tokens_per_caption "
             "tokens; engine: TransformersEngine.generate on decoded images; generate_alone: model.generate on "
             "inputs already on the GPU; reading the raw tars and Ray's scheduling are not included")
    if not torch.cuda.is_available():
        result: dict = {"error": NOT_RUN, "notes": notes, "ratios": dict.fromkeys(RATIOS)}
        if mode == "smoke":
            with tempfile.TemporaryDirectory(prefix="bench_recaption_") as tmp:
                result["cpu_check"] = {
                    "what": "the benchmark's functions on CPU with the tiny random model: not a GPU figure",
                    **measure("tiny", images, batch_sizes, REPEATS[mode], TOKENS[mode], "cpu", Path(tmp))}
        return result
    with tempfile.TemporaryDirectory(prefix="bench_recaption_") as tmp:
        figures = measure("qwen2-vl-2b", images, batch_sizes, REPEATS[mode], TOKENS[mode], "cuda", Path(tmp))
    return {**figures, "notes": notes,
            "ratios": {k: figures[k.split(".", 1)[1]] for k in RATIOS}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(SIZES), default="quick")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print(json.dumps(run(parser.parse_args().mode), indent=2, default=str))
