"""Model scorers for the score phase: CLIP score, aesthetic, NSFW, watermark and zero-shot style.

Towers (open_clip image/text encoders) run once per image; small heads read their embeddings.
The spine builds `ModelScorer(opts)` once per Ray actor and calls it on decoded RGB batches.
"""
from .availability import missing_weights, skipped_when_offline
from .images import to_rgb_array
from .options import DEFAULT_STYLE_PROMPTS, SCORERS, ModelOptions
from .scorer import ModelScorer

__all__ = [
    "DEFAULT_STYLE_PROMPTS",
    "SCORERS",
    "ModelOptions",
    "ModelScorer",
    "missing_weights",
    "skipped_when_offline",
    "to_rgb_array",
]
