"""The recaption phase (curate/phases/recaption/): kept rows only, the cache, re-decides, resume after
SIGKILL, per-row failures, and what write puts in each sample's .txt; on the tiny random Qwen2-VL."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import yaml

from curate.config import ConfigError, validate
from curate.phases.download.plan import signature
from curate.phases.recaption.phase import make_job, read_cache, run_recaption
from curate.phases.write.phase import run_write, takes_recaption
from curate.pipeline import run_phases
from curate.run.rundir import RunDir
from curate.run.tario import TarWriter, members
from tests.procs import Driver
from tests.synthetic_write import EXTRA, decide, decided_run, reasons_of

TINY = {"enabled": True, "max_new_tokens": 8, "image_side": 56, "batch_size": 4}


def _cfg(run: RunDir, recaption: dict | None = None, write: dict | None = None):
    return validate({"run_dir": run.root, "input": {"paths": ["/unused/urls.parquet"], "extra_cols": EXTRA},
                     "models": {"weights": "random"}, "recaption": {**TINY, **(recaption or {})},
                     "write": {"samples_per_shard": 5, **(write or {})}})


def _results(run: RunDir) -> dict[str, tuple]:
    """key -> (keep, recaption, recaption_error) over the whole run."""
    out = {}
    for shard in run.shard_names():
        keep = run.storage.read_parquet(run.decisions(shard), columns=["key", "keep"]).to_pylist()
        rec = run.storage.read_parquet(run.recaption(shard)).to_pylist()
        assert [r["key"] for r in rec] == [k["key"] for k in keep]
        out.update({k["key"]: (k["keep"], r["recaption"], r["recaption_error"]) for k, r in zip(keep, rec)})
    return out


def _markers(run: RunDir) -> list[dict]:
    return run.markers("recaption", run.shard_names())


def _generated(run: RunDir) -> int:
    return sum(m["generated"] for m in _markers(run))


@pytest.fixture
def decided(tmp_path):
    return decided_run(str(tmp_path / "run"), [12, 10, 9])


@pytest.fixture(params=["local", "s3"])
def any_decided(request, tmp_path, s3):
    """The decided run on local disk, or in a bucket of the session's S3 server."""
    if request.param == "local":
        return decided_run(str(tmp_path / "run"), [12, 10, 9])
    return decided_run(f"s3://{s3.bucket('recaption')}/run", [12, 10, 9])


def test_captions_exactly_the_kept_rows_and_a_rerun_does_nothing(ray_session, any_decided):
    decided = any_decided
    cfg = _cfg(decided)
    failed, rows = run_recaption(cfg, decided)
    assert not failed
    results = _results(decided)
    kept = [k for k, (keep, _, _) in results.items() if keep]
    assert rows == len(kept) > 0
    for key, (keep, text, error) in results.items():
        if keep:
            assert (text is None) != (error is None), key   # a recaption, or why there is none
        else:
            assert text is None and error is None, key      # a dropped row is never captioned
    assert any(text for _, text, _ in results.values())
    assert _generated(decided) == len(kept)
    assert sum(len(read_cache(decided, s)[0]) for s in decided.shard_names()) == len(kept)   # one entry a row
    assert run_recaption(cfg, decided) == ([], 0)   # every marker matches the decisions and settings


def test_a_redecide_captions_only_the_rows_it_adds_and_none_when_it_drops(ray_session, decided):
    cfg = _cfg(decided)
    run_recaption(cfg, decided)
    before = {k for k, (keep, _, _) in _results(decided).items() if keep}
    shards = decided.shard_names()
    sizes = [12, 10, 9]
    # Re-decide: the rows first dropped as low_aesthetic (row-rule reasons) are kept now; the kept stay kept.
    looser = {s: [None if r == "low_aesthetic" else r for r in reasons_of(i, n)]
              for i, (s, n) in enumerate(zip(shards, sizes))}
    decide(decided, looser)
    run_recaption(cfg, decided)
    after = {k for k, (keep, _, _) in _results(decided).items() if keep}
    assert after > before
    assert _generated(decided) == len(after - before)
    assert sum(m["cached"] for m in _markers(decided)) == len(before)
    # Re-decide back to the original, stricter decisions: no row is captioned again.
    decide(decided, {s: reasons_of(i, n) for i, (s, n) in enumerate(zip(shards, sizes))})
    run_recaption(cfg, decided)
    assert _generated(decided) == 0
    results = _results(decided)
    assert {k for k, (keep, _, _) in results.items() if keep} == before
    assert all(t is None and e is None for keep, t, e in results.values() if not keep)


