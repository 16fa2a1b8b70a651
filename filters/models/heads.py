"""The model scorers' heads, in the layouts their published weights use, and the builders that run them.

Module and parameter names mirror the published state dicts so `load_state_dict(strict=True)`
proves a weights file matches the architecture.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM_L14 = 768


class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor v2: linear 768→1024→128→64→16→1, dropout between, no activations.

    Keys `layers.{0,2,4,6,7}.{weight,bias}`; input is the L2-normalised ViT-L/14 image embedding.
    """

    def __init__(self, dim: int = EMBED_DIM_L14) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


class LaionNsfwHead(nn.Module):
    """LAION CLIP-based NSFW detector (L/14), ported from its Keras model.

    Keras Normalization ((x - mean) / max(sqrt(variance), 1e-7)), then Dense 64→512→256→1 with ReLU
    and a sigmoid. Keys: `mean`, `variance` (buffers) and `dense{0..3}.{weight,bias}` (torch layout,
    [out, in]), as written by filters/models/convert_laion_nsfw.py. Input: L2-normalised ViT-L/14 embedding.
    """

    KERAS_EPSILON = 1e-7

    def __init__(self, dim: int = EMBED_DIM_L14) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))
        self.dense0 = nn.Linear(dim, 64)
        self.dense1 = nn.Linear(64, 512)
        self.dense2 = nn.Linear(512, 256)
        self.dense3 = nn.Linear(256, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = (embedding - self.mean) / self.variance.sqrt().clamp_min(self.KERAS_EPSILON)
        x = F.relu(self.dense0(x))
        x = F.relu(self.dense1(x))
        x = F.relu(self.dense2(x))
        return torch.sigmoid(self.dense3(x)).squeeze(-1)


def watermark_classifier() -> nn.Sequential:
    """LAION-5B watermark head replacing efficientnet_b3's classifier (keys classifier.{0,3,5})."""
    return nn.Sequential(
        nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(625, 256), nn.ReLU(),
        nn.Linear(256, 2),
    )


def build_watermark_model() -> nn.Module:
    """timm efficientnet_b3 (random init; the LAION state dict supplies every weight) with the LAION head."""
    import timm

    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = watermark_classifier()
    return model


def style_logits(image_emb: torch.Tensor, style_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Zero-shot logits: scaled cosine between L2-normalised image and per-style text embeddings."""
    return scale * F.normalize(image_emb, dim=-1) @ F.normalize(style_emb, dim=-1).T


# The builders the catalog's declarations name (`Scorer.runs`): each takes the ModelScorer that is
# being built (its options, device, towers and weight loader) and returns the Head that computes the
# scorer's columns from a batch. A new model scorer is its module (an nn.Module and its builder), its
# declaration in catalog.py and its test: ModelScorer reads neither by name.


@dataclass
class Batch:
    """One forward pass's inputs: each tower's image embedding (`embedding(tower)`), the heads' own input
    tensors by scorer name, the decoded views (open_nsfw reads them) and the captions."""

    embeddings: dict[int, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    images: list[np.ndarray]
    captions: list[str | None]

    def embedding(self, tower: object) -> torch.Tensor:
        return self.embeddings[id(tower)]


@dataclass
class Head:
    """A built scorer: `run(batch)` gives its columns; `prepare(views)`, when set, makes its own input tensor
    on the CPU side (the watermark model reads a 256x256 squash, not a tower's view)."""

    run: Callable[[Batch], dict[str, np.ndarray]]
    prepare: Callable[[list[np.ndarray]], torch.Tensor] | None = None


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


def clip_score(m: Any) -> Head:
    """Cosine of the CLIP backend's image and caption embeddings; NaN where the row has no caption."""
    image, text = m.clip_image, m.clip_text

    def run(b: Batch) -> dict[str, np.ndarray]:
        texts = text.encode_texts([c or "" for c in b.captions])
        score = _numpy((b.embedding(image) * texts).sum(-1))
        score[[c is None for c in b.captions]] = np.nan
        return {"clip_score": score}
    return Head(run)


def aesthetic(m: Any) -> Head:
    tower = m.roles["l14"]
    head = m.load(AestheticHead(tower.dim), "aesthetic")
    return Head(lambda b: {"aesthetic": _numpy(head(b.embedding(tower)))})


def nsfw(m: Any) -> Head:
    """The LAION head on the L/14 embedding, or Yahoo open_nsfw on the views (models.nsfw_backend)."""
    if m.opts.nsfw_backend == "laion":
        tower = m.roles["l14"]
        head = m.load(LaionNsfwHead(tower.dim), "laion_nsfw")
        return Head(lambda b: {"nsfw": _numpy(head(b.embedding(tower)))})
    from .open_nsfw import OpenNsfw

    model = OpenNsfw(m.device)
    return Head(lambda b: {"nsfw": model(b.images)})


WATERMARK_SIZE = 256


def watermark(m: Any) -> Head:
    """P(watermark) = softmax[0] of the LAION efficientnet_b3 on a 256x256 squash with ImageNet statistics."""
    from .images import IMAGENET_MEAN, IMAGENET_STD, batch_tensor

    model = m.load(build_watermark_model(), "watermark")

    def prepare(views: list[np.ndarray]) -> torch.Tensor:
        return batch_tensor(views, WATERMARK_SIZE, IMAGENET_MEAN, IMAGENET_STD, "squash", "bilinear")
    return Head(lambda b: {"watermark": _numpy(model(b.inputs["watermark"]).float().softmax(-1)[:, 0])},
                prepare)


def style_embeddings(text: Any, prompts: dict[str, list[str]]) -> torch.Tensor:
    """One row per style, in `prompts` order: the mean of its prompts' normalised text embeddings."""
    with torch.inference_mode():
        rows = [text.encode_texts(prompts[label]).mean(0) for label in prompts]
    return F.normalize(torch.stack(rows), dim=-1)


def style(m: Any) -> Head:
    """Zero-shot style over models.style_prompts on the CLIP backend's image and text embeddings."""
    image, labels = m.clip_image, list(m.opts.style_prompts)
    styles = style_embeddings(m.clip_text, m.opts.style_prompts)

    def run(b: Batch) -> dict[str, np.ndarray]:
        best, index = style_logits(b.embedding(image), styles).float().softmax(-1).max(-1)
        return {"style": np.array([labels[j] for j in index.tolist()], dtype=object), "style_prob": _numpy(best)}
    return Head(run)
