"""Model scorers: each head against an independent computation, real loading paths, mixed batches.

Tiny open_clip configs (bundled tokenizer, vocab 49408) keep towers fast on CPU; weights are random
but written in the published formats and key layouts, so the real loading code runs. No network.
"""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from filters.models import ModelOptions, ModelScorer, missing_weights, skipped_when_offline, to_rgb_array, weights
from filters.models.heads import (
    AestheticHead,
    Head,
    LaionNsfwHead,
    build_watermark_model,
    style_embeddings,
    style_logits,
)

TINY_CLIP, TINY_L14 = "curate-tiny-clip", "curate-tiny-l14"


def _tiny_config(embed_dim: int) -> dict:
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    """Register two tiny open_clip configs: a CLIP tower and a 768-d stand-in for ViT-L/14."""
    root = tmp_path_factory.mktemp("oc_configs")
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(_tiny_config(32)))
    (root / f"{TINY_L14}.json").write_text(json.dumps(_tiny_config(768)))
    open_clip.add_model_config(root)
    return root


@pytest.fixture(scope="module")
def pretrained_dir(tiny_configs, tmp_path_factory):
    """A models dir holding every file in its published format, plus local tiny tower checkpoints."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    torch.save(AestheticHead().state_dict(), root / weights.REGISTRY["aesthetic"].filename)
    nsfw = LaionNsfwHead()
    nsfw.mean.normal_(0, 0.05)
    nsfw.variance.uniform_(0.5, 2.0)
    save_file(nsfw.state_dict(), str(root / weights.REGISTRY["laion_nsfw"].filename))
    torch.save(build_watermark_model().state_dict(), root / weights.REGISTRY["watermark"].filename)
    for name in (TINY_CLIP, TINY_L14):
        torch.save(open_clip.create_model(name).state_dict(), root / f"{name}.pt")
    return root


def _opts(models_dir, **kw) -> ModelOptions:
    base = dict(models_dir=str(models_dir), clip_model=TINY_CLIP, clip_pretrained=str(models_dir / f"{TINY_CLIP}.pt"),
                l14_model=TINY_L14, l14_pretrained=str(models_dir / f"{TINY_L14}.pt"), batch_size=4)
    base.update(kw)
    return ModelOptions(**base)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 60), (64, 48), (33, 33), (100, 20), (50, 70), (37, 90)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


# --- conversion helper -------------------------------------------------------------------------

def _mode_images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    sixteen = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    return {
        "1": rgb.convert("1"), "L": rgb.convert("L"), "LA": rgb.convert("LA"), "P": rgb.convert("P"),
        "RGB": rgb, "RGBA": rgb.convert("RGBA"), "CMYK": rgb.convert("CMYK"), "YCbCr": rgb.convert("YCbCr"),
        "I;16": sixteen, "I": sixteen.convert("I"), "F": rgb.convert("F"), "HSV": rgb.convert("HSV"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_to_rgb_array_handles_every_mode(mode):
    arr = to_rgb_array(_mode_images()[mode])
    assert arr.dtype == np.uint8 and arr.shape == (20, 30, 3)


def test_to_rgb_array_scales_16bit_and_composites_alpha_and_downsizes():
    assert to_rgb_array(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))).max() == 128
    clear = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    assert (to_rgb_array(clear) == 255).all()
    palette = Image.new("P", (5, 5), 0)
    palette.info["transparency"] = 0
    assert (to_rgb_array(palette) == 255).all()
    assert to_rgb_array(Image.new("RGB", (1000, 500)), short_side=256).shape == (256, 512, 3)
    assert to_rgb_array(Image.new("RGB", (100, 50)), short_side=256).shape == (50, 100, 3)


# --- heads against independent computations ------------------------------------------------------

def test_aesthetic_head_from_pth_matches_matmul_chain(pretrained_dir):
    sd = weights.load_state_dict(pretrained_dir / weights.REGISTRY["aesthetic"].filename)
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = AestheticHead()
    head.load_state_dict(sd, strict=True)
    x = F.normalize(torch.randn(5, 768), dim=-1)
    expected = x.numpy().astype(np.float64)
    for i in (0, 2, 4, 6, 7):
        expected = expected @ sd[f"layers.{i}.weight"].numpy().T + sd[f"layers.{i}.bias"].numpy()
    np.testing.assert_allclose(head.eval()(x).detach().numpy(), expected[:, 0], rtol=1e-4, atol=1e-5)


def test_laion_nsfw_head_from_safetensors_matches_numpy(pretrained_dir):
    sd = {k: v.numpy().astype(np.float64) for k, v in
          weights.load_state_dict(pretrained_dir / weights.REGISTRY["laion_nsfw"].filename).items()}
    head = LaionNsfwHead()
    head.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}, strict=True)
    x = F.normalize(torch.randn(6, 768), dim=-1)
    h = (x.numpy() - sd["mean"]) / np.sqrt(sd["variance"])
    for i in range(3):
        h = np.maximum(h @ sd[f"dense{i}.weight"].T + sd[f"dense{i}.bias"], 0)
    expected = 1 / (1 + np.exp(-(h @ sd["dense3.weight"].T + sd["dense3.bias"])))
    np.testing.assert_allclose(head(x).detach().numpy(), expected[:, 0], rtol=1e-4, atol=1e-6)


def test_style_picks_the_planted_class():
    torch.manual_seed(0)
    styles = F.normalize(torch.randn(8, 32), dim=-1)
    planted = F.normalize(styles[5] + 0.05 * torch.randn(3, 32), dim=-1)
    assert style_logits(planted, styles).argmax(-1).tolist() == [5, 5, 5]


def test_scorer_style_picks_class_whose_prompt_the_image_matches(tiny_configs, pretrained_dir):
    scorer = ModelScorer(_opts(pretrained_dir, enabled=["style"]))
    labels = list(scorer.opts.style_prompts)
    styles = style_embeddings(scorer.clip_text, scorer.opts.style_prompts)   # as the style head builds them
    for k in (0, 4, 7):
        image_emb = styles[k:k + 1] + 0.01 * torch.randn(1, styles.shape[1])
        probs = style_logits(image_emb, styles).softmax(-1)
        assert labels[int(probs.argmax())] == labels[k] and float(probs.max()) > 0.5


# --- the scorer end to end, on the real loading paths --------------------------------------------

@pytest.mark.slow
def test_pretrained_scorer_matches_independent_pipelines(tiny_configs, pretrained_dir):
    opts = _opts(pretrained_dir, enabled=["clip_score", "aesthetic", "nsfw", "watermark", "style"])
    assert missing_weights(opts) == [] and skipped_when_offline(opts) == {}
    scorer = ModelScorer(opts)
    assert scorer.columns == ["clip_score", "aesthetic", "nsfw", "watermark", "style", "style_prob"]
    images, captions = _images(4), ["一只猫", "a dog", "山水画", ""]
    out = scorer(images, captions)

    pils = [Image.fromarray(a) for a in images]
    clip, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=opts.clip_pretrained)
    with torch.no_grad():
        img = F.normalize(clip.encode_image(torch.stack([preprocess(p) for p in pils])), dim=-1)
        txt = F.normalize(clip.encode_text(open_clip.get_tokenizer(TINY_CLIP)(captions)), dim=-1)
    np.testing.assert_allclose(out["clip_score"], (img * txt).sum(-1).numpy(), atol=2e-3)

    l14, _, pre14 = open_clip.create_model_and_transforms(TINY_L14, pretrained=opts.l14_pretrained)
    aesthetic, nsfw = AestheticHead(), LaionNsfwHead()
    aesthetic.load_state_dict(torch.load(pretrained_dir / weights.REGISTRY["aesthetic"].filename, weights_only=True))
    nsfw.load_state_dict(weights.load_state_dict(pretrained_dir / weights.REGISTRY["laion_nsfw"].filename))
    with torch.no_grad():
        e14 = F.normalize(l14.encode_image(torch.stack([pre14(p) for p in pils])), dim=-1)
        np.testing.assert_allclose(out["aesthetic"], aesthetic.eval()(e14).numpy(), atol=2e-3)
        np.testing.assert_allclose(out["nsfw"], nsfw(e14).numpy(), atol=2e-3)

    wm = build_watermark_model()
    wm.load_state_dict(torch.load(pretrained_dir / weights.REGISTRY["watermark"].filename, weights_only=True))
    reference = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224,
                                                                                                   0.225])])
    with torch.no_grad():
        p_wm = wm.eval()(torch.stack([reference(p) for p in pils])).softmax(-1)[:, 0].numpy()
    np.testing.assert_allclose(out["watermark"], p_wm, atol=2e-3)
    assert set(out["style"]) <= set(opts.style_prompts) and np.all((out["style_prob"] > 0) & (out["style_prob"] <= 1))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["laion", "open_nsfw"])
def test_mixed_batch_goes_through_every_scorer_with_random_weights(tiny_configs, tmp_path, backend):
    enabled = ["clip_score", "aesthetic", "nsfw", "watermark", "style"] if backend == "laion" else ["nsfw", "style"]
    opts = _opts(tmp_path, weights="random", nsfw_backend=backend, keep_embeddings=True, batch_size=3, enabled=enabled)
    assert missing_weights(opts) == []
    scorer = ModelScorer(opts)
    images = [to_rgb_array(im) for im in _mode_images().values()] + [None]
    images[3] = to_rgb_array(Image.new("RGB", (300, 120), (10, 200, 30)), short_side=64)
    captions = ["图片"] * (len(images) - 2) + [None, "x"]
    out = scorer(images, captions)
    n = len(images)
    for column in set(scorer.columns) - {"style"}:
        assert out[column].dtype == np.float32 and out[column].shape == (n,)
        assert np.isfinite(out[column][:-2]).all() and np.isnan(out[column][-1])
    if backend == "laion":
        assert np.isnan(out["clip_score"][-2]) and np.isfinite(out["aesthetic"][-2])
    else:
        assert out["nsfw"][:-1].max() < 0.5  # real open_nsfw weights on synthetic images
    assert out["style"].dtype == object and out["style"][-1] is None and out["style"][0] in opts.style_prompts
    assert ((out["nsfw"][:-1] >= 0) & (out["nsfw"][:-1] <= 1)).all()
    assert out["image_embedding"].dtype == np.float16 and out["image_embedding"].shape == (n, 32)


def test_towers_are_shared_and_run_once_per_image(tiny_configs, tmp_path, monkeypatch):
    """With the L/14 role pointed at the CLIP tower, one model serves clip_score, style and aesthetic."""
    opts = _opts(tmp_path, weights="random", enabled=["clip_score", "aesthetic", "style"], l14_model=TINY_CLIP)
    scorer = ModelScorer(opts.model_copy(update={"l14_pretrained": opts.clip_pretrained}))
    assert len(scorer._towers) == 1 and list(scorer.heads) == ["clip_score", "aesthetic", "style"]
    calls = []
    tower = scorer._towers[0]
    original = tower.model.encode_image
    monkeypatch.setattr(tower.model, "encode_image", lambda x, **kw: calls.append(len(x)) or original(x, **kw))
    scorer(_images(5), ["a"] * 5)
    assert calls == [4, 1]  # one image pass per batch of 4, shared by all three heads


def test_cuda_oom_halves_the_batch_and_retries(tiny_configs, tmp_path, monkeypatch):
    scorer = ModelScorer(_opts(tmp_path, weights="random", enabled=["clip_score"], batch_size=8))
    real = scorer._score

    def flaky(images, captions):
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(images, captions)

    monkeypatch.setattr(scorer, "_score", flaky)
    out = scorer(_images(7), ["猫"] * 7)
    assert scorer.batch_size == 2 and np.isfinite(out["clip_score"]).all()


def test_open_nsfw_is_low_on_plain_synthetic_images():
    scorer = ModelScorer(ModelOptions(enabled=["nsfw"], nsfw_backend="open_nsfw"))
    assert scorer.columns == ["nsfw"] and scorer._towers == []
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (200, 1, 3))
    plain = [np.full((300, 200, 3), c, np.uint8) for c in ((255, 255, 255), (0, 0, 0), (30, 90, 200))]
    scores = scorer(plain + [ramp, None], ["", "", "", "", ""])["nsfw"]
    assert ((scores[:4] >= 0) & (scores[:4] <= 1)).all() and (scores[:4] < 0.2).all() and np.isnan(scores[4])


def test_missing_weights_names_file_source_and_command(tmp_path):
    opts = ModelOptions(enabled=["aesthetic", "nsfw", "watermark"], models_dir=str(tmp_path))
    lines = missing_weights(opts)
    text = "\n".join(lines)
    for w in ("aesthetic", "laion_nsfw", "watermark"):
        assert weights.REGISTRY[w].filename in text
    assert "improved-aesthetic-predictor" in text and "LAION-5B-WatermarkDetection" in text
    assert all("curate models pull" in line for line in lines)
    assert set(skipped_when_offline(opts)) == {"aesthetic", "nsfw", "watermark"}
    assert missing_weights(opts.model_copy(update={"weights": "random"})) == []
    assert skipped_when_offline(opts.model_copy(update={"enabled": ["nsfw"], "nsfw_backend": "open_nsfw"})) == {}


def test_options_reject_unknown_scorers_and_fields():
    with pytest.raises(ValueError):
        ModelOptions(enabled=["nope"])
    with pytest.raises(ValueError):
        ModelOptions(enabled=[], extra_field=1)
    assert ModelOptions().enabled == [] and len(ModelOptions().style_prompts) == 8


def brightness(m) -> Head:
    """A model scorer made in this test: its declaration names this builder, and nothing else is edited."""
    return Head(lambda b: {"brightness": b.inputs["brightness"].mean(dim=(1, 2, 3)).numpy()},
                prepare=lambda views: torch.stack([torch.from_numpy(v).float() / 255 for v in views]))


def test_a_new_model_scorer_runs_from_its_declaration_alone(tmp_path, monkeypatch):
    import pyarrow as pa

    from filters.declare import Column, Scorer
    from filters.models import scorer as scorer_module

    new = Scorer("brightness", stage="model", reads=("view",), runs=f"{__name__}:brightness",
                 columns=(Column("brightness", pa.float32(), "mean of the view, 0..1"),))
    monkeypatch.setattr(scorer_module, "MODEL_SCORERS", (*scorer_module.MODEL_SCORERS, new))
    opts = _opts(tmp_path, weights="random").model_copy(update={"enabled": ["brightness"]})
    scorer = ModelScorer(opts)
    assert scorer.columns == ["brightness"] and scorer._towers == []
    views = [np.full((8, 8, 3), 51, np.uint8), None, np.full((8, 8, 3), 255, np.uint8)]
    out = scorer(views, ["甲", None, "乙"])
    np.testing.assert_allclose(out["brightness"], [0.2, np.nan, 1.0], rtol=1e-6)
