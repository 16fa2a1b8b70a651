"""models.gpu_decode: model views decoded from the stored bytes (nvJPEG on CUDA; here its CPU fallback)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.demo.corpus import photo
from filters.image import image_columns
from filters.models.images import decode_views

SIDE, MAX_PIXELS = 256, 100_000_000


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _images() -> list[bytes | None]:
    rng = np.random.default_rng(3)
    photos = [_jpeg(photo(rng, h, w)) for h, w in ((512, 768), (1024, 600), (300, 300), (200, 640))]
    gray = _jpeg(photo(rng, 400, 500).convert("L"))
    cmyk = _jpeg(photo(rng, 400, 300).convert("CMYK"))          # nvJPEG's RGB mode is not PIL's: PIL path
    png = io.BytesIO()
    photo(rng, 350, 420).save(png, "PNG")
    return [*photos, gray, cmyk, png.getvalue(), photos[0][:300], None]


def test_cpu_fallback_gives_the_cpu_stages_views_within_tolerance():
    images = _images()
    _, expected = image_columns(images, decode_side=SIDE, max_pixels=MAX_PIXELS, model_side=SIDE)
    got = decode_views(images, SIDE, "cpu", MAX_PIXELS)
    assert [g is None for g in got] == [e is None for e in expected] == [False] * 7 + [True, True]
    for g, e in zip(got[:7], expected[:7]):
        assert g.dtype == np.uint8 and g.shape == e.shape and min(g.shape[:2]) == min(SIDE, min(e.shape[:2]))
        diff = np.abs(g.astype(np.int16) - e.astype(np.int16))
        # the CPU stage decodes at a reduced DCT scale (JPEG draft) before its resize, this path decodes
        # in full: under a level on average here (0.0-0.8), never a different picture
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12, (g.shape, diff.mean(), np.percentile(diff, 99))


def test_images_over_the_pixel_limit_are_never_decoded():
    big = _jpeg(Image.new("RGB", (3000, 2000), (10, 200, 30)))
    assert decode_views([big], SIDE, "cpu", max_pixels=1_000_000) == [None]


def test_model_stage_decodes_its_own_views_and_keeps_the_bytes_for_ocr(tiny_tower):
    from curate.config import validate
    from curate.phases.score.phase import ModelStage, score_cpu

    models = {"enabled": ["clip_score", "aesthetic", "style"], "weights": "random", "clip_backend": "open_clip",
              "clip_model": tiny_tower, "l14_model": tiny_tower, "gpu_decode": True}   # one shared tower
    cfg = validate({"run_dir": "runs/x", "input": {"paths": ["x.parquet"]}, "models": models})
    images = _images()
    n = len(images)
    raw = {"key": np.array([f"00000_{i:06d}" for i in range(n)], dtype=object),
           "shard": np.array(["00000"] * n, dtype=object), "caption": np.array(["一只猫"] * n, dtype=object),
           "status": np.array(["success"] * n, dtype=object), "original_width": np.full(n, 500.0),
           "original_height": np.full(n, 400.0), "_image": np.array(images + [None], dtype=object)[:-1],
           "_shard_error": np.array([""] * n, dtype=object)}
    batch = score_cpu(raw, cfg, None, keep_image=True)      # run_score's CPU stage with gpu_decode: no _view
    assert "_view" not in batch.column_names
    first = ModelStage(cfg, device="cpu")
    out = first(batch)
    assert "_image" in out.column_names or "ocr" not in cfg.models.enabled
    scores = out.column("aesthetic").to_numpy(zero_copy_only=False)
    assert np.isfinite(scores[:7]).all() and np.isnan(scores[7:]).all()   # truncated and missing: no view
    with_ocr = cfg.model_copy(update={"models": cfg.models.model_copy(update={"enabled": [*models["enabled"], "ocr"]})})
    stage = ModelStage(with_ocr, device="cpu", scorer=first.scorer)
    assert stage.consumed is None and isinstance(stage(batch), pa.Table)
