"""Images with text whose boxes are known: the ground truth of the OCR tests and benchmark.

Text is drawn with Noto Sans CJK SC (SIL Open Font License), which the `mplfonts` wheel in the
test extras ships; Latin and Chinese both render with it. Backgrounds are plain or photo-like
(smooth gradients plus shapes and noise), so detection is tested against texture, not only paper.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CHINESE = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少", "欢迎光临", "限时特价", "新品上市"]
LATIN = ["OPEN", "SALE 50%", "Hello World", "CURATE", "Made in 2026"]


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    import mplfonts

    path = os.path.join(os.path.dirname(mplfonts.__file__), "fonts", "NotoSansCJKsc-Regular.otf")
    return ImageFont.truetype(path, size)


@dataclass
class Rendered:
    image: Image.Image
    texts: list[str]        # in reading order
    boxes: list[tuple[int, int, int, int]]   # ink bounding boxes (x0, y0, x1, y1)

    @property
    def area(self) -> float:
        """Share of the image inside the union of the ink boxes."""
        cover = np.zeros((self.image.height, self.image.width), bool)
        for x0, y0, x1, y1 in self.boxes:
            cover[y0:y1, x0:x1] = True
        return float(cover.mean())


def background(rng: np.random.Generator, w: int, h: int, photo: bool) -> Image.Image:
    if not photo:
        shade = int(rng.integers(200, 256))
        return Image.new("RGB", (w, h), (shade, shade, shade))
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([120 + 100 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in rng.uniform(0, 3, 3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(w // 10, w // 3)), y0 + int(rng.integers(h // 10, h // 3)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(40, 220, 3)))
    return img.filter(ImageFilter.GaussianBlur(2))


def render(rng: np.random.Generator, w: int, h: int, lines: list[tuple[str, int, tuple[int, int]]],
           photo: bool = False) -> Rendered:
    """Draw each (text, size, (x, y)) on a background; dark text on light ground, light on dark photo areas."""
    img = background(rng, w, h, photo)
    draw = ImageDraw.Draw(img)
    boxes = []
    for text, size, (x, y) in lines:
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font(size))
        if photo:  # a solid plate behind the text, as posters and overlays have
            draw.rectangle((x0 - size // 4, y0 - size // 4, x1 + size // 4, y1 + size // 4), fill=(250, 250, 240))
        draw.text((x, y), text, font=font(size), fill=(15, 15, 15))
        boxes.append((x0, y0, x1, y1))
    return Rendered(img, [t for t, _, _ in lines], boxes)


def layout(rng: np.random.Generator, w: int, h: int, n_lines: int, size: int, words: list[str]) -> list:
    """n lines of `size`-pixel text stacked from a random top-left, each a random word."""
    x = int(rng.integers(w // 20, w // 4))
    y = int(rng.integers(h // 20, max(h // 20 + 1, h - n_lines * size * 1.6)))
    return [(str(rng.choice(words)), size, (x, int(y + i * size * 1.6))) for i in range(n_lines)]


def corpus(seed: int = 0) -> list[Rendered]:
    """The OCR test set: Chinese and Latin, sizes 16-96 px, several positions, plain and photo grounds,
    posters full of text, and the same backgrounds with no text at all."""
    rng = np.random.default_rng(seed)
    out = []
    for photo in (False, True):
        for words in (CHINESE, LATIN):
            for size, n in ((16, 3), (32, 2), (64, 1), (96, 1)):
                w, h = int(rng.integers(600, 900)), int(rng.integers(450, 700))
                out.append(render(rng, w, h, layout(rng, w, h, n, size, words), photo))
        w, h = 800, 600   # a poster: text over most of the image
        out.append(render(rng, w, h, [(CHINESE[i % len(CHINESE)] * 2, 56, (30, 20 + i * 90)) for i in range(6)], photo))
        for _ in range(4):
            out.append(render(rng, int(rng.integers(500, 900)), int(rng.integers(400, 700)), [], photo))
    return out
