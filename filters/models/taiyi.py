"""Taiyi-CLIP's Chinese text encoder: RoBERTa-large whose classifier head is the text projection.

Published as a Hugging Face `BertForSequenceClassification` (keys `bert.*`, `classifier.weight`
[768, 1024], `classifier.bias`); its 768 logits are the text embedding, scored against the frozen
OpenAI ViT-L/14 image embedding, which the L/14 tower already computes. So this module has no image
side: the scorer pairs it with the shared L/14 tower.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from . import published
from .tokenize import ChineseTokenizer

# Buffers older transformers saved and newer ones keep out of the state dict: not weights.
_NON_WEIGHTS = ("bert.embeddings.position_ids",)


def build_text_model(spec: published.TaiyiSpec | None = None) -> torch.nn.Module:
    """The architecture of the published checkpoint (published.TAIYI unless given), randomly initialised."""
    from transformers import BertConfig, BertForSequenceClassification

    spec = spec or published.TAIYI
    config = BertConfig(vocab_size=published.BERT_CHINESE_VOCAB, hidden_size=spec.hidden_size,
                        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
                        type_vocab_size=2, num_labels=spec.embed_dim, hidden_act="gelu", layer_norm_eps=1e-12)
    return BertForSequenceClassification(config)


class TaiyiText:
    """Text side of Taiyi-CLIP: captions -> L2-normalised 768-d embeddings (float32)."""

    def __init__(self, vocab: str | Path, device: str, weights: str | Path | None,
                 spec: published.TaiyiSpec | None = None) -> None:
        from filters.models.weights import load_state_dict

        spec = spec or published.TAIYI
        self.name = f"taiyi:{spec.repo}/{'random' if weights is None else Path(weights).name}"
        self.model = build_text_model(spec)
        if weights is not None:
            state = {k: v for k, v in load_state_dict(weights).items() if k not in _NON_WEIGHTS}
            self.model.load_state_dict(state, strict=True)
        self.model.to(device).eval()
        self.device = device
        self.tokenizer = ChineseTokenizer(vocab, spec.context_length)
        self.dim = spec.embed_dim

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(texts)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return F.normalize(logits.float(), dim=-1)
