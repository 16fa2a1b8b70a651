"""Model scorers for the score phase: CLIP score, aesthetic, NSFW, watermark and zero-shot style.

Towers (open_clip image/text encoders) run once per image; small heads read their embeddings.
The spine builds `ModelScorer(opts)` once per Ray actor and calls it on decoded RGB batches.
Options import light; everything that needs torch loads on first use, so the CLI and the
config start in milliseconds.
"""
from importlib import import_module

from .options import DEFAULT_STYLE_PROMPTS, SCORERS, ModelOptions

_LAZY = {"ModelScorer": ".scorer", "missing_weights": ".availability",
         "skipped_when_offline": ".availability", "to_rgb_array": ".images"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_STYLE_PROMPTS", "SCORERS", "ModelOptions", *_LAZY]
