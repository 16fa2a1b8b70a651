"""Every scorer, in manifest column order: the CPU metrics, then the model scorers.

The one list the schema, the score stage, fingerprints, decide and the report read.
"""
from __future__ import annotations

from typing import Any

from filters import image, text
from filters.declare import Column, Scorer
from filters.models.catalog import EMBEDDING, MODEL_SCORERS

SCORERS: tuple[Scorer, ...] = (image.SCORER, text.SCORER, *MODEL_SCORERS)
BY_NAME: dict[str, Scorer] = {s.name: s for s in (*SCORERS, EMBEDDING)}
COLUMNS: dict[str, Column] = {c.name: c for s in SCORERS for c in s.columns}
PRODUCER: dict[str, str] = {c.name: s.name for s in SCORERS for c in s.columns}


def active(cfg: Any) -> list[Scorer]:
    """The scorers a config runs: the CPU metrics always, the model scorers it enables, and the
    embedding when models.keep_embeddings asks for it."""
    out = [s for s in SCORERS if not s.optional or s.name in cfg.models.enabled]
    if cfg.models.keep_embeddings and any(s.stage == "model" for s in out):
        out.append(EMBEDDING)
    return out


def shown(scorers: tuple[Scorer, ...] = SCORERS) -> tuple[str, ...]:
    """The columns the declarations mark `shown`, in manifest order: inspect's samples, the report's cards."""
    return tuple(c.name for s in scorers for c in s.columns if c.shown)
