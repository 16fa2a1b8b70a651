"""The BERT-Chinese WordPiece tokenizer both Chinese CLIP backends were trained with, run offline.

Taiyi-CLIP (hfl/chinese-roberta-wwm-ext-large's tokenizer: BertTokenizer, do_lower_case, Chinese
characters split one per token) and Chinese-CLIP (cn_clip's FullTokenizer) use the same 21,128-token
vocabulary, which ships inside the cn-clip wheel as `clip/vocab.txt` (pinned by sha256 in
filters/models/weights.py). The ids are `[CLS] tokens[:context_length - 2] [SEP]`, then [PAD] (id 0): what
`cn_clip.clip.tokenize` and a Hugging Face BertTokenizer with truncation produce.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class ChineseTokenizer:
    """Batched BERT WordPiece (the Rust `tokenizers` package, as Hugging Face's fast BertTokenizer) with
    a model's context length: lower-cased, control characters dropped, every CJK character its own word.

    Returns ids and attention mask padded to the longest caption of the batch: with the mask, and
    absolute positions counted from the left, the embedding equals that of a caption padded to the
    full context length.
    """

    def __init__(self, vocab: str | Path, context_length: int) -> None:
        from tokenizers import BertWordPieceTokenizer

        if context_length < 3:
            raise ValueError(f"context_length {context_length} leaves no room between [CLS] and [SEP]")
        self.context_length = context_length
        self._tokenizer = BertWordPieceTokenizer(str(vocab), clean_text=True, handle_chinese_chars=True,
                                                 strip_accents=None, lowercase=True)
        self._tokenizer.enable_truncation(max_length=context_length)
        self._tokenizer.enable_padding(pad_id=self._tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.vocab_size = self._tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [batch, longest <= context_length]."""
        encoded = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return ids, mask

