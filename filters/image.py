"""Image metrics over a batch, from one decode per image.

Each image is decoded once, at reduced size when the format allows it (JPEG draft mode),
and every metric and the model input are derived from that single decode: per-metric
decoding is the main cost of per-filter libraries.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from filters.declare import Column, Scorer
from filters.graphic import graphic_score
from filters.multihash import VIEWS, view_hashes

METRIC_SIDE = 256          # gray image side for entropy, edges and the hashes: enough, and cheap
EDGE_THRESHOLD = 32.0      # gradient magnitude (0..~360) that counts as an edge


def _decode_keys(cfg) -> tuple[str, ...]:
    """The metrics come from one decode at max(score.decode_size, the model view's side)."""
    views = any(s in cfg.models.enabled for s in ("clip_score", "aesthetic", "nsfw", "watermark", "style"))
    larger = views and not cfg.models.gpu_decode and cfg.models.image_size > cfg.score.decode_size
    return ("score.decode_size", "download.max_pixels", *(("models.image_size",) if larger else ()))


SCORER = Scorer(
    "image", optional=False, stage="cpu", reads=("image",), keys=_decode_keys,
    doc="image metrics from one decode per image: texture, perceptual hashes, how drawn it looks",
    columns=(
        Column("score_error", pa.string(), "why scoring this row failed (decode error, ...), null otherwise"),
        Column("aspect_ratio", pa.float32(), "max(w, h) / min(w, h) of the original image"),
        Column("entropy", pa.float32(), "Shannon entropy of the gray-level histogram, bits (0..8)"),
        Column("edge_density", pa.float32(), "share of pixels on a strong gradient (texture)"),
        Column("jpeg_bpp", pa.float32(), "stored JPEG bits per pixel"),
        Column("phash", pa.uint64(), "64-bit DCT perceptual hash of the whole image (filters/multihash.py)"),
        Column("phash_views", pa.list_(pa.uint64(), len(VIEWS) - 1),
               "64-bit DCT hashes of the other views, in the order of filters.multihash.VIEWS[1:]: the mirror, "
               "then windows at 96% and 92% of each side anchored at the four corners and the centre"),
        Column("graphic", pa.float32(), "0..1, how drawn the image looks (flat share, palette; filters/graphic.py)"),
    ))
# What image_columns computes per image (aspect_ratio comes from the sizes the download recorded).
IMAGE_COLUMNS = tuple(c for c in SCORER.column_names if c != "aspect_ratio")


_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth gray ('I;16*', 'I', 'F') to 'L', scaled by its value range instead of clipped."""
    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 255.0 / top)
    else:
        scale = 1.0 if top <= 255 else (255.0 / 65535.0 if top <= 65535 else 255.0 / top)
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: transparency composited on white, CMYK and 16-bit converted."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in _TRANSPARENT_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def shrink(img: Image.Image, short_side: int | None) -> Image.Image:
    """Downsize (never enlarge) so the shorter side is `short_side` pixels."""
    if not short_side or min(img.size) <= short_side:
        return img
    scale = short_side / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def decode(data: bytes, max_side: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode once, no larger than needed (JPEG draft picks a DCT scale at or above max_side).

    Returns the RGB image and the stored size, read from the header before any reduction.
    """
    img = Image.open(io.BytesIO(data))
    size = img.size
    if size[0] * size[1] > max_pixels:
        raise ValueError(f"image claims {size[0]}x{size[1]} pixels, over the limit")
    if img.format == "JPEG":
        img.draft("RGB", (max_side, max_side))
    return to_rgb(img), size


def entropy(gray: np.ndarray) -> float:
    """Shannon entropy of the gray-level histogram in bits: flat images score near 0, photos 6-8."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def edge_density(gray: np.ndarray) -> float:
    """Share of pixels whose gradient magnitude exceeds EDGE_THRESHOLD: texture, not colour."""
    g = gray.astype(np.float32)
    if g.shape[0] < 2 or g.shape[1] < 2:
        return 0.0
    gx = g[:-1, 1:] - g[:-1, :-1]
    gy = g[1:, :-1] - g[:-1, :-1]
    return float((np.hypot(gx, gy) > EDGE_THRESHOLD).mean())


def image_columns(images: Sequence[bytes | None], *, decode_side: int, max_pixels: int,
                  model_side: int | None = None) -> tuple[dict[str, list], list[np.ndarray | None]]:
    """Metrics for each image (None where it failed or is absent) and, if asked, model views.

    A failure in one row is that row's `score_error`; it never raises.
    """
    cols: dict[str, list] = {c: [] for c in IMAGE_COLUMNS}
    views: list[np.ndarray | None] = []
    for data in images:
        row = dict.fromkeys(IMAGE_COLUMNS)
        view = None
        if data is not None:
            try:
                rgb, (stored_w, stored_h) = decode(data, decode_side, max_pixels)
                gray_img = rgb.convert("L")
                gray_img.thumbnail((METRIC_SIDE, METRIC_SIDE), Image.BILINEAR)
                gray = np.asarray(gray_img)
                hashes = view_hashes(gray)
                row.update(entropy=entropy(gray), edge_density=edge_density(gray),
                           jpeg_bpp=8.0 * len(data) / (stored_w * stored_h),
                           phash=int(hashes[0]), phash_views=hashes[1:].tolist(),
                           graphic=graphic_score(rgb, gray))
                if model_side:
                    view = np.asarray(shrink(rgb, model_side), dtype=np.uint8)
            except Exception as exc:  # a bad image is a row's error, never the batch's
                row = dict.fromkeys(IMAGE_COLUMNS)
                row["score_error"] = f"decode error: {exc}"[:500]
        for c in IMAGE_COLUMNS:
            cols[c].append(row[c])
        views.append(view)
    return cols, views


def model_views(images: Sequence[bytes | None], *, decode_side: int, max_pixels: int,
                model_side: int) -> list[np.ndarray | None]:
    """The model view of each image alone, from the same decode image_columns makes: what a re-score of
    the model scorers needs when the metrics are up to date. None where there is no image or it fails."""
    views: list[np.ndarray | None] = []
    for data in images:
        try:
            views.append(np.asarray(shrink(decode(data, decode_side, max_pixels)[0], model_side), dtype=np.uint8)
                         if data is not None else None)
        except Exception:   # the row's score_error, from the metrics' decode, already says why
            views.append(None)
    return views


def aspect_ratio(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """max/min side; NaN where a side is unknown or zero."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(w, h) / np.minimum(w, h)
    return np.where(np.isfinite(ratio), ratio, np.nan).astype(np.float32)
