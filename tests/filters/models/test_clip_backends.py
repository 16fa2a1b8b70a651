"""The Chinese CLIP backends (taiyi, chinese_clip): tokenizer, scores, shared tower, registry. No network.

Weights are random but saved in each backend's published format and key names (Taiyi: a Hugging Face
BertForSequenceClassification state dict; Chinese-CLIP: cn_clip's training checkpoint with `module.`
keys and the unused `bert.pooler`), at small sizes with the published layouts. clip_score is the
cosine of the L2-normalised embeddings: logit scale 1, not CLIP's 100 (the thresholds are cosines).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

try:  # transformers' pure-Python WordPiece: BertTokenizerLegacy in 5.x, BertTokenizer before
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as PyBertTokenizer
except ImportError:
    from transformers import BertTokenizer as PyBertTokenizer

from filters.models import ModelOptions, ModelScorer, missing_weights, published, weights
from filters.models import chinese_clip as cc
from filters.models.heads import style_embeddings
from filters.models.taiyi import build_text_model
from filters.models.tokenize import ChineseTokenizer

TINY_L14 = "curate-tiny-l14-taiyi"
SMALL_TAIYI = dataclasses.replace(published.TAIYI, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128)
SMALL_CN_CLIP = {"embed_dim": 32, "image_resolution": 32, "vision_layers": 1, "vision_width": 64,
                 "vision_patch_size": 16, "vision_head_width": 32, "vocab_size": 21128,
                 "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
                 "text_hidden_size": 64, "text_initializer_range": 0.02, "text_intermediate_size": 128,
                 "text_max_position_embeddings": 512, "text_num_attention_heads": 2, "text_num_hidden_layers": 2,
                 "text_type_vocab_size": 2}
CAPTIONS = [
    "一只橘猫趴在窗台上晒太阳",
    "北京故宫的红墙与金色屋顶，摄于2023年秋天。",
    "Apple MacBook Pro 笔记本电脑 M3 芯片 16GB",
    "繁體中文：臺灣夜市的蚵仔煎與珍珠奶茶",
    "ＡＢＣ全角字母１２３和标点！？",
    "Café naïve résumé 咖啡馆",
    "emoji 😀🐱 和 ☆ 符号 #话题# @用户",
    "超长标题" * 30,
    "",
    "hello world, THIS is an English caption.",
]


def _vocab():
    return weights.shipped_path("bert_chinese_vocab")


def _reference_ids(texts: list[str], context: int) -> torch.Tensor:
    """transformers' Python BertTokenizer (not the Rust one ours uses) on the shipped vocab:
    [CLS] tokens[:context-2] [SEP], zero-padded."""
    ref = PyBertTokenizer(str(_vocab()), do_lower_case=True)
    out = torch.zeros(len(texts), context, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [ref.cls_token_id, *ref.convert_tokens_to_ids(ref.tokenize(text))[:context - 2], ref.sep_token_id]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def _padded(tok: ChineseTokenizer, texts: list[str]) -> torch.Tensor:
    ids, mask = tok(texts)
    assert torch.equal(mask, (ids != 0).long())  # [PAD] is id 0 and only padding is masked
    out = torch.zeros(len(texts), tok.context_length, dtype=torch.long)
    out[:, :ids.shape[1]] = ids
    return out


def test_shipped_vocab_is_the_pinned_bert_chinese_vocabulary():
    lines = _vocab().read_text(encoding="utf-8").rstrip("\n").split("\n")  # not splitlines: tokens hold U+2028 and kin
    assert len(lines) == published.BERT_CHINESE_VOCAB and lines[0] == "[PAD]"
    assert lines.index("[CLS]") == 101 and lines.index("[SEP]") == 102 and lines.index("[UNK]") == 100


def test_chinese_clip_tokens_match_cn_clip_and_bert_tokenizer():
    import cn_clip.clip

    tok = ChineseTokenizer(_vocab(), published.CHINESE_CLIP_CONTEXT)
    ours = _padded(tok, CAPTIONS)
    assert torch.equal(ours, cn_clip.clip.tokenize(CAPTIONS, context_length=52))
    assert torch.equal(ours, _reference_ids(CAPTIONS, 52))
    assert (ours[7] != 0).sum() == 52 and ours[7, -1] == 102  # truncated to the context, [SEP] kept
    assert (ours == 100).any(dim=1)[6]  # emoji are [UNK]


def test_taiyi_tokens_match_the_model_cards_call():
    tok = ChineseTokenizer(_vocab(), published.TAIYI.context_length)
    ids, mask = tok(CAPTIONS)
    card = PyBertTokenizer(str(_vocab()), do_lower_case=True)(CAPTIONS, return_tensors="pt", padding=True)
    assert torch.equal(ids, card["input_ids"]) and torch.equal(mask, card["attention_mask"])
    assert torch.equal(_padded(tok, CAPTIONS)[:, :80], _reference_ids(CAPTIONS, 512)[:, :80])


# --- Taiyi: text encoder on the shared L/14 tower -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_l14(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc_taiyi")
    (root / f"{TINY_L14}.json").write_text(json.dumps(
        {"embed_dim": 768, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(root)
    torch.manual_seed(3)
    torch.save(open_clip.create_model(TINY_L14).state_dict(), root / f"{TINY_L14}.pt")
    return root / f"{TINY_L14}.pt"


@pytest.fixture
def small_taiyi(monkeypatch):
    monkeypatch.setattr(published, "TAIYI", SMALL_TAIYI)
    return SMALL_TAIYI


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3), dtype=np.uint8)
            for _ in range(n)]


def test_taiyi_clip_score_matches_an_independent_computation(tiny_l14, small_taiyi, tmp_path):
    torch.manual_seed(11)
    text_model = build_text_model()
    state = text_model.state_dict()
    assert state["classifier.weight"].shape == (768, 64) and "bert.pooler.dense.weight" in state
    torch.save({**state, "bert.embeddings.position_ids": torch.arange(512)[None]},  # as older transformers saved it
               weights.path_of("taiyi_clip", ModelOptions(models_dir=str(tmp_path))))
    opts = ModelOptions(models_dir=str(tmp_path), clip_backend="taiyi", enabled=["clip_score", "style"],
                        l14_model=TINY_L14, l14_pretrained=str(tiny_l14), batch_size=4)
    assert missing_weights(opts) == []
    scorer = ModelScorer(opts)
    images, captions = _images(6), CAPTIONS[:6]
    out = scorer(images, captions)

    clip, _, preprocess = open_clip.create_model_and_transforms(TINY_L14, pretrained=str(tiny_l14))
    reference = PyBertTokenizer(str(_vocab()), do_lower_case=True)
    text_model.eval()
    with torch.no_grad():
        img = F.normalize(clip.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images])), dim=-1)
        # one caption at a time, unpadded: what the batch's attention mask must reproduce
        txt = torch.cat([text_model(reference(c, return_tensors="pt")["input_ids"]).logits for c in captions])
    expected = (img * F.normalize(txt, dim=-1)).sum(-1).numpy()
    np.testing.assert_allclose(out["clip_score"], expected, atol=2e-3)
    assert np.abs(expected).max() > 5e-3  # not a comparison of zeros
    assert set(out["style"]) <= set(opts.style_prompts)
    # style's Chinese and English prompts go through Taiyi's text encoder and Chinese tokenizer
    label = "ink_painting"
    with torch.no_grad():
        prompts = torch.cat([text_model(reference(p, return_tensors="pt")["input_ids"]).logits
                             for p in opts.style_prompts[label]])
    expected_style = F.normalize(F.normalize(prompts, dim=-1).mean(0), dim=-1)
    got = style_embeddings(scorer.clip_text, opts.style_prompts)[list(opts.style_prompts).index(label)]
    np.testing.assert_allclose(got.numpy(), expected_style.numpy(), atol=1e-5)


def test_taiyi_runs_exactly_one_image_tower_per_image(tiny_l14, small_taiyi, tmp_path, monkeypatch):
    opts = ModelOptions(models_dir=str(tmp_path), clip_backend="taiyi", weights="random", batch_size=4,
                        enabled=["clip_score", "aesthetic", "nsfw", "style"], keep_embeddings=True,
                        l14_model=TINY_L14, l14_pretrained=str(tiny_l14))
    assert weights.towers_needed(opts) == {"l14": (TINY_L14, str(tiny_l14))}
    scorer = ModelScorer(opts)
    assert len(scorer._towers) == 1 and scorer.clip_image is scorer._towers[0]
    calls: list[int] = []
    model = scorer._towers[0].model
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x, **kw: calls.append(len(x)) or original(x, **kw))
    out = scorer(_images(5) + [None], CAPTIONS[:6])
    assert calls == [4, 1]  # 5 decoded images, 5 images through one tower; clip_score, style, aesthetic, NSFW share it
    for column in ("clip_score", "aesthetic", "nsfw", "style_prob"):
        assert np.isfinite(out[column][:5]).all() and np.isnan(out[column][5])
    assert out["image_embedding"].shape == (6, 768)


# --- Chinese-CLIP ---------------------------------------------------------------------------------

def test_every_published_size_has_its_shipped_config():
    for size, spec in published.CHINESE_CLIP.items():
        info = cc.model_info(size)
        assert info["image_resolution"] == spec.resolution and info["vocab_size"] == published.BERT_CHINESE_VOCAB
    assert cc.model_info("RN50")["vision_layers"] == [3, 4, 6, 3]
    assert cc.model_info("ViT-H-14")["text_num_hidden_layers"] == 24


def test_chinese_clip_score_matches_cn_clip_on_a_published_format_checkpoint(tmp_path, monkeypatch):
    import cn_clip.clip
    from cn_clip.clip.model import CLIP

    monkeypatch.setattr(cc, "model_info", lambda size: dict(SMALL_CN_CLIP))
    torch.manual_seed(13)
    source = CLIP(**SMALL_CN_CLIP)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.bert.pooler.dense.weight"] = torch.randn(64, 64)  # published checkpoints carry it, unused
    opts = ModelOptions(models_dir=str(tmp_path), clip_backend="chinese_clip", chinese_clip_model="ViT-B-16",
                        enabled=["clip_score", "style"], batch_size=4)
    torch.save({"epoch": 1, "step": 10, "name": "clip_cn_vit-b-16", "state_dict": state},
               weights.path_of("chinese_clip_ViT-B-16", opts))
    assert weights.towers_needed(opts) == {} and missing_weights(opts) == []
    scorer = ModelScorer(opts)
    images, captions = _images(6), CAPTIONS[:6]
    out = scorer(images, captions)

    source.eval()
    transform = cn_clip.clip.image_transform(32)
    with torch.no_grad():
        img = F.normalize(source.encode_image(torch.stack([transform(Image.fromarray(a)) for a in images])), dim=-1)
        txt = F.normalize(source.encode_text(cn_clip.clip.tokenize(captions, context_length=52)), dim=-1)
    expected = (img * txt).sum(-1).numpy()
    np.testing.assert_allclose(out["clip_score"], expected, atol=2e-3)
    assert np.abs(expected).max() > 5e-3


# --- registry, availability, provenance -----------------------------------------------------------

def test_registry_names_each_backends_files_and_sources(tmp_path):
    opts = ModelOptions(models_dir=str(tmp_path), clip_backend="taiyi", enabled=["clip_score", "aesthetic"])
    rows = {r["name"]: r for r in weights.list_weights(opts)}
    source = rows["taiyi_clip"]["source"]
    assert published.TAIYI.repo in source and published.TAIYI.revision in source
    assert rows["bert_chinese_vocab"]["present"] and rows["bert_chinese_vocab"]["pin"] == "pinned"
    assert not any(n.startswith("chinese_clip_") or "xlm-roberta" in n for n in rows)  # no second CLIP
    assert any("ViT-L-14-quickgelu" in n for n in rows)  # the one image tower
    text = "\n".join(missing_weights(opts))
    assert weights.REGISTRY["taiyi_clip"].filename in text and "curate models pull" in text
    cn = ModelOptions(models_dir=str(tmp_path), clip_backend="chinese_clip", chinese_clip_model="RN50",
                      enabled=["style"])
    assert [w.name for w in weights.required(cn)] == ["chinese_clip_RN50"]
    assert "OFA-Sys/chinese-clip-rn50" in weights.required(cn)[0].url
    assert missing_weights(cn.model_copy(update={"weights": "random"})) == []
    source = weights.clip_source(cn)
    assert source["backend"] == "chinese_clip" and "RN50" in source["model"]


def test_models_json_manifest_metadata_inspect_and_report_name_the_clip_backend(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.config import validate
    from curate.inspect import summarize
    from curate.phases.score.provenance import producer
    from curate.report.data import METRICS, Histogram
    from curate.report.page import histogram_section

    cfg = validate({"run_dir": str(tmp_path / "run"), "input": {"paths": ["x.parquet"]},
                    "models": {"enabled": ["clip_score"], "clip_backend": "taiyi", "weights": "random"}})
    from filters.registry import BY_NAME

    models = {"clip_score": producer(BY_NAME["clip_score"], cfg).describe["clip_score"]}
    assert models["clip_score"]["backend"] == "taiyi" and published.TAIYI.repo in models["clip_score"]["model"]
    table = pa.table({"key": ["a", "b"], "clip_score": pa.array([0.1, 0.3], pa.float32())})
    pq.write_table(table.replace_schema_metadata({"curate.models": json.dumps(models)}), tmp_path / "m.parquet")
    assert summarize(str(tmp_path / "m.parquet"))["clip_score_from"] == models["clip_score"]
    metric = next(m for m in METRICS if m.column == "clip_score")
    card = histogram_section([Histogram(metric, "cosine", np.linspace(0, 1, 5), [], np.array([1, 1, 0, 0]), [])],
                             models["clip_score"])
    assert "produced by <b>taiyi</b>" in card and "not comparable" in card
