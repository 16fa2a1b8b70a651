"""Image conversion and batched model inputs.

The CPU stage decodes each image once and calls `to_rgb_array`; the model stage only ever sees
RGB uint8 arrays and turns a whole batch into one tensor per tower.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from filters.image import shrink, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
def to_rgb_array(img: Image.Image, short_side: int | None = None) -> np.ndarray:
    """Any PIL mode -> RGB uint8 HxWx3, optionally shrunk so its shorter side is `short_side`.

    The score phase's CPU stage does exactly this (filters.image.to_rgb and shrink) from its one
    decode; the model stage only ever sees such arrays.
    """
    return np.asarray(shrink(to_rgb(img), short_side), dtype=np.uint8)


def _fit(arr: np.ndarray, size: int, mode: str, resample: Image.Resampling, fill: int) -> np.ndarray:
    """One image to size x size: 'shortest' = resize + centre crop, 'squash' = stretch, 'longest' = pad."""
    img = Image.fromarray(arr)
    w, h = img.size
    if mode == "squash":
        return np.asarray(img.resize((size, size), resample))
    if mode == "longest":
        scale = size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        canvas = Image.new("RGB", (size, size), (fill, fill, fill))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return np.asarray(canvas)
    if mode != "shortest":
        raise ValueError(f"unknown resize mode {mode!r}")
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncated, as torchvision's Resize does
    img = img.resize((size, new_long) if w <= h else (new_long, size), resample)
    left = int(round((img.width - size) / 2.0))
    top = int(round((img.height - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def batch_tensor(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float],
                 resize_mode: str = "shortest", interpolation: str = "bicubic", fill: int = 0) -> torch.Tensor:
    """RGB uint8 arrays of any sizes -> one normalised float32 NCHW batch."""
    resample = _RESAMPLE[interpolation]
    stacked = np.stack([_fit(a, size, resize_mode, resample, fill) for a in images])
    x = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _torch_shrink(chw: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 CHW -> HWC uint8, shorter side `short_side` (never enlarged): antialiased bicubic, as
    filters.image.shrink does with PIL, on whatever device the tensor is on."""
    h, w = chw.shape[-2:]
    if min(h, w) > short_side:
        scale = short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = torch.nn.functional.interpolate(chw[None].float(), size=size, mode="bicubic", antialias=True,
                                            align_corners=False)
        chw = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return chw.permute(1, 2, 0)


def _plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """A JPEG in RGB or gray within max_pixels, read from its header only (nothing is decoded)."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        img = Image.open(io.BytesIO(data))
        return img.mode in ("RGB", "L") and img.width * img.height <= max_pixels
    except Exception:
        return False


def decode_views(images: Sequence[bytes | None], short_side: int, device: str,
                 max_pixels: int) -> list[np.ndarray | None]:
    """Model views straight from the stored JPEG bytes (models.gpu_decode): RGB uint8, shorter side
    `short_side`, as the CPU stage's views are.

    On CUDA, torchvision's nvJPEG decoder takes the whole batch at once and the resize runs on the
    GPU; elsewhere the same torch code runs on the CPU (libjpeg-turbo). What it cannot read (PNG,
    CMYK, truncated, over max_pixels) goes through PIL as in the CPU stage; None where that fails too.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from filters.image import decode, shrink

    out: list[np.ndarray | None] = [None] * len(images)
    jpegs = [i for i, data in enumerate(images) if data and _plain_jpeg(data, max_pixels)]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = dict(zip(jpegs, decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)))
        except Exception:   # one bad image fails a batched decode: decode one by one
            for i, data in zip(jpegs, raw):
                try:
                    decoded[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except Exception:
                    pass
    for i, data in enumerate(images):
        if not data:
            continue
        chw = decoded.get(i)
        if chw is not None:
            out[i] = _torch_shrink(chw, short_side).cpu().numpy()
            continue
        try:
            out[i] = np.asarray(shrink(decode(data, short_side, max_pixels)[0], short_side), dtype=np.uint8)
        except Exception:   # its score_error is already the CPU stage's decode error
            out[i] = None
    return out
