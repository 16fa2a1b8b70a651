"""Chinese-CLIP (OFA-Sys, the cn-clip package): image and text towers of one published size.

The architecture is cn_clip's own `CLIP` class, built from the configs its wheel ships
(`clip/model_configs/{vision}.json` + `{text}.json`), so the published checkpoints load with their
own keys (`visual.*`, `bert.*`, `text_projection`, `logit_scale`). The checkpoint is cn_clip's
training file: `{"state_dict": {"module.<key>": tensor}, "epoch", "step", ...}`, read with
`torch.load(weights_only=True)`; `bert.pooler` (unused, absent from the model) is dropped as cn_clip does.
Images are squashed to the model's resolution (bicubic) with OpenAI's CLIP mean/std, as
`cn_clip.clip.image_transform` does; text is the [CLS] state times `text_projection`, with [PAD] masked.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import published
from .images import batch_tensor
from .tokenize import ChineseTokenizer


def model_info(size: str) -> dict:
    """cn_clip's CLIP(**info) arguments for a published size, from the configs shipped in its wheel."""
    spec = published.CHINESE_CLIP[size]
    configs = resources.files("cn_clip.clip").joinpath("model_configs")
    info: dict = {}
    for name in (spec.vision, spec.text):
        info.update(json.loads(configs.joinpath(f"{name}.json").read_text(encoding="utf-8")))
    if isinstance(info["vision_layers"], str):  # RN50: "[3,4,6,3]"
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a published checkpoint (module. prefix stripped, bert.pooler dropped)."""
    from filters.models.weights import load_state_dict

    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}


class ChineseClipTower:
    """One Chinese-CLIP model on one device; L2-normalised float32 embeddings of images and captions."""

    def __init__(self, size: str, vocab: str | Path, device: str, weights: str | Path | None,
                 info: dict | None = None) -> None:
        from cn_clip.clip.model import CLIP

        info = info or model_info(size)
        self.name = f"chinese_clip:{size}/{'random' if weights is None else Path(weights).name}"
        self.model = CLIP(**info)
        if weights is not None:
            self.model.load_state_dict(checkpoint_state(weights), strict=True)
        self.model.to(device).eval()
        self.device = device
        self.image_size = int(info["image_resolution"])
        self.dim = int(info["embed_dim"])
        self.tokenizer = ChineseTokenizer(vocab, published.CHINESE_CLIP_CONTEXT)

    def images_to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return batch_tensor(images, self.image_size, published.OPENAI_CLIP_MEAN, published.OPENAI_CLIP_STD,
                            "squash", "bicubic")

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's forward pass on a batch already on the device."""
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.encode_tensor(self.images_to_tensor(images).to(self.device, non_blocking=True))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(texts)
        hidden = self.model.bert(ids.to(self.device), attention_mask=mask.to(self.device))[0]
        return F.normalize((hidden[:, 0, :] @ self.model.text_projection).float(), dim=-1)
