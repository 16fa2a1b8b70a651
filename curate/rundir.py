"""The run directory: where each phase's files live, and how they are written atomically.

Every output is written under a temporary name in the same folder and renamed into place,
so a file that exists is complete: its presence is the phase's resume marker.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def input_shards(self) -> Path:
        return self.root / "input_shards"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def decisions(self) -> Path:
        return self.root / "decisions"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan(self) -> Path:
        return self.input_shards / "_plan.json"

    def shard_names(self) -> list[str]:
        """Input shard names from the plan written by the download phase."""
        if not self.plan.exists():
            raise FileNotFoundError(f"{self.plan} is missing: run `curate download` first")
        return json.loads(self.plan.read_text())["shards"]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
