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


def declarations(cfg: Any, scorers: tuple[Scorer, ...] = (*SCORERS, EMBEDDING)) -> list[dict[str, Any]]:
    """Each scorer's declaration evaluated under a config (`curate models list`): whether it runs, the columns
    it writes with their Arrow types, what it reads, where it runs, its tower, the config keys, weight names
    and files that change its output."""
    on = {s.name for s in active(cfg)}
    return [{"scorer": s.name, "enabled": s.name in on, "optional": s.optional,
             "columns": {c.name: str(c.type) for c in s.columns}, "reads": list(s.reads), "stage": s.stage,
             "tower": s.tower(cfg), "keys": list(s.config_keys(cfg)), "weights": list(s.weights(cfg)),
             "files": list(s.files(cfg)), "resources": s.resources, "doc": s.doc} for s in scorers]
