"""Images per second of the model stage: each scorer alone, all together, and all but one (not a test).

    python bench/bench_models.py                # CPU: tiny towers, random weights (runs anywhere)
    python bench/bench_models.py --real-towers  # the configured ViT-L/14 and ViT-H/14 towers, random init
    python bench/bench_models.py --weights pretrained --models-dir ~/.cache/curate/models

On CUDA the default is --real-towers; the figures are per GPU (one ModelScorer on one device).
Prints one JSON object: device, towers, batch size and images/s per configuration.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from filters.models import SCORERS, ModelOptions, ModelScorer

TINY = {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 2, "width": 256, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2}}


def _tiny_tower() -> str:
    """Register a small ViT (bundled tokenizer) so CPU runs finish; the heads and watermark net are real size."""
    import open_clip

    root = Path(tempfile.mkdtemp(prefix="bench_oc_"))
    (root / "bench-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(root)
    return "bench-tiny"


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (256, int(rng.integers(256, 400)), 3), dtype=np.uint8) for _ in range(n)]


def _rate(opts: ModelOptions, images: list[np.ndarray], captions: list[str], device: str) -> float:
    scorer = ModelScorer(opts, device=device)
    scorer(images[: opts.batch_size], captions[: opts.batch_size])  # warm-up: allocations, cuDNN autotune
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    scorer(images, captions)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), measure, print the JSON and return it (bench/run.py calls this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per measurement (default 32 CPU, 1024 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weights", choices=["random", "pretrained"], default="random")
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--real-towers", action="store_true", help="ViT-L/14 + ViT-H/14 even on CPU")
    parser.add_argument("--clip-model", default=None, help="override the CLIP tower (default: the configured one)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    real = args.real_towers or cuda
    n = args.images or (1024 if cuda else 32)
    base = dict(weights=args.weights, models_dir=args.models_dir, batch_size=args.batch_size or (256 if cuda else 16),
                nsfw_backend="laion")
    if args.clip_model:
        base["clip_model"] = args.clip_model
    elif real:
        base.update(clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k")  # bundled tokenizer; same image tower as the zh default
    if not real:
        tiny = _tiny_tower()
        base.update(clip_model=tiny, clip_pretrained="", l14_model=tiny, l14_pretrained="")

    images, captions = _images(n), ["一只在草地上奔跑的小狗"] * n
    configs = {name: [name] for name in SCORERS}
    configs["open_nsfw"] = ["nsfw"]
    configs["all"] = list(SCORERS)
    configs.update({f"all_without_{name}": [s for s in SCORERS if s != name] for name in SCORERS})
    results = {}
    for label, enabled in configs.items():
        opts = ModelOptions(enabled=enabled, **{**base, **({"nsfw_backend": "open_nsfw"} if label == "open_nsfw" else {})})
        results[label] = round(_rate(opts, images, captions, device), 2)
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "weights": args.weights, "clip_tower": base.get("clip_model"), "l14_tower": base.get("l14_model", "ViT-L-14-quickgelu"),
        "batch_size": base["batch_size"], "images": n, "images_per_s": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
