"""The OCR scorer on real PP-OCRv4 inference (the ONNX files of the rapidocr-onnxruntime wheel).

Ground truth comes from tests/text_images.py: Chinese and Latin lines drawn with Noto Sans CJK SC
(shipped by the mplfonts wheel) at 16-96 px, plain and photo-like grounds, posters, and no text.
`text_area` is the share under the detected boxes; the truth is the share under the ink boxes.
Detected boxes include the margin DB grows around the ink, so small text reads up to about 2.9x
its ink area, but never more than AREA_TOLERANCE away in absolute terms.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from curate.config import Config, ConfigError, FiltersConfig, ScoreConfig
from curate.phases.score.phase import check_room
from curate.phases.write.phase import originals
from filters.models import ModelOptions, weights
from filters.models.ocr import Ocr, reading_order
from tests.text_images import corpus

AREA_TOLERANCE = 0.03   # |text_area - ink area| on every image with text, at the default side
NO_TEXT = 0.005         # text_area on every image without text


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    """The scorer as the score stage builds it by default (screen at 320, measure at 480)."""
    opts = ModelOptions()
    return Ocr(side=opts.ocr_side, recognize=True, threads=1, screen_side=opts.ocr_screen_side)


def _seen_by_the_screen(r) -> bool:
    """Text at least 2% of the longer side tall: what the default screen promises to find."""
    return min(y1 - y0 for _, y0, _, y1 in r.boxes) >= 0.02 * max(r.image.size)


@pytest.fixture(scope="module")
def images():
    return corpus(seed=0)


def test_text_area_is_within_tolerance_of_the_ink_area(ocr, images):
    with_text = [r for r in images if r.boxes]
    assert len(with_text) >= 16
    for r in with_text:
        found = ocr.detect(np.asarray(r.image))
        assert abs(found.area - r.area) <= AREA_TOLERANCE, (r.texts, found.area, r.area)
        if _seen_by_the_screen(r):
            assert len(found.boxes) == len(r.boxes), r.texts
    assert sum(map(_seen_by_the_screen, with_text)) >= 12   # all but the smallest text


def test_without_the_screen_every_line_is_found(images):
    full = Ocr(side=ModelOptions().ocr_side, threads=1)
    for r in images:
        assert len(full.detect(np.asarray(r.image)).boxes) == len(r.boxes), r.texts


def test_images_without_text_score_near_zero(ocr, images):
    empty = [r for r in images if not r.boxes]
    assert len(empty) == 8
    for r in empty:
        found = ocr.detect(np.asarray(r.image))
        assert found.area <= NO_TEXT and len(found.boxes) == 0


def test_recognition_returns_the_rendered_strings_in_reading_order(ocr, images):
    large = [r for r in images if r.boxes and min(y1 - y0 for _, y0, _, y1 in r.boxes) >= 28]
    assert len(large) >= 8 and any("新品上市" in r.texts or "欢迎光临" in r.texts for r in large)
    for r in large:
        out = ocr([np.asarray(r.image)])
        assert out["ocr_text"][0] == " ".join(r.texts)


def test_posters_are_text_heavy_and_photos_are_not(ocr, images):
    threshold = FiltersConfig().text_area_max
    posters = [r for r in images if len(r.boxes) == 6]
    assert posters and all(ocr.detect(np.asarray(r.image)).area > threshold for r in posters)
    assert all(ocr.detect(np.asarray(r.image)).area <= threshold for r in images if len(r.boxes) < 6)


def test_missing_images_get_nulls_and_text_is_cut(images):
    short = Ocr(recognize=True, text_max=4)
    poster = next(r for r in images if len(r.boxes) == 6)
    out = short([None, np.asarray(poster.image)])
    assert np.isnan(out["text_area"][0]) and out["text_boxes"][0] is None and out["ocr_text"][0] is None
    assert out["text_boxes"][1] == 6 and len(out["ocr_text"][1]) == 4


def test_reading_order_is_lines_top_down_then_left_to_right():
    def box(x, y, w=40, h=20):
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32)

    boxes = [box(200, 103), box(10, 100), box(10, 200), box(100, 98)]
    assert reading_order(boxes) == [1, 3, 0, 2]


def test_shipped_models_are_listed_and_verified():
    rows = {r["name"]: r for r in weights.list_weights(ModelOptions(enabled=["ocr"], ocr_recognize=True), verify=True)}
    assert rows["ocr_det"]["checksum"] == rows["ocr_rec"]["checksum"] == "ok"
    assert rows["ocr_det"]["present"] and "rapidocr_onnxruntime" in rows["ocr_det"]["source"]
    assert {"ocr_det", "ocr_rec"} <= {r["name"] for r in weights.check(ModelOptions())}


def test_a_shipped_file_with_another_checksum_is_refused(monkeypatch):
    monkeypatch.setitem(weights.SHIPPED, "ocr_det", replace(weights.SHIPPED["ocr_det"], sha256="0" * 64))
    with pytest.raises(ValueError, match="ch_PP-OCRv4_det_infer.onnx: sha256 .* does not match"):
        Ocr()
    monkeypatch.setitem(weights.SHIPPED, "ocr_det", replace(weights.SHIPPED["ocr_det"], package="no_such_package_x"))
    with pytest.raises(FileNotFoundError, match="no_such_package_x"):
        Ocr()


def test_ocr_text_goes_into_the_caption_only_when_a_template_asks():
    kept = pa.table({"caption_norm": ["一只猫", "海边", None], "ocr_text": ["SALE", None, "OPEN"]})
    assert originals(kept, None) == ["一只猫", "海边", ""]
    assert originals(kept, "{caption} 图中文字：{ocr_text}") == ["一只猫 图中文字：SALE", "海边", " 图中文字：OPEN"]


def test_actor_pools_that_leave_no_cpu_for_scoring_are_refused():
    crowded = Config.model_construct(models=ModelOptions(enabled=["nsfw", "ocr"], ocr_actors=4), score=ScoreConfig())
    with pytest.raises(ConfigError, match="models.ocr_actors"):
        check_room(crowded, True, True, 2.0)
    check_room(crowded, True, False, 2.0)   # without OCR the model actor and one task fit
    demo = Config.model_construct(models=ModelOptions(enabled=["nsfw", "ocr"]), score=ScoreConfig())
    check_room(demo, True, True, 2.0)
