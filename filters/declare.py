"""Scorer declarations: what each scorer writes, reads and shares, and what changes its output.

A scorer is declared once, beside its code. The manifest schema, decide's inputs, the score
stage's plan, the per-shard fingerprints, `models list`, the report's cards, `inspect` and the
dataset card read these declarations; none of them restates a column name.

A declaration knows nothing of Ray or run files: `settings(cfg)` reads the configuration it is
handed by attribute (the pipeline's `Config`, or anything shaped like it), so filters/ stays the
bottom layer.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

# What a scorer reads: the image decoded once by the CPU stage, the model view (a small RGB array the
# CPU stage or the model actors make), the stored JPEG bytes, the normalised caption, a tower's embedding.
Input = Literal["image", "view", "bytes", "caption", "embedding"]
# Where it runs: the CPU scoring task, the model actor pool, or the OCR actor pool.
Stage = Literal["cpu", "model", "ocr"]


@dataclass(frozen=True)
class Column:
    """One manifest column: name, Arrow type, meaning; `shown` puts it on the report's sample cards,
    inspect's samples and the dataset card's examples."""

    name: str
    type: pa.DataType
    doc: str
    shown: bool = False


@dataclass(frozen=True)
class Scorer:
    """A scorer as the pipeline sees it.

    `keys` are the dotted config keys whose values change the scorer's output (a callable of the
    config when they depend on a backend setting); `weights` names the weight files it loads (the
    registry in filters/models/weights.py gives their digests); `files` the local files (word lists)
    whose contents change it; `tower` the image tower it shares
    with other scorers, if any. `optional` scorers run when named in models.enabled; the others
    (the CPU metrics) always run. `runs` names a model-stage scorer's builder, "module:function"
    (filters/models/heads.py says what it is handed and returns), imported only where models load.
    """

    name: str
    columns: tuple[Column, ...]
    reads: tuple[Input, ...]
    stage: Stage
    keys: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    weights: Callable[[Any], list[str]] = field(default=lambda cfg: [])
    files: Callable[[Any], list[str]] = field(default=lambda cfg: [])
    tower: Callable[[Any], str | None] = field(default=lambda cfg: None)
    optional: bool = True
    resources: str = ""
    doc: str = ""
    runs: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def config_keys(self, cfg: Any) -> tuple[str, ...]:
        return self.keys(cfg) if callable(self.keys) else self.keys

    def settings(self, cfg: Any) -> dict[str, Any]:
        """The value of every config key that changes this scorer's output, by dotted name."""
        return {key: _jsonable(lookup(cfg, key)) for key in self.config_keys(cfg)}


def lookup(cfg: Any, dotted: str) -> Any:
    """`cfg.a.b` for the key "a.b"; a KeyError names the key."""
    value = cfg
    for part in dotted.split("."):
        if not hasattr(value, part):
            raise KeyError(f"config has no key {dotted!r}")
        value = getattr(value, part)
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def digest(payload: Any) -> str:
    """A short stable digest of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
