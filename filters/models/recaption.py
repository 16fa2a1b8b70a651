"""Recaptioning with a Chinese vision-language model: options, prompt, cache key, engine, weights.

Pure model code (no Ray, no run files): the recaption phase (curate/phases/recaption/) builds an
`Engine` once per actor and hands it decoded images with their prompts. One engine ships:
Hugging Face transformers `generate`, which loads any image-text-to-text model in the Hugging Face
layout (Qwen2-VL by default; Qwen2.5-VL and others through the same `AutoModelForImageTextToText`)
from a local directory: `curate models pull` puts the hub's files there and records their sha256,
which loading verifies; nothing is downloaded at run time.

A second engine (vLLM through Ray Data's LLM processor, `ray.data.llm`) plugs in behind `Engine`
and `ENGINES` once a GPU is lent to test it; no code for it ships before a test can run it.

`models.weights: random` builds the same architecture at a tiny size with random weights and a
tokenizer made here in the real file format (tokenizer.json, the Qwen2-VL special tokens, a chat
template), saves it in the Hugging Face layout and loads it back through the same local-directory
path, so the real loading code runs in the tests. Its captions are random characters.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from PIL import Image

    from filters.models.options import ModelOptions

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"   # Apache-2.0
DEFAULT_PROMPT = (
    "请用中文详细、忠实地描述这张图片。依次写出：画面的主体是什么；主体的属性（颜色、形状、材质、数量、动作、表情）；"
    "所处的场景和环境；画面的风格（照片、插画、动漫、水墨、三维渲染等）；构图、视角和光线。"
    "如果图中有可见的文字，请用引号原样写出这些文字。只写图中真实可见的内容，不要猜测，不要写与图片无关的话。")
DEFAULT_OCR_HINT = "提示：文字识别在图中读到了以下文字（可能有误，请以图片为准）：{ocr_text}"
HUB_FOLDER = "hf"   # hub models live under <models_dir>/hf/<org>--<name>
ENGINES = ("transformers",)
MODEL_ERROR = "model:"   # how a row's error starts when the engine raised on it (maybe transient: never cached)


class RecaptionOptions(BaseModel):
    """The recaption phase: which model writes the captions, with which prompt and generation settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description=(
        "recaption the kept rows with a vision-language model (the recaption phase, between decide and write); "
        "the captions go into the manifest's and the samples' `recaption`"))
    model: str = Field(DEFAULT_MODEL, description=(
        "Hugging Face repo id (fetched by `curate models pull` into <models.models_dir>/hf/<org>--<name>) or a "
        "local directory in the Hugging Face layout; any image-text-to-text model transformers loads "
        "(Qwen2-VL, Qwen2.5-VL, ...)"))
    revision: str = Field("main", description="hub revision `curate models pull` fetches (a commit pins it)")
    engine: Literal[ENGINES] = Field("transformers", description=(
        "inference engine: transformers (`generate`); vLLM through ray.data.llm is the planned second engine"))
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="weights dtype on CUDA; auto = bf16 where supported else fp16; CPU always fp32")
    batch_size: int = Field(8, ge=1, description="images per generate call (a failing batch is retried row by row)")
    image_side: int = Field(448, ge=56, description=(
        "longer side of the image given to the model (never enlarged); Qwen2-VL spends one token per 28x28 "
        "pixels, so 448 is at most 256 image tokens"))
    max_new_tokens: int = Field(160, ge=1, description="most tokens generated per caption")
    repetition_penalty: float = Field(1.05, ge=1.0, description="transformers' repetition penalty (greedy decoding)")
    prompt: str = Field(DEFAULT_PROMPT, min_length=1, description="the instruction given with each image")
    ocr_hint: str | None = Field(DEFAULT_OCR_HINT, description=(
        "appended to the prompt where OCR read text (models.ocr_recognize), with {ocr_text}; null: never"))
    max_chars: int = Field(500, ge=1, description=(
        "a recaption longer than this (normalised) is rejected; the other caption rules (text.min_chars, "
        "text.min_zh_ratio, text.max_repeat_ratio, the blocklist) apply as to the original captions"))
    num_actors: int = Field(1, ge=1, description="recaption actors (each loads the model once)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per recaption actor; 0 runs on CPU")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per recaption actor")
    flush_rows: int = Field(64, ge=1, description=(
        "captions generated between two writes of a shard's cache: at most this much work is lost to a kill"))

    @field_validator("ocr_hint")
    @classmethod
    def _hint_template(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.format(ocr_text="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template may use only {{ocr_text}}: {exc!r}") from None
        return v


# The options whose values change what the model writes: part of every cache key. batch_size, actors,
# max_chars (a check applied to the stored output) and flush_rows do not change a caption.
GENERATION_KEYS = ("model", "revision", "engine", "dtype", "image_side", "max_new_tokens", "repetition_penalty",
                   "prompt", "ocr_hint")


def row_prompt(opts: RecaptionOptions, ocr_text: str | None) -> str:
    """The prompt of one image: the instruction, and the OCR hint where OCR read text."""
    if opts.ocr_hint is None or not ocr_text:
        return opts.prompt
    return f"{opts.prompt}\n{opts.ocr_hint.format(ocr_text=ocr_text)}"


def generation_settings(opts: RecaptionOptions, weights: str) -> dict[str, Any]:
    """What a caption depends on besides its image and prompt text: the generation keys and the weights mode."""
    return {**{k: getattr(opts, k) for k in GENERATION_KEYS}, "weights": weights}


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(settings: str, sha256: str, prompt: str) -> str:
    """A row's cache key: the image's sha256, the model and generation settings (their digest), the prompt text."""
    return hashlib.sha256(f"{settings}\0{sha256}\0{prompt}".encode()).hexdigest()[:32]


# -- the engine -------------------------------------------------------------------------------------

class Engine(Protocol):
    """What the recaption phase needs of an inference engine: captions for a batch of images."""

    name: str

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """One caption per image (raw model output); raises if the batch cannot run."""


@dataclass
class Caption:
    """One row's outcome: the model's text, or why there is none."""

    text: str | None
    error: str | None = None


def caption(engine: Engine, images: Sequence[Image.Image | None], prompts: Sequence[str],
            errors: Sequence[str | None] | None = None) -> list[Caption]:
    """Caption a batch; a batch that raises is retried row by row, so one bad image fails only its row.
    `errors` are the rows that failed before the model (a decode error): they are passed through."""
    errors = list(errors or [None] * len(images))
    todo = [i for i, e in enumerate(errors) if e is None and images[i] is not None]
    out = [Caption(None, e or "no image") for e in errors]
    if not todo:
        return out
    try:
        texts = engine.generate([images[i] for i in todo], [prompts[i] for i in todo])
        for i, text in zip(todo, texts):
            out[i] = Caption(text)
    except Exception:
        for i in todo:
            try:
                out[i] = Caption(engine.generate([images[i]], [prompts[i]])[0])
            except Exception as exc:   # the model rejects this image: the row keeps its original caption
                out[i] = Caption(None, f"{MODEL_ERROR} {type(exc).__name__}: {str(exc)[:200]}")
    for c in out:
        if c.text is not None:
            c.text = c.text.strip()
            if not c.text:
                c.text, c.error = None, "empty output"
            elif "\ufffd" in c.text:
                c.text, c.error = None, "garbled output (undecodable bytes)"
    return out


def fit(image: Image.Image, side: int) -> Image.Image:
    """The image in RGB with its longer side at most `side` (never enlarged)."""
    image = image.convert("RGB")
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side))
    return image


