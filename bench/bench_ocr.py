"""OCR: what PP-OCRv4 costs per core, and what it adds to the score stage through Ray.

Two measurements, both on the demo corpus (photos, cartoons, screenshots of text, watermarks):
- the scorer alone, one onnxruntime thread, images decoded beforehand: detection alone and
  detection plus recognition, images/s per core;
- the score phase itself (`run_score`, Ray Data, actor start-up included), on one downloaded
  demo run, once per models.enabled setting, taking turns: the ratio of OCR on to OCR off is
  the stage's slow-down, with the demo's open_nsfw on (the issue's baseline) and with no model.
"""
from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import rescore_seconds, side_by_side, summary

SIZES = {"smoke": 16, "quick": 600, "full": 2000}
REPEATS = {"smoke": 1, "quick": 2, "full": 3}
STAGE = {   # contender -> config overrides on top of jobs/demo.yaml
    "no_model": ["models.enabled=[]"],
    "ocr": ["models.enabled=[ocr]"],
    "nsfw": ["models.enabled=[nsfw]"],
    "nsfw_ocr": ["models.enabled=[nsfw, ocr]"],
    "nsfw_ocr_recognize": ["models.enabled=[nsfw, ocr]", "models.ocr_recognize=true"],
}
SMOKE_STAGE = ("no_model", "ocr")


def _views(run_dir: Path, side: int, limit: int) -> list[np.ndarray]:
    """The run's stored images, decoded as the OCR stage decodes them."""
    from filters.image import decode

    views = []
    for tar_path in sorted((run_dir / "raw").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                try:
                    views.append(np.asarray(decode(tar.extractfile(member).read(), side, 10**8)[0]))
                except Exception:   # the corpus holds broken images on purpose
                    continue
                if len(views) == limit:
                    return views
    return views


def scorer_alone(run_dir: Path, n: int, repeats: int) -> dict:
    from filters.models import ModelOptions
    from filters.models.ocr import Ocr

    side = ModelOptions().ocr_side
    views = _views(run_dir, side, n)
    det, both = Ocr(side, threads=1), Ocr(side, recognize=True, threads=1)

    def timed(ocr) -> float:
        start = time.perf_counter()
        ocr(views)
        return time.perf_counter() - start

    timings = side_by_side({"detect": lambda: timed(det), "detect_recognize": lambda: timed(both)}, repeats)
    return {"images": len(views), "side": side, "threads": 1,
            "images_per_s_per_core": {k: round(len(views) / t["median_s"], 2) for k, t in timings.items()},
            "timings": timings}


def stage(out: Path, names: tuple[str, ...], repeats: int) -> dict:
    """Each contender scores the same downloaded run from scratch, in turns."""
    runs: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            runs[name].append(rescore_seconds(out, STAGE[name]))
    return {name: summary(r) for name, r in runs.items()}


def run(mode: str) -> dict:
    from curate.demo.run import run_demo

    n, repeats = SIZES[mode], REPEATS[mode]
    with tempfile.TemporaryDirectory(prefix="curate-bench-ocr-") as tmp:
        out = Path(tmp) / "run"
        outcome = run_demo(out, n=n, seed=0, overrides=["models.enabled=[]"])   # download once, untimed
        if not outcome.ok:
            raise RuntimeError(f"demo run failed: {outcome.failures}")
        alone = scorer_alone(out, n, repeats)
        names = SMOKE_STAGE if mode == "smoke" else tuple(STAGE)
        timings = stage(out, names, repeats)
    rows_per_s = {k: round(n / t["median_s"], 2) for k, t in timings.items()}
    ratios = {"ocr.stage_nsfw_ocr_over_nsfw": None, "ocr.stage_ocr_over_no_model":
              round(timings["ocr"]["median_s"] / timings["no_model"]["median_s"], 3)}
    if "nsfw" in timings:
        ratios["ocr.stage_nsfw_ocr_over_nsfw"] = round(timings["nsfw_ocr"]["median_s"] / timings["nsfw"]["median_s"], 3)
    return {"rows": n, "scorer_alone": alone, "stage_rows_per_s": rows_per_s, "stage_timings": timings,
            "note": "stage times include each run's actor start-up (model loading), as a user's run does; "
                    "ratios are OCR-on time over OCR-off time (goal: nsfw_ocr / nsfw <= 2)",
            "detect_images_per_s_per_core": alone["images_per_s_per_core"]["detect"],
            "ratios": ratios}
