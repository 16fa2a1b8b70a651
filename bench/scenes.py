"""Seeded test images for near-duplicate measurements: varied scenes, copies, hard negatives.

No photo corpus ships with the project, so scenes are drawn with the statistics that make
perceptual hashing hard or easy on real photos: a 1/f^a power spectrum (natural images fall
off as about 1/f^2 in power), correlated colour channels, a horizon gradient, soft objects,
and the demo corpus's photo and cartoon generators for the other kinds of content.
Hard negatives: overlapping views of one large scene that share less than half their content,
and flat images of similar colour.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from curate.demo.corpus import cartoon, photo, text_image


def pink_noise(rng: np.random.Generator, h: int, w: int, slope: float) -> np.ndarray:
    """(h, w) noise whose amplitude spectrum falls as 1/f^slope, scaled to zero mean, unit std."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** slope
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(h, w))
    return (field - field.mean()) / (field.std() + 1e-9)


def natural(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A photo-like scene: 1/f texture with correlated channels, a horizon, a few soft objects."""
    slope = float(rng.uniform(0.8, 1.4))
    shared = pink_noise(rng, h, w, slope)
    base = rng.uniform(40, 200, 3)
    arr = np.stack([base[c] + 45 * (0.7 * shared + 0.3 * pink_noise(rng, h, w, slope)) for c in range(3)], -1)
    if rng.random() < 0.6:                       # sky above, ground below
        horizon = rng.uniform(0.2, 0.8) * h
        ramp = np.clip((np.arange(h)[:, None] - horizon) / (0.1 * h), -1, 1)
        arr += ramp[..., None] * rng.uniform(-50, 50, 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))


def scene(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """One of the kinds above, chosen by the seed: mostly natural scenes, some demo photos and cartoons."""
    roll = rng.random()
    if roll < 0.7:
        return natural(rng, h, w)
    return (photo if roll < 0.9 else cartoon)(rng, h, w)


def flat(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> Image.Image:
    """A near-flat image of about `colour`: a faint gradient and faint grain, as plain backdrops are."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0, 12)
    arr = colour[None, None, :] + rng.uniform(-8, 8, 3) + ramp + rng.normal(0, rng.uniform(0.5, 3), (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def views_of_one_scene(rng: np.random.Generator, n: int, side: int, overlap: float) -> list[Image.Image]:
    """n views of one wide scene, side x side each, neighbours sharing `overlap` of their width."""
    step = max(1, round(side * (1 - overlap)))
    wide = natural(rng, side, side + step * (n - 1))
    return [wide.crop((i * step, 0, i * step + side, side)) for i in range(n)]


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# -- transforms: each takes (image, rng) and returns an image -------------------------------------

def _crop(img: Image.Image, rng: np.random.Generator, where: str) -> Image.Image:
    """Crop away up to 5% of each side's length: centred, from one side, or from one corner."""
    share = float(rng.uniform(0.01, 0.05))
    dx, dy = round(img.width * share), round(img.height * share)
    if where == "centred":
        box = (dx // 2, dy // 2, img.width - (dx - dx // 2), img.height - (dy - dy // 2))
    elif where == "side":
        side = int(rng.integers(0, 4))
        box = [(dx, 0, img.width, img.height), (0, 0, img.width - dx, img.height),
               (0, dy, img.width, img.height), (0, 0, img.width, img.height - dy)][side]
    else:
        corner = int(rng.integers(0, 4))
        box = [(dx, dy, img.width, img.height), (0, dy, img.width - dx, img.height),
               (dx, 0, img.width, img.height - dy), (0, 0, img.width - dx, img.height - dy)][corner]
    return img.crop(box)


def _resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = float(rng.uniform(0.5, 2.0))
    return img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.Resampling.BICUBIC)


def _tone(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.9, 1.1)))
    return img


def _jpeg_quality(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return Image.open(io.BytesIO(jpeg(img, int(rng.integers(30, 96))))).convert("RGB")


def _mirror(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


Transform = Callable[[Image.Image, np.random.Generator], Image.Image]
SINGLE: dict[str, Transform] = {
    "jpeg_q30_95": _jpeg_quality,
    "resize_0.5_2x": _resize,
    "tone_10pct": _tone,
    "crop_centred_5pct": lambda img, rng: _crop(img, rng, "centred"),
    "crop_side_5pct": lambda img, rng: _crop(img, rng, "side"),
    "crop_corner_5pct": lambda img, rng: _crop(img, rng, "corner"),
    "mirror": _mirror,
}
PAIRS = [("crop_side_5pct", "mirror"), ("crop_corner_5pct", "jpeg_q30_95"), ("crop_centred_5pct", "resize_0.5_2x"),
         ("mirror", "tone_10pct"), ("resize_0.5_2x", "jpeg_q30_95"), ("crop_corner_5pct", "mirror"),
         ("tone_10pct", "crop_side_5pct")]
TRANSFORMS: dict[str, Transform] = {
    **SINGLE,
    **{f"{a}+{b}": (lambda img, rng, a=a, b=b: SINGLE[b](SINGLE[a](img, rng), rng)) for a, b in PAIRS},
}


def is_geometric(name: str) -> bool:
    """Crops and mirrors: the transforms a single hash cannot see (goal: recall >= 0.97, else 0.99)."""
    return "crop" in name or "mirror" in name


# -- a labelled set for the graphic score: drawn kinds against photo-like ones --------------------

def illustration(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Flat-shaded polygons over a two-colour gradient, as vector illustrations and posters are."""
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
        draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def render(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Lambert-shaded spheres on a smooth floor, noise-free: what a simple 3D render looks like."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.broadcast_to((rng.uniform(60, 200, 3) * (0.6 + 0.4 * yy[..., None] / h)), (h, w, 3)).copy()
    light = rng.normal(size=3)
    light = np.abs(light) / np.linalg.norm(light)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(h, w)
        dx, dy = (xx - cx) / r, (yy - cy) / r
        inside = dx ** 2 + dy ** 2 < 1
        dz = np.sqrt(np.clip(1 - dx ** 2 - dy ** 2, 0, 1))
        shade = np.clip(dx * light[0] + dy * light[1] + dz * light[2], 0.1, 1)
        arr[inside] = (rng.uniform(80, 255, 3)[None, :] * shade[inside][:, None])
    return Image.fromarray(arr.astype(np.uint8)).filter(ImageFilter.SMOOTH)


def screenshot(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """An app screen: a title bar, panels, buttons and lines of text on a light background."""
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w, 24), fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(30, h - 30))
        draw.rectangle((x0, y0, x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(15, 60))),
                       fill=tuple(int(c) for c in rng.integers(150, 256, 3)), outline=(90, 90, 90))
    for y in range(34, h - 10, 16):
        words = "".join(chr(int(c)) for c in rng.integers(97, 123, size=int(rng.integers(10, 50))))
        draw.text((int(rng.integers(4, 30)), y), words, fill=(30, 30, 30))
    return img


def grainy(make: Callable) -> Callable:
    """A photo generator with sensor grain added, as camera JPEGs carry."""
    def draw(rng: np.random.Generator, h: int, w: int) -> Image.Image:
        arr = np.asarray(make(rng, h, w), np.float32) + rng.normal(0, rng.uniform(1.5, 4), (h, w, 1))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return draw


# kind -> (generator, true coarse label)
LABELLED: dict[str, tuple[Callable, str]] = {
    "natural": (natural, "photo"), "natural_grain": (grainy(natural), "photo"), "demo_photo": (photo, "photo"),
    "cartoon": (cartoon, "graphic"), "text_image": (text_image, "graphic"),
    "illustration": (illustration, "graphic"), "render": (render, "graphic"), "screenshot": (screenshot, "graphic"),
}

