"""open_clip towers: image (and text) encoders whose embeddings every head reads."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .images import batch_tensor


class Tower:
    """One open_clip model, built once per actor; returns L2-normalised float32 embeddings.

    `pretrained` is an open_clip tag or a local checkpoint file (ignored for 'hf-hub:'/'local-dir:'
    names); with `random=True` the architecture is built with random init and no file is read.
    """

    def __init__(self, model_name: str, pretrained: str | None, cache_dir: str, device: str,
                 random: bool = False) -> None:
        import open_clip

        self.name = f"{model_name}/{'random' if random else pretrained}"
        if random:
            self.model = open_clip.create_model(model_name, pretrained=None, load_weights=False,
                                                pretrained_text=False, cache_dir=cache_dir, device=device)
        else:
            self.model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                                device=device, require_pretrained=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        self.device = device
        self.preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = self.preprocess["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        self.dim = getattr(self.model.visual, "output_dim", None) or self._probe_dim()

    def _probe_dim(self) -> int:
        """Embedding width for image towers that do not declare it (timm-backed ones)."""
        with torch.inference_mode():
            return int(self.encode_images([np.zeros((self.image_size, self.image_size, 3), np.uint8)]).shape[1])

    def images_to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        p = self.preprocess
        return batch_tensor(images, self.image_size, p["mean"], p["std"], p.get("resize_mode", "shortest"),
                            p.get("interpolation", "bicubic"), p.get("fill_color", 0))

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's forward pass on a batch already on the device."""
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.encode_tensor(self.images_to_tensor(images).to(self.device, non_blocking=True))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
