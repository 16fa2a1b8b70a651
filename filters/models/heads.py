"""Small heads that read a tower's image embedding, in the layouts their published weights use.

Module and parameter names mirror the published state dicts so `load_state_dict(strict=True)`
proves a weights file matches the architecture.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

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
