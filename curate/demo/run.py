"""`curate demo`: a synthetic nasty corpus, served on 127.0.0.1, through every phase (recaption too with
`--set recaption.enabled=true --set models.weights=random`: the tiny random model).

The run directory may be local or an object store (`--out s3://bucket/demo`). The images play
the part of the web: they live in a local folder the throw-away server reads (inside a local
run directory, else a cache folder keyed by n and seed); the URL manifest and everything the
pipeline writes go to the run directory through the storage module.
"""
from __future__ import annotations

import io
import tempfile
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate import config as config_mod
from curate.demo.corpus import generate
from curate.demo.server import serve
from curate.pipeline import Outcome, run_phases
from curate.run.runtime import log
from curate.run.storage import Storage, absolute, is_local, join


def demo_config(out: str | Path, overrides: list[str]) -> config_mod.Config:
    """jobs/demo.yaml pointed at this run directory, with the user's overrides on top."""
    out = absolute(str(out))
    data = yaml.safe_load(resources.files("jobs").joinpath("demo.yaml").read_text(encoding="utf-8"))
    data["run_dir"] = out
    data["input"]["paths"] = [join(out, "input", "urls.parquet")]
    data = config_mod.apply_overrides(data, overrides)
    return config_mod.resolve(config_mod.validate(data, "jobs/demo.yaml"))


def image_folder(out: str, n: int, seed: int) -> Path:
    """Where the served images live: inside a local run directory, else a local cache folder."""
    if is_local(out):
        return Path(absolute(out)) / "input" / "images"
    return Path(tempfile.gettempdir()) / f"curate-demo-images-n{n}-seed{seed}"


def make_corpus(out: str, n: int, seed: int, storage: Storage) -> dict:
    """Generate the corpus once per (n, seed); a re-run with the same settings reuses it."""
    marker = join(out, "input", "corpus.json")
    folder = image_folder(out, n, seed)
    if storage.exists(marker):
        info = storage.read_json(marker)
        if info["n"] != n or info["seed"] != seed:
            raise FileExistsError(f"{out} holds a demo corpus made with n={info['n']}, seed={info['seed']}: "
                                  f"use another --out or delete it")
        if folder.is_dir():
            log.info("demo: reusing the corpus in %s", folder)
            return info
    log.info("demo: generating %d samples (seed %d) in %s", n, seed, folder)
    samples = generate(folder, n=n, seed=seed)
    info = {"n": n, "seed": seed, "port": 0,
            "names": [s.name for s in samples], "kinds": [s.kind for s in samples],
            "captions": [s.caption for s in samples]}
    return info


def run_demo(out: str | Path, n: int = 2000, seed: int = 0, overrides: list[str] = (),
             later: tuple[str, ...] = ("score", "decide", "recaption", "write")) -> Outcome:
    """Generate, serve, and curate the demo corpus; the server lives only while download runs.

    `later` are the phases after download (none: download only, as benchmarks of score need)."""
    out = absolute(str(out))
    cfg = demo_config(out, list(overrides))  # a bad override fails before any work
    storage = Storage(cfg.storage)
    info = make_corpus(out, n, seed, storage)
    urls_uri = cfg.input.paths[0]
    with serve(image_folder(out, n, seed), slow_seconds=cfg.download.timeout + 5, port=info["port"]) as base:
        port = int(base.rsplit(":", 1)[1])
        if port != info["port"] or not storage.exists(urls_uri):
            buf = io.BytesIO()
            pq.write_table(pa.table({"url": [f"{base}/{name}" for name in info["names"]],
                                     "caption": info["captions"], "kind": info["kinds"]}), buf)
            storage.write_bytes(urls_uri, buf.getvalue())
            info["port"] = port
            storage.write_json(join(out, "input", "corpus.json"), info)
        outcome = run_phases(cfg, ("download",))
    if not later:
        return outcome
    return run_phases(cfg, later, skip_missing_models=True)   # its failures include download's (failures.json)
