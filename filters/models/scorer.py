"""ModelScorer: every tower and head the enabled scorers need, loaded once, run on whole batches."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from filters.models.weights import (chinese_text_needed, clip_image_needed, clip_needed, load_state_dict, open_clip_cache, path_of, shipped_path,
                            towers_needed)

from .heads import AestheticHead, LaionNsfwHead, build_watermark_model, style_logits
from .catalog import MODEL_SCORERS
from .images import IMAGENET_MEAN, IMAGENET_STD, batch_tensor
from .options import ModelOptions
from .towers import Tower

WATERMARK_SIZE = 256


def _autocast_dtype(opts: ModelOptions, device: str) -> torch.dtype | None:
    """Autocast only on CUDA; 'auto' picks bf16 where the GPU has it, else fp16."""
    if not device.startswith("cuda") or opts.dtype == "fp32":
        return None
    if opts.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[opts.dtype]


class ModelScorer:
    """Loads every tower/head needed by opts.enabled ONCE (a Ray actor's __init__ builds one).

    Towers are shared by key (model, pretrained): clip_score and style read the CLIP backend's image
    side and text encoder, aesthetic and LAION NSFW the ViT-L/14 tower, and each tower encodes every
    image once per call. With clip_backend taiyi the CLIP image side *is* the L/14 tower: one image
    pass feeds clip_score, style, aesthetic and NSFW. Style runs on the CLIP backend's text encoder
    because it reads the Chinese prompts. `image_embedding` comes from the CLIP image side when
    loaded, else from the L/14 tower.
    """

    def __init__(self, opts: ModelOptions, device: str | None = None) -> None:
        self.opts = opts
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.random = opts.weights == "random"
        self.batch_size = opts.batch_size
        self._autocast = _autocast_dtype(opts, self.device)
        if self.random:
            torch.manual_seed(0)  # meaningless scores, but the same ones on every actor and run
        enabled = set(opts.enabled)

        towers: dict[tuple[str, str], Tower] = {}
        self._roles: dict[str, Tower] = {}
        for role, key in towers_needed(opts).items():
            if key not in towers:
                towers[key] = Tower(key[0], key[1], str(open_clip_cache(opts)), self.device, random=self.random)
            self._roles[role] = towers[key]
        self._towers = list(towers.values())
        self._clip_image, self._clip_text = self._clip_backend()
        self._embedding_tower = self._clip_image or self._roles.get("l14")
        self._keep_embeddings = opts.keep_embeddings and self._embedding_tower is not None

        self._aesthetic = self._head(AestheticHead(self._roles["l14"].dim), "aesthetic") if "aesthetic" in enabled else None
        self._laion_nsfw = self._open_nsfw = None
        if "nsfw" in enabled and opts.nsfw_backend == "laion":
            self._laion_nsfw = self._head(LaionNsfwHead(self._roles["l14"].dim), "laion_nsfw")
        elif "nsfw" in enabled:
            from .open_nsfw import OpenNsfw

            self._open_nsfw = OpenNsfw(self.device)
        self._watermark = self._head(build_watermark_model(), "watermark") if "watermark" in enabled else None

        self._style_labels = list(opts.style_prompts)
        self._style_emb = self._style_embeddings() if "style" in enabled else None
        declared = [c for s in MODEL_SCORERS if s.stage == "model" and s.name in enabled for c in s.columns]
        self.columns = [c.name for c in declared]
        self._float_columns = {c.name for c in declared if pa.types.is_floating(c.type)}

    def _clip_backend(self) -> tuple[object | None, object | None]:
        """(image side, text encoder) of clip_score and style; (None, None) when neither is enabled."""
        opts = self.opts
        if not clip_image_needed(opts):
            return None, None
        if opts.clip_backend == "open_clip":
            return self._roles["clip"], self._roles["clip"]
        vocab = shipped_path("bert_chinese_vocab") if chinese_text_needed(opts) else None
        if opts.clip_backend == "taiyi":
            if not clip_needed(opts):
                return self._roles["l14"], None
            from .taiyi import TaiyiText

            weights = None if self.random else path_of("taiyi_clip", opts)
            text = TaiyiText(vocab, self.device, weights)
            if text.dim != self._roles["l14"].dim:
                raise ValueError(f"clip_backend taiyi scores {text.dim}-d text embeddings against the L/14 tower, but "
                                 f"models.l14_model {opts.l14_model!r} embeds in {self._roles['l14'].dim} dimensions")
            return self._roles["l14"], text
        from .chinese_clip import ChineseClipTower

        weights = None if self.random else path_of(f"chinese_clip_{opts.chinese_clip_model}", opts)
        tower = ChineseClipTower(opts.chinese_clip_model, vocab, self.device, weights)
        self._towers.append(tower)
        return tower, tower

    def _head(self, module: torch.nn.Module, weights_name: str) -> torch.nn.Module:
        if not self.random:
            module.load_state_dict(load_state_dict(path_of(weights_name, self.opts)), strict=True)
        return module.to(self.device).eval()

    def _style_embeddings(self) -> torch.Tensor:
        """One text embedding per style: the mean of its prompts' normalised embeddings."""
        tower = self._clip_text
        with torch.inference_mode():
            rows = [tower.encode_texts(self.opts.style_prompts[label]).mean(0) for label in self._style_labels]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def _context(self) -> contextlib.AbstractContextManager:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self._autocast)

    def __call__(self, images: Sequence[np.ndarray | None], captions: Sequence[str | None]) -> dict[str, np.ndarray]:
        """Scores for a batch; rows whose image is None get NaN (style None). See ModelOptions for columns."""
        n = len(images)
        out: dict[str, np.ndarray] = {c: np.full(n, np.nan, np.float32) for c in self._float_columns}
        if "style" in self.columns:
            out["style"] = np.full(n, None, dtype=object)
        if self._keep_embeddings:
            out["image_embedding"] = np.full((n, self._embedding_tower.dim), np.nan, np.float16)
        rows = [i for i, im in enumerate(images) if im is not None]
        start = 0
        while start < len(rows):
            chunk = rows[start:start + self.batch_size]
            try:
                part = self._score([images[i] for i in chunk], [captions[i] for i in chunk])
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)  # stays halved for the actor's later batches
                torch.cuda.empty_cache()
                continue
            for column, values in part.items():
                out[column][chunk] = values
            start += len(chunk)
        return out

    def _score(self, images: list[np.ndarray], captions: list[str | None]) -> dict[str, np.ndarray]:
        """One forward pass per tower and head over `images` (all decoded)."""
        return self.forward(self.prepare(images), images, captions)

    def prepare(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The CPU side of a batch: each tower's (and the watermark model's) input tensor, on the device."""
        with torch.inference_mode():
            inputs = {str(id(t)): t.images_to_tensor(images).to(self.device, non_blocking=True) for t in self._towers}
            if self._watermark is not None:
                x = batch_tensor(images, WATERMARK_SIZE, IMAGENET_MEAN, IMAGENET_STD, "squash", "bilinear")
                inputs["watermark"] = x.to(self.device, non_blocking=True)
        return inputs

    def forward(self, inputs: dict[str, torch.Tensor], images: list[np.ndarray],
                captions: list[str | None]) -> dict[str, np.ndarray]:
        """Every tower and head on prepared inputs (`images` only for open_nsfw, which runs on ONNX)."""
        result: dict[str, np.ndarray] = {}
        with torch.inference_mode(), self._context():
            embeddings = {id(t): t.encode_tensor(inputs[str(id(t))]) for t in self._towers}
            image = embeddings[id(self._clip_image)] if self._clip_image is not None else None
            if "clip_score" in self.columns:
                texts = self._clip_text.encode_texts([c or "" for c in captions])
                score = (image * texts).sum(-1).float().cpu().numpy()
                score[[c is None for c in captions]] = np.nan
                result["clip_score"] = score
            if self._style_emb is not None:
                probs = style_logits(image, self._style_emb).float().softmax(-1)
                best, index = probs.max(-1)
                result["style"] = np.array([self._style_labels[j] for j in index.tolist()], dtype=object)
                result["style_prob"] = best.cpu().numpy()
            if self._aesthetic is not None:
                result["aesthetic"] = self._aesthetic(embeddings[id(self._roles["l14"])]).float().cpu().numpy()
            if self._laion_nsfw is not None:
                result["nsfw"] = self._laion_nsfw(embeddings[id(self._roles["l14"])]).float().cpu().numpy()
            if self._open_nsfw is not None:
                result["nsfw"] = self._open_nsfw(images)
            if self._watermark is not None:
                logits = self._watermark(inputs["watermark"]).float()
                result["watermark"] = logits.softmax(-1)[:, 0].cpu().numpy()
            if self._keep_embeddings:
                result["image_embedding"] = embeddings[id(self._embedding_tower)].half().cpu().numpy()
        return result