def torch_dtype(name: str, device: str):
    import torch

    if device == "cpu" or name == "fp32":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


class TransformersEngine:
    """transformers `generate` on a model directory in the Hugging Face layout, greedy, left-padded batches."""

    name = "transformers"

    def __init__(self, processor: Any, model: Any, opts: RecaptionOptions, device: str = "cpu",
                 min_new_tokens: int | None = None):
        self.opts, self.device, self.processor, self.model = opts, device, processor, model
        self.min_new_tokens = min_new_tokens   # benchmarks only: a fixed caption length
        self.processor.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, directory: str | os.PathLike, opts: RecaptionOptions, device: str = "cpu") -> TransformersEngine:
        """Processor and model from a directory in the Hugging Face layout (safetensors weights)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(directory))
        model = AutoModelForImageTextToText.from_pretrained(
            str(directory), dtype=torch_dtype(opts.dtype, device), use_safetensors=True).to(device).eval()
        return cls(processor, model, opts, device)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
        """The model's inputs for a batch, on the device: one user turn per image (the image, then its prompt)."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        return self.processor(text=texts, images=[fit(im, self.opts.image_side) for im in images],
                              padding=True, return_tensors="pt").to(self.device)

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        import torch

        inputs = self.inputs(images, prompts)
        tok = self.processor.tokenizer
        extra = {"min_new_tokens": self.min_new_tokens} if self.min_new_tokens else {}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.opts.max_new_tokens, do_sample=False,
                                      repetition_penalty=self.opts.repetition_penalty,
                                      pad_token_id=tok.pad_token_id, **extra)
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# -- where the weights are ----------------------------------------------------------------------------

