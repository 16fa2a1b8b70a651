"""The recaption engine (filters/models/recaption.py): a tiny random Qwen2-VL saved in the Hugging Face
layout and loaded back through the real local-directory path, batching, per-row failures, cache keys."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from filters.models import ModelOptions, weights
from filters.models import recaption as rc

OPTS = rc.RecaptionOptions(enabled=True, max_new_tokens=6, image_side=112, batch_size=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return rc.save_random(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def engine(saved):
    return rc.TransformersEngine.load(saved, OPTS)


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (160, 90), (200, 30, 30)), Image.new("RGB", (40, 300), (30, 200, 30)),
            Image.new("L", (64, 64), 128)]


def test_saved_in_the_hugging_face_layout_with_a_real_tokenizer_file(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json"} <= names
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    tok = json.loads((saved / "tokenizer.json").read_text())
    assert {t["content"] for t in tok["added_tokens"]} >= set(rc.SPECIAL_TOKENS)


def test_loads_back_and_captions_a_batch_deterministically(saved, engine):
    prompts = [rc.row_prompt(OPTS, None), rc.row_prompt(OPTS, "大学"), OPTS.prompt]
    first = engine.generate(_images(), prompts)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert any(t.strip() for t in first)
    again = rc.TransformersEngine.load(saved, OPTS).generate(_images(), prompts)
    assert again == first   # greedy decoding of the same saved weights
    alone = engine.generate(_images()[:1], prompts[:1])
    assert alone == first[:1]   # left padding: a row's caption does not depend on its batch


def test_random_weights_with_the_same_seed_are_the_same_model(tmp_path):
    import torch

    _, a = rc.random_parts(tmp_path / "a", seed=3)
    _, b = rc.random_parts(tmp_path / "b", seed=3)
    _, c = rc.random_parts(tmp_path / "c", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


class _Picky:
    """An engine that rejects one image (the wide one) and answers the others: a per-row failure."""

    name = "picky"

    def __init__(self, answer: str = "一只红色的猫坐在木桌上"):
        self.answer, self.calls = answer, 0

    def generate(self, images, prompts):
        self.calls += 1
        if any(im.size[0] > 150 for im in images):
            raise ValueError("image too wide")
        return [self.answer for _ in images]


def test_a_failing_batch_is_retried_row_by_row_and_only_the_bad_row_fails():
    engine = _Picky()
    out = rc.caption(engine, _images(), ["p"] * 3)
    assert out[0].text is None and out[0].error.startswith("model: ValueError: image too wide")
    assert [c.text for c in out[1:]] == [engine.answer] * 2 and all(c.error is None for c in out[1:])


def test_empty_and_garbled_outputs_and_decode_errors_are_row_errors():
    assert rc.caption(_Picky("  "), _images()[1:2], ["p"])[0].error == "empty output"
    assert rc.caption(_Picky("猫\ufffd\ufffd"), _images()[1:2], ["p"])[0].error.startswith("garbled")
    out = rc.caption(_Picky(), [None, _images()[1]], ["p", "p"], errors=["decode: broken jpeg", None])
    assert out[0].error == "decode: broken jpeg" and out[1].text


def test_the_engine_passes_real_failures_through_caption(engine):
    import io

    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG")
    cut = Image.open(io.BytesIO(buf.getvalue()[:2000]))   # opens lazily; its pixels cannot be read
    out = rc.caption(engine, [_images()[0], cut], ["p", "p"])
    assert out[0].error is None or out[0].error == "empty output"
    assert out[1].text is None and out[1].error.startswith("model: OSError")


def test_the_image_is_fit_to_image_side_and_never_enlarged():
    assert rc.fit(Image.new("RGB", (900, 300)), 448).size == (448, 149)
    assert rc.fit(Image.new("RGBA", (100, 50)), 448).size == (100, 50)


def test_prompt_carries_the_ocr_hint_only_where_ocr_read_text():
    assert rc.row_prompt(OPTS, None) == rc.row_prompt(OPTS, "") == OPTS.prompt
    assert rc.row_prompt(OPTS, "北京大学").endswith("北京大学") and OPTS.prompt in rc.row_prompt(OPTS, "北京大学")
    assert rc.row_prompt(OPTS.model_copy(update={"ocr_hint": None}), "北京大学") == OPTS.prompt
    with pytest.raises(ValueError):
        rc.RecaptionOptions(ocr_hint="{caption}")


def test_cache_key_changes_with_model_prompt_and_settings_not_with_batching():
    base = rc.settings_digest(rc.generation_settings(OPTS, "pretrained"))
    key = rc.cache_key(base, "ab" * 32, "p")
    changed = [rc.settings_digest(rc.generation_settings(OPTS.model_copy(update=u), "pretrained"))
               for u in ({"model": "Qwen/Qwen2.5-VL-3B-Instruct"}, {"prompt": "描述图片"}, {"max_new_tokens": 7},
                         {"image_side": 224}, {"repetition_penalty": 1.2}, {"dtype": "fp16"}, {"ocr_hint": None})]
    changed.append(rc.settings_digest(rc.generation_settings(OPTS, "random")))
    assert len({base, *changed}) == len(changed) + 1
    same = rc.settings_digest(rc.generation_settings(OPTS.model_copy(update={"batch_size": 1, "num_actors": 3,
                                                                              "max_chars": 9}), "pretrained"))
    assert same == base
    assert rc.cache_key(base, "cd" * 32, "p") != key and rc.cache_key(base, "ab" * 32, "q") != key


def test_a_pulled_model_is_verified_against_the_digests_recorded_at_pull(tmp_path, saved, monkeypatch):
    import shutil

    models = ModelOptions(models_dir=str(tmp_path / "models"))
    opts = rc.RecaptionOptions(enabled=True, model="Org/Tiny-VL", max_new_tokens=4, image_side=112)
    assert "curate models pull" in rc.missing(opts, models)
    with pytest.raises(FileNotFoundError, match="models pull"):
        rc.load_engine(opts, models)

    def fake_snapshot(repo, revision, local_dir):   # the hub, offline: the saved tiny model's files
        assert (repo, revision) == ("Org/Tiny-VL", "main")
        shutil.copytree(saved, local_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert rc.pull(opts, models, log=lambda line: None) == []
    assert rc.missing(opts, models) is None
    pins = rc.verify(opts, models)
    assert "hf/Org--Tiny-VL/model.safetensors" in pins
    assert pins["hf/Org--Tiny-VL/model.safetensors"] == weights.sha256_file(rc.hub_dir(opts, models) /
                                                                             "model.safetensors")
    assert rc.load_engine(opts, models).generate(_images()[:1], ["p"])
    assert rc.status(opts, models, verify_files=True)["checksum"] == "ok"
    config = rc.hub_dir(opts, models) / "generation_config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ValueError, match="recorded at pull"):
        rc.verify(opts, models)
    assert rc.status(opts, models, verify_files=True)["checksum"] == "mismatch"


def test_a_local_directory_loads_unpinned(saved):
    opts = rc.RecaptionOptions(enabled=True, model=str(saved), max_new_tokens=4, image_side=112)
    assert rc.local_dir(opts) == saved and rc.verify(opts, ModelOptions()) == {}
    assert "unpinned" in rc.describe(opts, ModelOptions())["source"]
    assert len(rc.load_engine(opts, ModelOptions()).generate(_images()[:2], ["p", "p"])) == 2
