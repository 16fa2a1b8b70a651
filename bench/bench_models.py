"""Images per second of the model stage: each scorer alone, all together, and all but one (not a test).

    python bench/bench_models.py                # CPU: tiny towers, random weights (runs anywhere)
    python bench/bench_models.py --real-towers  # the configured ViT-L/14 and ViT-H/14 towers, random init
    python bench/bench_models.py --weights pretrained --models-dir ~/.cache/curate/models
    python bench/bench_models.py --clip-backends  # open_clip ViT-H/14 + L/14 against taiyi (L/14 only), real sizes

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


CAPTIONS = ["一只在草地上奔跑的小狗", "夕阳下的西湖断桥，游客在桥上拍照", "复古风格的木质书桌和台灯",
            "Apple MacBook Pro 笔记本电脑 银色 16英寸", "水墨画风格的山水与小船", "超市货架上摆满了各种水果和蔬菜"]


def compare_clip_backends(n: int, batch_size: int, device: str, weights: str, models_dir: str | None) -> dict:
    """clip_score + aesthetic + NSFW + style at real sizes: open_clip (ViT-H/14 beside the L/14 tower)
    against taiyi (Taiyi-CLIP's RoBERTa-large text encoder on the one L/14 pass), same images and captions.

    open_clip runs `ViT-H-14` with its bundled-tokenizer text tower (the zh default's XLM-R text tower needs
    a hub tokenizer): the image tower is the default's, its text tower is smaller than XLM-R large.
    """
    enabled = ["clip_score", "aesthetic", "nsfw", "style"]
    images = _images(n)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    common = dict(enabled=enabled, weights=weights, models_dir=models_dir, batch_size=batch_size, nsfw_backend="laion")
    contenders = {
        "open_clip ViT-H-14 + ViT-L-14": ModelOptions(clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k",
                                                      **common),
        "taiyi (ViT-L-14 only)": ModelOptions(clip_backend="taiyi", **common),
    }
    rates = {label: round(_rate(opts, images, captions, device), 3) for label, opts in contenders.items()}
    first, second = rates.values()
    return {"enabled": enabled, "images": n, "batch_size": batch_size, "images_per_s": rates,
            "taiyi_speedup": round(second / first, 2)}


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), measure, print the JSON and return it (bench/run.py calls this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per measurement (default 32 CPU, 1024 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weights", choices=["random", "pretrained"], default="random")
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--real-towers", action="store_true", help="ViT-L/14 + ViT-H/14 even on CPU")
    parser.add_argument("--clip-model", default=None, help="override the CLIP tower (default: the configured one)")
    parser.add_argument("--clip-backends", action="store_true",
                        help="only compare open_clip ViT-H/14 + L/14 with taiyi (L/14 only), at real sizes")
    parser.add_argument("--only", nargs="+", default=None, metavar="CONFIG",
                        help="measure only these configurations (e.g. open_nsfw; default: every one)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if args.clip_backends:
        report = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
                  "weights": args.weights, **compare_clip_backends(
                      args.images or (512 if cuda else 16), args.batch_size or (128 if cuda else 8), device,
                      args.weights, args.models_dir)}
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return report
    real = args.real_towers or cuda
    n = args.images or (1024 if cuda else 32)
    base = dict(weights=args.weights, models_dir=args.models_dir, batch_size=args.batch_size or (256 if cuda else 16),
                nsfw_backend="laion")
    if args.clip_model:
        base["clip_model"] = args.clip_model
    elif real:
        # bundled tokenizer; same image tower as the zh default
        base.update(clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k")
    if not real:
        tiny = _tiny_tower()
        base.update(clip_model=tiny, clip_pretrained="", l14_model=tiny, l14_pretrained="")

    images, captions = _images(n), ["一只在草地上奔跑的小狗"] * n
    configs = {name: [name] for name in SCORERS}
    configs["open_nsfw"] = ["nsfw"]
    configs["all"] = list(SCORERS)
    configs.update({f"all_without_{name}": [s for s in SCORERS if s != name] for name in SCORERS})
    if args.only:
        unknown = sorted(set(args.only) - set(configs))
        if unknown:
            parser.error(f"--only: unknown configuration(s) {unknown}; known: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.only}
    results = {}
    for label, enabled in configs.items():
        backend = {"nsfw_backend": "open_nsfw"} if label == "open_nsfw" else {}
        opts = ModelOptions(enabled=enabled, **{**base, **backend})
        results[label] = round(_rate(opts, images, captions, device), 2)
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "weights": args.weights, "clip_tower": base.get("clip_model"),
        "l14_tower": base.get("l14_model", "ViT-L-14-quickgelu"),
        "batch_size": base["batch_size"], "images": n, "images_per_s": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