def hub_dir(opts: RecaptionOptions, models: ModelOptions) -> Path:
    from filters.models.weights import models_dir

    return models_dir(models) / HUB_FOLDER / opts.model.replace("/", "--")


def local_dir(opts: RecaptionOptions) -> Path | None:
    """recaption.model as a local directory, when it names one."""
    path = Path(opts.model).expanduser()
    return path if path.is_dir() else None


def model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def pin_key(file: Path, models: ModelOptions) -> str:
    """A hub model file's name in the models directory's checksums.json: its path below models_dir."""
    from filters.models.weights import models_dir

    return str(file.relative_to(models_dir(models)))


def missing(opts: RecaptionOptions, models: ModelOptions) -> str | None:
    """Why the recaption model cannot load here (None: it can), with the command that fixes it."""
    if not opts.enabled or models.weights == "random" or local_dir(opts):
        return None
    directory = hub_dir(opts, models)
    if not (directory / "config.json").is_file():
        return (f"recaption: {opts.model} is missing from {directory}; fetch it with `curate models pull` "
                f"(or set recaption.model to a local directory in the Hugging Face layout)")
    return None


def verify(opts: RecaptionOptions, models: ModelOptions) -> dict[str, str]:
    """Check a pulled model's files against the sha256 recorded at pull; {file: sha256}. Raises on a mismatch.
    A local directory of the user's is not pinned ({})."""
    from filters.models import weights

    if local_dir(opts):
        return {}
    directory = hub_dir(opts, models)
    recorded = weights._recorded(models)
    pins = {}
    for f in model_files(directory):
        key = pin_key(f, models)
        if key in recorded:
            digest = weights.sha256_file(f)
            if digest != recorded[key]:
                raise ValueError(f"{f}: sha256 {digest} does not match {recorded[key]} recorded at pull")
            pins[key] = digest
    if not pins:
        raise ValueError(f"{directory}: no checksums recorded for its files; fetch it with `curate models pull`")
    return pins


def pull(opts: RecaptionOptions, models: ModelOptions, log: Callable[[str], None] = print) -> list[str]:
    """Fetch recaption.model at recaption.revision into the models directory and record each file's sha256
    (trust on first use, as for the other hub files). Only `curate models pull` calls this."""
    from filters.models import weights

    if not opts.enabled or local_dir(opts) or models.weights == "random":
        return []
    directory = hub_dir(opts, models)
    if not (directory / "config.json").is_file():
        from huggingface_hub import snapshot_download

        log(f"fetching {opts.model}@{opts.revision} into {directory}")
        snapshot_download(opts.model, revision=opts.revision, local_dir=str(directory))
    for f in model_files(directory):
        weights._record(models, pin_key(f, models), weights.sha256_file(f))
    return []


def status(opts: RecaptionOptions, models: ModelOptions, verify_files: bool = False) -> dict[str, Any]:
    """The `models list` / `models check` row of the recaption model (checksum: ok or mismatch when verified)."""
    where = local_dir(opts)
    directory = where or hub_dir(opts, models)
    row = {"name": opts.model, "scorer": "recaption", "file": str(directory),
           "source": "local directory (unpinned)" if where else f"huggingface.co/{opts.model}@{opts.revision}",
           "present": (directory / "config.json").is_file(), "checksum": None}
    if verify_files and row["present"] and not where:
        try:
            verify(opts, models)
            row["checksum"] = "ok"
        except ValueError:
            row["checksum"] = "mismatch"
    return row