def test_the_cache_key_follows_model_prompt_and_settings(ray_session, decided):
    run_recaption(_cfg(decided), decided)
    kept = sum(m["kept"] for m in _markers(decided))
    base = make_job(_cfg(decided), decided, "x").settings
    for change in ({"max_new_tokens": 9}, {"image_side": 84}, {"model": "Org/Other-VL"}, {"dtype": "bf16"},
                   {"ocr_hint": None}):
        assert make_job(_cfg(decided, change), decided, "x").settings != base, change
    run_recaption(_cfg(decided, {"prompt": "用一句话描述这张图片。"}), decided)
    assert _generated(decided) == kept   # a new prompt: every kept row again
    run_recaption(_cfg(decided, {"batch_size": 2, "max_chars": 400}), decided)   # no generation setting changed
    assert _generated(decided) == 0
    run_recaption(_cfg(decided), decided)   # back to the first settings: every caption is still cached
    assert _generated(decided) == 0


def _break_image(run: RunDir, shard: str, key: str) -> None:
    """Replace one image in a raw tar by bytes no decoder reads (the marker's size follows)."""
    with run.storage.open_input(run.raw_tar(shard)) as f:
        items = list(members(f))
    with run.storage.open_output(run.raw_tar(shard)) as f:
        tar = TarWriter(f)
        for name, data in items:
            tar.add(name, b"not a jpeg" if name == f"{key}.jpg" else data)
        tar.close()
    marker = run.storage.read_json(run.marker("download", shard))
    run.mark("download", shard, {**marker, "tar_bytes": run.storage.size(run.raw_tar(shard))})


def _txt(run: RunDir) -> dict[str, str]:
    out = {}
    for name in run.storage.list(run.uri("shards")):
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(run.storage.read_bytes(run.out_shard(name)))) as tar:
                for m in tar:
                    if m.name.endswith(".txt"):
                        out[m.name[:-4]] = tar.extractfile(m).read().decode()
    return out


def _json(run: RunDir) -> dict[str, dict]:
    out = {}
    for name in run.storage.list(run.uri("shards")):
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(run.storage.read_bytes(run.out_shard(name)))) as tar:
                out.update({m.name[:-5]: json.loads(tar.extractfile(m).read())
                            for m in tar if m.name.endswith(".json")})
    return out


def test_a_failed_row_keeps_its_caption_and_write_puts_the_chosen_text_in_txt(ray_session, decided):
    shard = decided.shard_names()[0]
    keep = decided.storage.read_parquet(decided.decisions(shard), columns=["key", "keep"]).to_pylist()
    broken = next(r["key"] for r in keep if r["keep"])
    _break_image(decided, shard, broken)
    cfg = _cfg(decided, write={"caption": "recaption"})
    assert run_recaption(cfg, decided)[0] == []
    results = _results(decided)
    assert results[broken][1] is None and results[broken][2].startswith("decode:")
    good = {k: t for k, (keep, t, _) in results.items() if keep and t}
    assert good
    stats = run_write(cfg, decided.shard_names())
    assert not stats["failures"]
    txt, samples = _txt(decided), _json(decided)
    assert set(txt) == {k for k, (keep, _, _) in results.items() if keep}
    assert txt[broken] == samples[broken]["caption_norm"] and samples[broken]["recaption"] is None
    assert samples[broken]["recaption_error"].startswith("decode:")
    for key, text in good.items():
        assert txt[key] == text and samples[key]["recaption"] == text
    manifest = {r["key"]: r for s in decided.shard_names()
                for r in decided.storage.read_parquet(decided.manifest(s)).to_pylist()}
    assert all(r["recaption"] is None for r in manifest.values() if not r["keep"])
    assert {k for k, r in manifest.items() if r["recaption"]} == set(good)

    run_write(_cfg(decided, write={"caption": "original"}), decided.shard_names())
    assert all(t == _json(decided)[k]["caption_norm"] for k, t in _txt(decided).items())

    mix = _cfg(decided, write={"caption": "mix", "recaption_share": 0.5})
    run_write(mix, decided.shard_names())
    first = _txt(decided)
    chosen = {k for k in good if takes_recaption(k, 0.5)}
    assert 0 < len(chosen) < len(good) or len(good) < 4
    for key, text in first.items():
        assert text == (good[key] if key in chosen else _json(decided)[key]["caption_norm"])
    run_write(mix, decided.shard_names())
    assert _txt(decided) == first   # the mix is a function of the key: the same on every run


