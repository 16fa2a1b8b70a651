"""Image metrics: one decode per image, every mode handled, failures recorded per row."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate.demo.corpus import bomb_png, photo
from filters.image import aspect_ratio, edge_density, entropy, image_columns, shrink, to_rgb
from filters.multihash import VIEWS, view_hashes


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_entropy_separates_flat_from_textured():
    flat = np.full((64, 64), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert entropy(flat) == 0.0
    assert entropy(noise) > 7.9
    assert entropy(np.tile([0, 255], (64, 32)).astype(np.uint8)) == pytest.approx(1.0)


def test_edge_density_counts_strong_gradients_only():
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::2] = 255
    assert edge_density(stripes) > 0.9
    assert edge_density(np.full((64, 64), 9, np.uint8)) == 0.0
    assert edge_density(np.zeros((1, 50), np.uint8)) == 0.0


def test_phash_survives_reencoding_but_not_a_different_image():
    rng = np.random.default_rng(3)
    a, b = photo(rng, 400, 600), photo(rng, 400, 600)
    reenc = Image.open(io.BytesIO(_encode(a, quality=40)))
    def dist(x, y) -> int:
        hx, hy = (int(view_hashes(np.asarray(i.convert("L")), VIEWS[:1])[0]) for i in (x, y))
        return bin(hx ^ hy).count("1")

    assert dist(a, reenc) <= 4
    assert dist(a, b) > 12


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "1", "LA"])
def test_every_mode_becomes_rgb(mode):
    base = photo(np.random.default_rng(1), 60, 80)
    img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257) if mode == "I;16" else base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (80, 60)
    if mode == "I;16":  # scaled by range, not clipped to white
        assert 0 < np.asarray(rgb).mean() < 250


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_image_columns_records_failures_per_row():
    good = _encode(photo(np.random.default_rng(2), 300, 500))
    cols, views = image_columns([good, b"not an image", None, bomb_png(4000)], decode_side=256,
                                max_pixels=10_000_000, model_side=64)
    assert cols["score_error"][0] is None and cols["entropy"][0] > 5
    assert cols["jpeg_bpp"][0] == pytest.approx(8 * len(good) / (500 * 300))
    assert 0 <= cols["phash"][0] < 2 ** 64 and len(cols["phash_views"][0]) == len(VIEWS) - 1
    assert 0 <= cols["graphic"][0] <= 0.35 and cols["graphic"][1] is None
    assert cols["score_error"][1].startswith("decode error")
    assert cols["score_error"][2] is None and cols["entropy"][2] is None  # nothing downloaded: no metric
    assert "over the limit" in cols["score_error"][3]
    assert views[0].shape == (64, 107, 3) and views[1] is None


def test_shrink_never_enlarges():
    img = Image.new("RGB", (100, 50))
    assert shrink(img, 200).size == (100, 50)
    assert shrink(img, 25).size == (50, 25)


def test_aspect_ratio_handles_missing_sides():
    r = aspect_ratio(np.array([100, 10, np.nan, 0]), np.array([50, 100, 5, 5]))
    assert r[0] == 2 and r[1] == 10 and np.isnan(r[2]) and np.isnan(r[3])
