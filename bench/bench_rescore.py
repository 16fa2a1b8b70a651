"""Enabling a scorer on a scored run: OCR alone (provenance's partial re-score) against a full re-score.

A demo run is downloaded and scored once with models.enabled=[nsfw] (untimed). Then, in turns
from that same state, `run_score` with [nsfw, ocr]:
- add_ocr: the run as it is; provenance finds OCR new and runs it alone, joining its columns;
- full: the scores and score markers deleted first, so every scorer runs again, as before
  per-scorer fingerprints existed.
Both include the stage's start-up (actor construction, model load), as a user's run does.

    python -m bench.bench_rescore [--full]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import summary

SIZES = {"smoke": 40, "quick": 500, "full": 2000}
REPEATS = {"smoke": 1, "quick": 2, "full": 3}
BASE, WANTED = ["models.enabled=[nsfw]"], ["models.enabled=[nsfw, ocr]"]


def _score(out: Path, overrides: list[str]) -> float:
    from curate.demo import demo_config
    from curate.rundir import RunDir
    from curate.score import run_score

    cfg = demo_config(out, overrides)
    run = RunDir(cfg.run_dir)
    start = time.perf_counter()
    failures, _ = run_score(cfg, run, sorted(run.done("download")))
    if failures:
        raise RuntimeError(f"score failed: {failures[:3]}")
    return time.perf_counter() - start


def _restore(out: Path, saved: Path) -> None:
    for part in ("scores", "_done/score"):
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(saved / part, out / part)


def run(mode: str) -> dict:
    from curate.demo import run_demo

    n, repeats = SIZES[mode], REPEATS[mode]
    runs: dict[str, list[float]] = {"add_ocr": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="curate-bench-rescore-") as tmp:
        out, saved = Path(tmp) / "run", Path(tmp) / "saved"
        outcome = run_demo(out, n=n, seed=0, overrides=BASE)   # downloaded and scored with [nsfw], untimed
        if not outcome.ok:
            raise RuntimeError(f"demo run failed: {outcome.failures}")
        for part in ("scores", "_done/score"):
            shutil.copytree(out / part, saved / part)
        for _ in range(repeats):
            for name in runs:
                _restore(out, saved)
                if name == "full":
                    shutil.rmtree(out / "scores")
                    shutil.rmtree(out / "_done" / "score")
                runs[name].append(_score(out, WANTED))
    timings = {k: summary(v) for k, v in runs.items()}
    ratio = round(timings["add_ocr"]["median_s"] / timings["full"]["median_s"], 3)
    return {"rows": n, "timings": timings, "rows_per_s": {k: round(n / t["median_s"], 2) for k, t in timings.items()},
            "note": "from a run scored with [nsfw]: add_ocr re-runs OCR alone, full re-runs every scorer",
            "ratios": {"rescore.add_ocr_over_full": ratio}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    print(json.dumps(run("full" if parser.parse_args().full else "quick"), indent=2))