def describe(opts: RecaptionOptions, models: ModelOptions) -> dict[str, Any]:
    """Which model writes the captions, as models.json, the card and the report say it."""
    where = local_dir(opts)
    return {"model": opts.model, "revision": None if where else opts.revision, "engine": opts.engine,
            "weights": models.weights,
            "source": ("random weights, tiny architecture (captions are meaningless)" if models.weights == "random"
                       else f"local directory {where} (unpinned)" if where else str(hub_dir(opts, models))),
            "prompt": opts.prompt, "ocr_hint": opts.ocr_hint, "image_side": opts.image_side,
            "max_new_tokens": opts.max_new_tokens}


def device_for(opts: RecaptionOptions) -> str:
    import torch

    return "cuda" if opts.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def load_engine(opts: RecaptionOptions, models: ModelOptions, device: str | None = None) -> Engine:
    """The configured engine on this worker: random weights are built and saved first, then every model
    loads from its local directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # one bar per load and save would fill the workers' logs
    device = device or device_for(opts)
    if models.weights == "random":
        directory = Path(tempfile.mkdtemp(prefix="curate-recaption-random-"))
        save_random(directory)
    elif local_dir(opts):
        directory = local_dir(opts)
    else:
        reason = missing(opts, models)
        if reason:
            raise FileNotFoundError(reason)
        verify(opts, models)
        directory = hub_dir(opts, models)
    return TransformersEngine.load(directory, opts, device)


# -- random weights in the real file formats -----------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's chat layout: the image's placeholder (which the processor widens to one token per merged
# patch) inside the user turn, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_COMMON_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
    "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
    "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结"
    "解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级"
    "少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领"
    "七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每"
    "目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影"
    "算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准")

# Qwen2-VL-2B-Instruct's published architecture (its config.json), for benchmarks at the real size.
QWEN2_VL_2B = {
    "text": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
             "tie_word_embeddings": True},
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
}
TINY = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
             # wide random weights: greedy decoding of a tiny random model wanders instead of looping
             "initializer_range": 0.5},
    "vision": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
}


def make_tokenizer(directory: Path, extra_text: str = DEFAULT_PROMPT + DEFAULT_OCR_HINT) -> Any:
    """A Qwen2-VL-shaped tokenizer in the real format (tokenizer.json through the `tokenizers` library):
    the special tokens first, then one token per character of common Chinese, the prompts' characters,
    digits and ASCII letters. Returns transformers' fast tokenizer over that file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = [*SPECIAL_TOKENS, "<unk>", "▁", *_COMMON_HANZI, *extra_text, *"0123456789",
               *(chr(c) for c in range(ord("A"), ord("Z") + 1)), *(chr(c) for c in range(ord("a"), ord("z") + 1)),
               *"，。、：；！？“”（）《》-.,"]
    vocab: dict[str, int] = {}
    for s in symbols:
        if not s.isspace():
            vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")


Size = Literal["tiny", "qwen2-vl-2b"]


def random_parts(directory: Path, size: Size = "tiny", seed: int = 0, device: str = "cpu",
                 dtype: Any = None) -> tuple[Any, Any]:
    """(processor, model): a Qwen2-VL with random weights, `size` tiny for tests and smoke runs or
    Qwen2-VL-2B-Instruct's real architecture for benchmarks; its tokenizer file goes to `directory`.
    The same seed gives the same model."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = make_tokenizer(directory)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    arch = QWEN2_VL_2B if size == "qwen2-vl-2b" else TINY
    text = {"vocab_size": len(tok), **arch["text"], "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    tie = text.pop("tie_word_embeddings", False)
    config = Qwen2VLConfig(
        text_config=text, tie_word_embeddings=tie,
        vision_config={**arch["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(dtype or torch.float32).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    patches = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**patches), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**patches), chat_template=CHAT_TEMPLATE)
    return processor, model


def save_random(directory: str | os.PathLike, size: Size = "tiny", seed: int = 0) -> Path:
    """random_parts saved in the Hugging Face layout (config.json, model.safetensors, generation_config.json,
    the processor's and tokenizer's files), for loading back through the local-directory path."""
    directory = Path(directory)
    processor, model = random_parts(directory, size, seed)
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory
