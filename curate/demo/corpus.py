"""A deterministic synthetic corpus that is as nasty as a web crawl.

Every sample is an (image file or server behaviour, caption) pair with a `kind` label, so
tests can check that each kind of trouble ends as a manifest row with a status and a reason.
Images are drawn with numpy and PIL only; nothing is downloaded.
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Kinds served as files, and kinds that are server behaviours (no file).
SERVER_KINDS = ("http_404", "http_500", "html_page", "slow")

# Share of each kind in the corpus; the rest are photos.
MIX: dict[str, float] = {
    "cartoon": 0.12,
    "text_image": 0.04,
    "tiny": 0.03,
    "extreme_aspect": 0.02,
    "exact_dup": 0.04,
    "near_dup": 0.05,
    "watermarked": 0.03,
    "grayscale": 0.02,
    "cmyk": 0.01,
    "rgba_png": 0.02,
    "palette_gif": 0.01,
    "animated_gif": 0.01,
    "png16": 0.01,
    "truncated": 0.01,
    "corrupt": 0.01,
    "http_404": 0.01,
    "http_500": 0.01,
    "html_page": 0.01,
    "slow": 0.003,
}
# One of each rare kind is always present, however small the corpus.
ALWAYS_ONCE = ("bomb", "strip_1x6000")

SUBJECTS = ["一只橘猫", "西湖的断桥", "雪山下的村庄", "一碗热气腾腾的牛肉面", "穿汉服的女孩", "城市夜景",
            "秋天的银杏树", "海边的灯塔", "熊猫在吃竹子", "古镇的石板路", "草原上的骏马", "樱花盛开的公园"]
SUBJECTS_TRAD = ["一隻橘貓", "西湖的斷橋", "雪山下的村莊", "城市夜景與霓虹燈", "秋天的銀杏樹", "海邊的燈塔"]
STYLES = ["高清摄影", "风景照片", "水彩插画", "卡通风格", "写实风格", "航拍视角"]
BOILERPLATE = ["图片来源网络，侵删", "点击查看大图", "版权归原作者所有", "高清壁纸下载"]
ENGLISH = ["a cat sleeping on a sofa", "sunset over the mountains", "IMG_2031.JPG", "DSC00012"]
EMOJI = ["😀", "🌸", "🐼", "🔥"]


@dataclass(frozen=True)
class Sample:
    name: str      # file name under the served folder (or behaviour name)
    kind: str
    caption: str | None


def _caption(rng: random.Random) -> str | None:
    """A caption drawn from the mix a Chinese crawl shows: mostly fine, often dirty."""
    roll = rng.random()
    subject = rng.choice(SUBJECTS)
    style = rng.choice(STYLES)
    if roll < 0.55:
        return f"{subject}，{style}"
    if roll < 0.65:
        return f"{rng.choice(SUBJECTS_TRAD)}，高清攝影"
    if roll < 0.70:
        return f"{subject}&nbsp;&amp;&nbsp;{style} <b>精选</b>"
    if roll < 0.74:
        return f"{subject} 详情见 https://example.com/p/{rng.randint(1, 9999)}"
    if roll < 0.78:
        return f"{subject}{rng.choice(EMOJI)}{rng.choice(EMOJI)}"
    if roll < 0.82:
        return f"{subject} {rng.choice(BOILERPLATE)}"
    if roll < 0.87:
        return rng.choice(ENGLISH)
    if roll < 0.90:
        return rng.choice(["", None, "   "])
    if roll < 0.92:
        return (subject + "，" + style + "。") * 200
    if roll < 0.95:
        return "哈" * 30
    return f"ＡＢＣ１２３ {subject}！！！！"


def photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Photo-like: broad colour regions, finer detail and grain, and a few soft-edged objects."""
    cells = int(rng.integers(24, 64))
    broad = Image.fromarray(rng.integers(0, 256, size=(int(rng.integers(3, 8)),) * 2 + (3,), dtype=np.uint8))
    broad = np.asarray(broad.resize((cells, cells), Image.BICUBIC), dtype=np.float32)
    detail = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.float32)
    small = Image.fromarray((0.7 * broad + 0.3 * detail).astype(np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BICUBIC)).copy()
    arr += rng.integers(0, 16, size=(h, w, 1), dtype=np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 3))), y0 + int(rng.integers(10, max(11, h // 3)))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.SMOOTH)


def cartoon(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Flat colours, hard black outlines, nothing else: what cartoons look like to a metric."""
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(120, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2 + 21)), y0 + int(rng.integers(20, h // 2 + 21)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill, outline=(0, 0, 0), width=4)
    return img


def text_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A screenshot-like page of text lines (Pillow's built-in scalable font: Latin only)."""
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(18, 34))
    font = ImageFont.load_default(size)
    for y in range(size // 2, h - size, int(size * 1.5)):
        words = " ".join("".join(chr(int(c)) for c in rng.integers(65, 91, size=int(rng.integers(2, 9))))
                         for _ in range(int(rng.integers(3, 10))))
        draw.text((size // 2, y), words, fill=(20, 20, 20), font=font)
    return img


def watermark(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Overlay a tiled, semi-transparent stamp, the way stock sites mark their images."""
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for y in range(0, img.height, 60):
        for x in range(0, img.width, 140):
            draw.text((x + (y // 60) % 2 * 40, y), "SAMPLE © stock", fill=(255, 255, 255, 140))
    return Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")


def bomb_png(side: int = 20000) -> bytes:
    """A few hundred KB of PNG that claims side x side pixels: decoding it would take gigabytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(6)
    row = b"\x00" * (side + 1)  # filter byte + one gray byte per pixel
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _size(rng: np.random.Generator, lo: int = 256, hi: int = 768) -> tuple[int, int]:
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def _plan(n: int, rng: random.Random) -> list[str]:
    kinds = list(ALWAYS_ONCE)
    for kind, share in MIX.items():
        kinds += [kind] * max(1, round(share * n))
    kinds = kinds[:n]
    kinds += ["photo"] * (n - len(kinds))
    rng.shuffle(kinds)
    # Duplicates need an original drawn earlier: move them after the first photo.
    first_photo = kinds.index("photo") if "photo" in kinds else None
    if first_photo is None:
        return [k if k not in ("exact_dup", "near_dup") else "photo" for k in kinds]
    head = [k for k in kinds[: first_photo + 1] if k not in ("exact_dup", "near_dup")]
    moved = [k for k in kinds[: first_photo + 1] if k in ("exact_dup", "near_dup")]
    return head + moved + kinds[first_photo + 1:]


def _near_copy(rng: np.random.Generator, data: bytes) -> bytes:
    """Re-encoded, resized or slightly cropped copy of an earlier JPEG."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    how = rng.integers(0, 3)
    if how == 1:
        f = float(rng.uniform(0.6, 0.9))
        img = img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))), Image.LANCZOS)
    elif how == 2:
        dx, dy = int(img.width * 0.02), int(img.height * 0.02)
        img = img.crop((dx, dy, img.width - dx, img.height - dy))
    return _encode(img, "JPEG", quality=int(rng.integers(60, 80)))


def render(kind: str, rng: np.random.Generator, originals: list[bytes]) -> tuple[bytes, str]:
    """Bytes and file extension for one sample of the given kind."""
    if kind == "photo":
        return _encode(photo(rng, *_size(rng)), "JPEG", quality=int(rng.integers(80, 95))), "jpg"
    if kind == "cartoon":
        fmt, ext = ("PNG", "png") if rng.random() < 0.5 else ("JPEG", "jpg")
        return _encode(cartoon(rng, *_size(rng)), fmt), ext
    if kind == "text_image":
        return _encode(text_image(rng, *_size(rng)), "PNG"), "png"
    if kind == "tiny":
        return _encode(photo(rng, *_size(rng, 24, 120)), "JPEG", quality=90), "jpg"
    if kind == "extreme_aspect":
        return _encode(photo(rng, 120, 1400), "JPEG", quality=90), "jpg"
    if kind == "strip_1x6000":
        return _encode(Image.new("RGB", (6000, 1), (128, 64, 32)), "PNG"), "png"
    if kind == "exact_dup":
        return originals[int(rng.integers(0, len(originals)))], "jpg"
    if kind == "near_dup":
        return _near_copy(rng, originals[int(rng.integers(0, len(originals)))]), "jpg"
    if kind == "watermarked":
        return _encode(watermark(rng, photo(rng, *_size(rng))), "JPEG", quality=90), "jpg"
    if kind == "grayscale":
        return _encode(photo(rng, *_size(rng)).convert("L"), "JPEG", quality=90), "jpg"
    if kind == "cmyk":
        return _encode(photo(rng, *_size(rng)).convert("CMYK"), "JPEG", quality=90), "jpg"
    if kind == "rgba_png":
        img = photo(rng, *_size(rng)).convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(img.size))
        return _encode(img, "PNG"), "png"
    if kind == "palette_gif":
        return _encode(cartoon(rng, *_size(rng)).convert("P", palette=Image.ADAPTIVE), "GIF"), "gif"
    if kind == "animated_gif":
        frames = [cartoon(rng, 300, 300).convert("P", palette=Image.ADAPTIVE) for _ in range(3)]
        return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "gif"
    if kind == "png16":
        arr = (np.asarray(photo(rng, *_size(rng)).convert("L"), dtype=np.uint16) * 257)
        return _encode(Image.fromarray(arr), "PNG"), "png"
    if kind == "bomb":
        return bomb_png(), "png"
    if kind == "truncated":
        data = _encode(photo(rng, *_size(rng)), "JPEG", quality=90)
        return data[: len(data) // 3], "jpg"
    if kind == "corrupt":
        return rng.bytes(int(rng.integers(500, 5000))), "jpg"
    raise ValueError(f"unknown kind {kind!r}")


def generate(folder: Path, n: int = 2000, seed: int = 0) -> list[Sample]:
    """Write the corpus's files under `folder` and return its samples, in manifest order."""
    folder.mkdir(parents=True, exist_ok=True)
    prng = random.Random(seed)
    rng = np.random.default_rng(seed)
    originals: list[bytes] = []
    samples = []
    for i, kind in enumerate(_plan(n, prng)):
        caption = _caption(prng)
        if kind in SERVER_KINDS:
            samples.append(Sample(f"{kind}_{i:06d}", kind, caption))
            continue
        data, ext = render(kind, rng, originals)
        if kind == "photo":
            originals.append(data)
        name = f"{i:06d}.{ext}"
        (folder / name).write_bytes(data)
        samples.append(Sample(name, kind, caption))
    return samples
