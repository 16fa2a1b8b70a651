"""`curate demo`: a synthetic nasty corpus, served on 127.0.0.1, through all four phases."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate import config as config_mod
from curate.demo_corpus import generate
from curate.demo_server import serve
from curate.pipeline import Outcome, run_phases
from curate.runtime import log


def demo_config(out: Path, overrides: list[str]) -> config_mod.Config:
    """jobs/demo.yaml pointed at this run directory, with the user's overrides on top."""
    data = yaml.safe_load(resources.files("jobs").joinpath("demo.yaml").read_text(encoding="utf-8"))
    data["run_dir"] = str(out)
    data["input"]["paths"] = [str(out / "input" / "urls.parquet")]
    data = config_mod.apply_overrides(data, overrides)
    return config_mod.resolve(config_mod.validate(data, "jobs/demo.yaml"))


def make_corpus(out: Path, n: int, seed: int) -> dict:
    """Generate the corpus once per (n, seed); a re-run with the same settings reuses it."""
    folder = out / "input"
    marker = folder / "corpus.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info["n"] == n and info["seed"] == seed:
            log.info("demo: reusing the corpus in %s", folder)
            return info
        raise FileExistsError(f"{out} holds a demo corpus made with n={info['n']}, seed={info['seed']}: "
                              f"use another --out or delete it")
    log.info("demo: generating %d samples (seed %d) in %s", n, seed, folder)
    samples = generate(folder / "images", n=n, seed=seed)
    info = {"n": n, "seed": seed, "port": 0,
            "names": [s.name for s in samples], "kinds": [s.kind for s in samples],
            "captions": [s.caption for s in samples]}
    return info


def run_demo(out: Path, n: int = 2000, seed: int = 0, overrides: list[str] = ()) -> Outcome:
    """Generate, serve, and curate the demo corpus; the server lives only while download runs."""
    out = out.resolve()
    cfg = demo_config(out, list(overrides))  # a bad override fails before any work
    info = make_corpus(out, n, seed)
    folder = out / "input"
    with serve(folder / "images", slow_seconds=cfg.download.timeout + 5, port=info["port"]) as base:
        port = int(base.rsplit(":", 1)[1])
        if port != info["port"] or not (folder / "urls.parquet").exists():
            urls = [f"{base}/{name}" for name in info["names"]]
            pq.write_table(pa.table({"url": urls, "caption": info["captions"], "kind": info["kinds"]}),
                           folder / "urls.parquet")
            info["port"] = port
            (folder / "corpus.json").write_text(json.dumps(info, ensure_ascii=False))
        outcome = run_phases(cfg, ("download",))
    later = run_phases(cfg, ("score", "decide", "write"), skip_missing_models=True)
    later.failures = outcome.failures + later.failures
    return later