def test_the_mix_share_is_met_by_the_key_hash():
    keys = [f"{s:05d}_{r:06d}" for s in range(4) for r in range(2500)]
    share = np.mean([takes_recaption(k, 0.3) for k in keys])
    assert abs(share - 0.3) < 0.02
    assert not any(takes_recaption(k, 0.0) for k in keys[:100]) and all(takes_recaption(k, 1.0) for k in keys[:100])


def test_write_refuses_recaptions_made_from_other_decisions(ray_session, decided):
    cfg = _cfg(decided)
    run_recaption(cfg, decided)
    decide(decided, {s: reasons_of(i, n) for i, (s, n) in enumerate(zip(decided.shard_names(), [12, 10, 9]))})
    from curate.phases.write.phase import DecisionsNotReady

    with pytest.raises(DecisionsNotReady, match="curate recaption"):
        run_write(cfg, decided.shard_names())
    with pytest.raises(ConfigError, match="recaption.num_gpus"):   # on this CPU cluster, before any actor waits
        run_recaption(_cfg(decided, {"num_gpus": 1}), decided)
    with pytest.raises(ValueError, match="recaption.enabled"):
        validate({"run_dir": "x", "input": {"paths": ["y"]}, "write": {"caption": "mix"}})


@pytest.mark.slow
def test_resumes_after_sigkill_reusing_what_the_killed_run_cached(ray_session, tmp_path):
    run = decided_run(str(tmp_path / "run"), [16, 16, 16])
    cfg = _cfg(run, {"batch_size": 2, "flush_rows": 2})
    plan = run.storage.read_json(run.plan)
    run.storage.write_json(run.plan, {**plan, "input": signature(cfg.input)})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    kept = sum(m["kept"] for m in run.markers("decide", run.shard_names()))

    def unfinished_cached() -> dict[str, int]:
        done = run.done("recaption")
        return {s: len(read_cache(run, s)[0]) for s in run.shard_names() if s not in done}

    log = tmp_path / "driver.log"
    driver = Driver(["recaption", str(path), "--set", "ray.num_cpus=2"], log)
    driver.kill_when(lambda: any(unfinished_cached().values()), timeout=300)
    reused = sum(unfinished_cached().values())
    assert reused > 0, "the kill landed after the phase had finished"
    outcome = run_phases(cfg, ("recaption",))
    assert outcome.ok, outcome.failures
    results = _results(run)
    assert sum(keep for keep, _, _ in results.values()) == kept
    assert all((t is None) != (e is None) for keep, t, e in results.values() if keep)
    # Every kept row was generated once, over both attempts: the killed run's cache parts were reused.
    assert _generated(run) == kept - reused


class _Failing:
    """An engine that raises on every image (an out-of-memory, say), then, when healed, answers."""

    name = "failing"

    def __init__(self):
        self.healed = False

    def generate(self, images, prompts):
        if not self.healed:
            raise RuntimeError("CUDA out of memory")
        return ["一只橘色的猫趴在窗台上晒太阳"] * len(images)


def test_a_model_error_keeps_the_original_and_is_retried_by_the_next_run_not_cached(decided):
    from curate.phases.recaption.phase import recaption_shard

    shard = decided.shard_names()[0]
    job = make_job(_cfg(decided), decided, decided.storage.read_json(decided.decided)["attempt"])
    engine = _Failing()
    first = recaption_shard(job, lambda: engine, shard, True, True)
    assert first["kept"] > 0 and first["failed"] == first["kept"] == first["generated"]
    rows = decided.storage.read_parquet(decided.recaption(shard)).to_pylist()
    assert all(r["recaption"] is None for r in rows)
    assert sum(bool(r["recaption_error"]) and r["recaption_error"].startswith("model: RuntimeError") for r in rows) \
        == first["kept"]
    assert read_cache(decided, shard)[0] == {}
    engine.healed = True
    second = recaption_shard(job, lambda: engine, shard, True, True)
    assert second["generated"] == second["recaptioned"] == first["kept"]
    assert recaption_shard(job, lambda: None, shard, True, True)["generated"] == 0   # all cached: no engine asked
