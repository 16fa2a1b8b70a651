"""ModelScorer: every tower and head the enabled scorers need, loaded once, run on whole batches."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from filters.models.weights import (
    chinese_text_needed,
    clip_image_needed,
    clip_needed,
    load_state_dict,
    open_clip_cache,
    path_of,
    shipped_path,
    towers_needed,
)

from .catalog import MODEL_SCORERS
from .heads import Batch, Head
from .options import ModelOptions
from .towers import Tower


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
        self.roles: dict[str, Tower] = {}
        for role, key in towers_needed(opts).items():
            if key not in towers:
                towers[key] = Tower(key[0], key[1], str(open_clip_cache(opts)), self.device, random=self.random)
            self.roles[role] = towers[key]
        self._towers: list = list(towers.values())
        self.clip_image, self.clip_text = self._clip_backend()
        self._embedding_tower = self.clip_image or self.roles.get("l14")
        self._keep_embeddings = opts.keep_embeddings and self._embedding_tower is not None

        declared = [s for s in MODEL_SCORERS if s.stage == "model" and s.name in enabled]
        self.heads: dict[str, Head] = {s.name: _builder(s.runs)(self) for s in declared}
        columns = [c for s in declared for c in s.columns]
        self.columns = [c.name for c in columns]
        self._float_columns = {c.name for c in columns if pa.types.is_floating(c.type)}

    def _clip_backend(self) -> tuple[object | None, object | None]:
        """(image side, text encoder) of clip_score and style; (None, None) when neither is enabled."""
        opts = self.opts
        if not clip_image_needed(opts):
            return None, None
        if opts.clip_backend == "open_clip":
            return self.roles["clip"], self.roles["clip"]
        vocab = shipped_path("bert_chinese_vocab") if chinese_text_needed(opts) else None
        if opts.clip_backend == "taiyi":
            if not clip_needed(opts):
                return self.roles["l14"], None
            from .taiyi import TaiyiText

            weights = None if self.random else path_of("taiyi_clip", opts)
            text = TaiyiText(vocab, self.device, weights)
            if text.dim != self.roles["l14"].dim:
                raise ValueError(f"clip_backend taiyi scores {text.dim}-d text embeddings against the L/14 tower, but "
                                 f"models.l14_model {opts.l14_model!r} embeds in {self.roles['l14'].dim} dimensions")
            return self.roles["l14"], text
        from .chinese_clip import ChineseClipTower

        weights = None if self.random else path_of(f"chinese_clip_{opts.chinese_clip_model}", opts)
        tower = ChineseClipTower(opts.chinese_clip_model, vocab, self.device, weights)
        self._towers.append(tower)
        return tower, tower

    def load(self, module: torch.nn.Module, weights_name: str) -> torch.nn.Module:
        """A head's module on the device, in eval mode, with its registry weights unless models.weights=random."""
        if not self.random:
            module.load_state_dict(load_state_dict(path_of(weights_name, self.opts)), strict=True)
        return module.to(self.device).eval()

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
        """The CPU side of a batch: each tower's input tensor (by the tower's id) and each head's own, on the device."""
        with torch.inference_mode():
            inputs = {str(id(t)): t.images_to_tensor(images).to(self.device, non_blocking=True) for t in self._towers}
            for name, head in self.heads.items():
                if head.prepare is not None:
                    inputs[name] = head.prepare(images).to(self.device, non_blocking=True)
        return inputs

    def forward(self, inputs: dict[str, torch.Tensor], images: list[np.ndarray],
                captions: list[str | None]) -> dict[str, np.ndarray]:
        """Every tower once, then every enabled scorer's head, on prepared inputs."""
        result: dict[str, np.ndarray] = {}
        with torch.inference_mode(), self._context():
            embeddings = {id(t): t.encode_tensor(inputs[str(id(t))]) for t in self._towers}
            batch = Batch(embeddings, inputs, images, captions)
            for head in self.heads.values():
                result.update(head.run(batch))
            if self._keep_embeddings:
                result["image_embedding"] = embeddings[id(self._embedding_tower)].half().cpu().numpy()
        return result


def _builder(runs: str) -> Callable[[ModelScorer], Head]:
    """The builder a declaration names ("module:function")."""
    module, _, name = runs.partition(":")
    if not module or not name:
        raise ValueError(f"a model scorer's `runs` must name 'module:function', not {runs!r}")
    return getattr(importlib.import_module(module), name)
