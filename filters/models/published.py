"""Published facts of the Chinese CLIP backends: architectures, files, context lengths (no torch here).

The registry (filters/models/weights.py), the options and the model builders all read these, so each fact
lives once. Sources: the Taiyi-CLIP model card and its tokenizer_config.json on the Hugging Face hub
(IDEA-CCNL/Taiyi-CLIP-Roberta-large-326M-Chinese); cn_clip 1.6.0 (`clip/utils.py`'s `_MODELS` and
`_MODEL_INFO`, `clip/model_configs/*.json`, `clip.tokenize`).
"""
from __future__ import annotations

from dataclasses import dataclass

CLIP_BACKENDS = ("open_clip", "taiyi", "chinese_clip")
BERT_CHINESE_VOCAB = 21128  # bert-base-chinese WordPiece vocabulary, used by every model below
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TaiyiSpec:
    """Taiyi-CLIP: a BertForSequenceClassification whose 768 logits are the text embedding, trained against
    the frozen OpenAI CLIP ViT-L/14 image encoder (so its image embedding is the L/14 tower's)."""

    repo: str
    revision: str
    filename: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    embed_dim: int
    # The card tokenizes without truncation (BertTokenizer, padding=True): the only limit is the
    # encoder's 512 positions. Captions past text.max_chars (300) are dropped before scoring anyway.
    context_length: int = 512
    max_position_embeddings: int = 512


TAIYI = TaiyiSpec(
    repo="IDEA-CCNL/Taiyi-CLIP-Roberta-large-326M-Chinese",
    revision="2d54979689151036d4624e20e5f104cf73eadcf1",
    filename="pytorch_model.bin",
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,  # RoBERTa-wwm-ext-large
    embed_dim=768,
)


@dataclass(frozen=True)
class ChineseClipSpec:
    """One published Chinese-CLIP size: cn_clip's config names, input resolution and checkpoint."""

    vision: str       # cn_clip/clip/model_configs/{vision}.json
    text: str         # cn_clip/clip/model_configs/{text}.json
    resolution: int
    repo: str         # Hugging Face repository cn_clip 1.6.0 downloads from
    filename: str


CHINESE_CLIP_CONTEXT = 52  # "all baseline models use 52 as the context length" (cn_clip.clip.tokenize)
CHINESE_CLIP: dict[str, ChineseClipSpec] = {
    "ViT-B-16": ChineseClipSpec("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 224,
                                "OFA-Sys/chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt"),
    "ViT-L-14": ChineseClipSpec("ViT-L-14", "RoBERTa-wwm-ext-base-chinese", 224,
                                "OFA-Sys/chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": ChineseClipSpec("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese", 336,
                                    "OFA-Sys/chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": ChineseClipSpec("ViT-H-14", "RoBERTa-wwm-ext-large-chinese", 224,
                                "OFA-Sys/chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt"),
    "RN50": ChineseClipSpec("RN50", "RBT3-chinese", 224, "OFA-Sys/chinese-clip-rn50", "clip_cn_rn50.pt"),
}


def hub_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"https://huggingface.co/{repo}/resolve/{revision}/{filename}"
