"""The demo with recaption on, random weights, the tiny model: decide, recaption and write on a copy of the
session's demo run (its download and scores), then what a trainer, the card, the report and inspect see."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

from curate.demo.run import demo_config
from curate.inspect import summarize
from curate.phases.download.plan import signature
from curate.pipeline import run_phases
from curate.run.rundir import RunDir

RECAPTION = ["recaption.enabled=true", "models.weights=random", "recaption.max_new_tokens=8",
             "recaption.image_side=56", "recaption.batch_size=8", "write.caption=mix"]


def test_demo_with_recaption_every_kept_sample_has_one_and_no_dropped_row(demo_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(demo_run, out)
    cfg = demo_config(out, RECAPTION)
    run = RunDir(str(out))
    plan = run.storage.read_json(run.plan)   # the copy was planned from the original's input path
    run.storage.write_json(run.plan, {**plan, "input": {**plan["input"], **signature(cfg.input)}})
    outcome = run_phases(cfg, ("decide", "recaption", "write"), skip_missing_models=True)
    assert outcome.ok, outcome.failures

    samples = {}
    for name in outcome.stats["shards"]["names"]:
        with tarfile.open(fileobj=io.BytesIO(run.storage.read_bytes(run.out_shard(name)))) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for member, data in files.items():
            if member.endswith(".json"):
                key = member[:-5]
                samples[key] = (json.loads(data), files[f"{key}.txt"].decode())
    assert len(samples) == outcome.stats["funnel"]["kept"] > 0
    with_text = 0
    for key, (meta, txt) in samples.items():
        assert "recaption" in meta and "recaption_error" in meta, key
        assert (meta["recaption"] is None) != (meta["recaption_error"] is None), key
        with_text += meta["recaption"] is not None
        assert txt in (meta["recaption"], meta["caption_norm"])
    assert with_text >= len(samples) // 2   # the tiny random model's characters mostly pass the caption rules
    manifest = [r for s in run.shard_names() for r in run.storage.read_parquet(
        run.manifest(s), columns=["key", "keep", "recaption", "recaption_error"]).to_pylist()]
    dropped = [r for r in manifest if not r["keep"]]
    assert dropped and all(r["recaption"] is None and r["recaption_error"] is None for r in dropped)

    info = outcome.stats["recaption"]
    assert info["rows"]["kept"] == len(samples) and info["rows"]["recaptioned"] == with_text
    assert info["producers"][0]["weights"] == "random" and info["examples"]
    card = run.storage.read_text(run.out_shard("README.md"))
    assert "## Recaptions" in card and "RANDOM weights" in card and info["producers"][0]["prompt"] in card
    report = run.storage.read_text(run.file("report.html"))
    assert 'id="recaptions"' in report and info["examples"][0]["recaption"] in report
    lengths = summarize(str(out))["caption_lengths"]
    assert lengths["kept"] == len(samples) and lengths["recaptioned"] == with_text
    assert lengths["original"]["count"] == lengths["recaption"]["count"] == with_text
