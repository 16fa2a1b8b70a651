"""Each benchmark at its smallest size, so none can rot; and the runner's bookkeeping."""
from __future__ import annotations

import json
import os
import time

import pytest

from bench import common, run

OWN_RATIOS = {
    "download": ["download.ours_over_img2dataset", "download.many_hosts_ours_over_img2dataset"],
    "score_cpu": ["score_cpu.ours_over_careful_loop", "score_cpu.ours_over_data_juicer",
                  "score_cpu.view_hashes_overhead"],
    "score_stage": ["score_stage.ray_over_loop", "score_stage.ray_over_loop_with_startup", "score_stage.startup_s",
                    "score_stage.startup_models_s"],
    "near_dup": ["near_dup.min_recall_crops_mirrors", "near_dup.min_recall_others", "near_dup.precision",
                 "near_dup.false_merges_50k"],
    "graphic": ["graphic.accuracy"],
    "scaling": ["scaling.sec_per_1k_max_over_min", "scaling.peak_mem_max_over_min"],
    "score_gpu": ["score_gpu.pipeline_over_model_alone", "score_gpu.cores_per_gpu"],
    "scale": ["scale.sec_per_row_max_over_min", "scale.driver_peak_max_over_min", "scale.driver_peak_mb_at_max",
              "scale.write_samples_per_s_per_core"],
    "scale1b": ["scale1b.driver_peak_mb", "scale1b.skipped_hashes", "scale1b.components_bytes_per_edge_row",
                "scale1b.largest_group_over_planted", "scale1b.shuffle_bytes_per_survivor"],
    "models": [],
    "ocr": ["ocr.stage_nsfw_ocr_over_nsfw", "ocr.stage_ocr_over_no_model"],
    "rescore": ["rescore.add_ocr_over_full"],
    "caption_first": ["caption_first.plan_rows_per_s", "caption_first.requests_over_passing",
                      "caption_first.img2dataset_requests_over_ours"],
    "recaption": ["recaption.engine_over_generate_alone", "recaption.images_per_s_per_gpu",
                  "recaption.gpu_hours_per_100m"],
}


_SMOKE: dict[str, dict] = {}


RUN_ONE = run.run_one   # the real one: the runner's test below replaces run.run_one with smoke


def smoke(name: str) -> dict:
    """run.run_one(name, "smoke"), once per session: the runner's own tests reuse the result."""
    if name not in _SMOKE:
        _SMOKE[name] = RUN_ONE(name, "smoke")
    return _SMOKE[name]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", run.BENCHMARKS)
def test_benchmark_smoke(name, ray_session):   # the session's Ray: some benchmarks run phases in-process
    result = smoke(name)
    assert set(OWN_RATIOS[name]) <= set(result["own_ratios"])
    assert result["machine"]["cores"] >= 1 and "ray" in result["versions"]
    if name == "models":   # one real model (open_nsfw's ONNX ResNet-50) on 8 images
        assert "error" not in result, result.get("traceback")
        assert list(result["images_per_s"]) == ["open_nsfw"] and result["images_per_s"]["open_nsfw"] > 0
        return
    if name == "score_gpu" and not common.gpu():   # no GPU: says so, and the same functions ran on CPU
        from bench.bench_score_gpu import NOT_RUN

        assert result["error"] == NOT_RUN and result["own_ratios"]["score_gpu.pipeline_over_model_alone"] is None
        assert result["own_ratios"]["score_gpu.cores_per_gpu"] is None
        check = result["cpu_check"]
        assert check["device"] == "cpu" and check["dtype"] == "fp32" and check["images"] == 4
        assert set(check["images_per_s_per_gpu"]) == {"pipeline", "pipeline_gpu_decode", "model_alone",
                                                      "gpu_decode_alone"}
        assert all(v > 0 for v in check["images_per_s_per_gpu"].values())
        assert check["cpu_stage_images_per_s_per_core"] > 0 and 0 < check["pipeline_over_model_alone"]
        assert len(check["timing"]["pipeline"]["runs_s"]) == check["repeats"]
        return
    if name == "recaption" and not common.gpu():   # no GPU: says so; the tiny random model ran the same code
        from bench.bench_recaption import NOT_RUN

        assert result["error"] == NOT_RUN and result["own_ratios"]["recaption.images_per_s_per_gpu"] is None
        check = result["cpu_check"]
        assert check["device"] == "cpu" and check["model"] == "tiny" and check["images"] == 4
        assert set(check["per_batch_size"]["2"]["images_per_s"]) == {"engine", "generate_alone"}
        assert check["images_per_s_per_gpu"] > 0 and check["engine_over_generate_alone"] > 0
        return
    assert "error" not in result, result.get("traceback")
    if name == "download":
        assert result["own_ratios"]["download.ours_over_img2dataset"] > 0
        many = result["many_hosts"]
        assert many["urls_on_first_host"] == result["sizes"]["images"] // 2
        assert 0 < many["peak_per_host"]["ours"] <= many["per_host_connections"]
        assert many["peak_per_host"]["img2dataset"] > 0 and many["images_per_s"]["ours"] > 0
    if name == "near_dup":   # smoke sizes: too few distinct images for the 50k false-merge figure
        assert result["own_ratios"]["near_dup.precision"] > 0.99 and result["false_merges"]["images"] == 600
        assert result["own_ratios"]["near_dup.false_merges_50k"] is None
    if name == "graphic":
        assert result["own_ratios"]["graphic.accuracy"] > 0.9
    if name == "caption_first":   # one request per row that passes, none for the rest; img2dataset asks for all
        assert result["own_ratios"]["caption_first.requests_over_passing"] == 1.0
        sample = result["sample"]
        assert sample["requests"]["img2dataset"] == sample["rows_with_url"] > sample["requests"]["ours"]
        shards = -(-sample["rows"] // 250)   # robots.txt once per host per download task
        assert 0 < sample["robots_txt_requests"]["ours"] <= shards * sample["robots_txt_requests"]["hosts"]
    if name == "rescore":   # OCR added to a run scored with [nsfw]: the partial re-score ran and was timed
        assert result["rows"] == 40 and all(t["median_s"] > 0 for t in result["timings"].values())
        assert result["own_ratios"]["rescore.add_ocr_over_full"] > 0
    if name == "score_cpu":
        assert result["images_per_s_per_core"]["ours"] > 0 and result["images_per_s_per_core"]["careful_loop"] > 0
        assert result["own_ratios"]["score_cpu.ours_over_careful_loop"] > 0
        assert result["not_like_for_like"]["data_juicer"]
        assert 0 < result["own_ratios"]["score_cpu.view_hashes_overhead"] < 1
        assert "smoke" in result["data_juicer"]["error"]  # Data-Juicer takes a minute: quick mode only
    if name == "score_stage":   # the real stage through Ray, and a real `curate run` subprocess
        assert result["stage_rows_per_s"]["models_off"] > 0 and result["rows"] == 40 and result["rows_big"] == 80
        assert result["rows_per_s_with_startup"]["pool"] > 0
        assert len(result["timings"]["stage_big"]["runs_s"]) == result["repeats"]
        # 40 rows beyond 40: their time difference is noise at this size, so the marginal rate may be null
        ratio = result["own_ratios"]["score_stage.ray_over_loop"]
        assert ratio is None or ratio > 0
        assert 0 < result["own_ratios"]["score_stage.ray_over_loop_with_startup"] < 5
        start = result["startup"]["milestones_s"]
        assert 0 < start["config_loaded_ray_starting"] < start["first_rows_scored"]
        assert result["own_ratios"]["score_stage.startup_s"] == start["first_rows_scored"]
        assert result["own_ratios"]["score_stage.startup_models_s"] is None and result["startup_models"]["not_run"]
    if name == "scale":   # the real decide and write on synthetic runs: every row accounted for
        for size in result["per_size"]:
            assert not size["failures"] and 0 < size["kept"] < size["rows"]
            assert size["out_shards"] == -(-size["kept"] // result["samples_per_shard"])
            assert size["peak_mb"]["driver_mb"] > 0 and size["peak_mb"]["worker_max_mb"] > 0
            assert 0 < size["decide_us_per_row"] < size["us_per_row"]
            funnel = size["funnel"]   # every decide step fired: rules, each dedup kind, the rebalance
            assert funnel["rows_in"] == size["rows"] and funnel["kept"] == size["kept"]
            for reason in ("download_failed", "caption_common", "low_clip", "low_aesthetic", "duplicate", "rebalanced"):
                assert funnel["dropped"].get(reason, 0) > 0, reason
            kinds = size["duplicates_by_kind"]
            assert sum(kinds.values()) == funnel["dropped"]["duplicate"] and min(kinds.values()) > 0, kinds
        assert all(result["own_ratios"][k] > 0 for k in OWN_RATIOS["scale"])
    if name == "scale1b":   # the 1B shape, scaled: the cap was hit and split, the planted groups found, bounded
        assert not result["failures"] and result["funnel"]["dropped"]["duplicate"] > 0
        assert result["dedupe"]["split_buckets"] > 0 and result["own_ratios"]["scale1b.skipped_hashes"] == 0
        assert result["groups_found"]["planted_largest"] > 1
        assert result["own_ratios"]["scale1b.largest_group_over_planted"] <= 1.5
        assert result["dedupe"]["groups"]["largest"] == result["groups_found"]["largest"]
        assert result["own_ratios"]["scale1b.components_bytes_per_edge_row"] > 0
    if name == "ocr":   # real inference through the score stage: OCR costs time, never nothing
        assert result["scorer_alone"]["images_per_s_per_core"]["detect"] > 0
        assert result["own_ratios"]["ocr.stage_ocr_over_no_model"] > 1
    if name == "scaling":   # in smoke mode on the session's Ray, tens of rows: the fields, not the figures
        assert result["sizes"]["rows"] == [30, 60] and result["tiny"]["rows"] == 10 and result["tiny"]["seconds"] > 0
        for n, size in result["per_size"].items():
            assert size["rows"] == int(n) and not size["failures"]
            # Tens of rows beyond the tiny run: their time difference is noise, so its sign is not asserted.
            assert isinstance(size["sec_per_1k"], float) and size["sec_per_1k_with_startup"] > 0
            assert size["peak_mb"]["driver_mb"] > 0 and size["peak_mb"]["workers_mb"] > 0
            assert size["peak_mb"]["workers_shmem_mb"] >= 0 and size["peak_mb"]["worker_mb"] > 0
            assert size["ray_memory"]["object_store_capacity_mb"] > 0 and size["ray_memory"]["workers"]
            assert set(size["phases_s"]) == {"download", "score", "decide", "write"}
        assert result["own_ratios"]["scaling.peak_mem_max_over_min"] > 0
        per_1k = result["own_ratios"]["scaling.sec_per_1k_max_over_min"]
        assert per_1k is None or per_1k > 0   # null where a size's difference came out non-positive


def test_runner_writes_every_ratio_and_the_table(tmp_path, monkeypatch):
    fake = {
        "download": {"images_per_s": {"ours": 95.0, "img2dataset": 100.0},
                     "own_ratios": {"download.ours_over_img2dataset": 0.95}},
        "score_cpu": {"images_per_s_per_core": {"ours": 30.0}, "data_juicer": {"error": "pip failed"},
                      "own_ratios": {"score_cpu.ours_over_careful_loop": 1.5, "score_cpu.ours_over_data_juicer": None}},
    }
    ratios, missing = run.merge_ratios(fake)
    assert set(run.RATIOS) <= set(ratios)
    assert missing["score_cpu.ours_over_data_juicer"] == "pip failed"
    assert missing["scaling.sec_per_1k_max_over_min"] == "benchmark not run"
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{run.START}\nold\n{run.END}\n\nafter\n")
    monkeypatch.setattr(run, "README", readme)
    run.update_readme(run.markdown(run.table_rows(fake, ratios), missing, "header"))
    text = readme.read_text()
    assert "old" not in text and "| download | ours / img2dataset | 0.95 | ≥ 0.9 |" in text
    assert text.startswith("# Benchmarks\n\nintro") and text.rstrip().endswith("after")


def test_runner_main_writes_one_json_per_benchmark(tmp_path, monkeypatch):
    # The benchmark's own result comes from its smoke test above (the same call): this test is
    # about what the runner writes around it.
    monkeypatch.setattr(run, "run_one", lambda name, mode: smoke(name) if mode == "smoke" else pytest.fail(mode))
    run.main(["--smoke", "--only", "score_gpu", "--results", str(tmp_path)])
    data = json.loads((tmp_path / "score_gpu.json").read_text())
    assert set(run.RATIOS) <= set(data["ratios"]) and data["ratios_missing"]
    assert not list(tmp_path.glob("*.tmp"))


def test_peak_memory_sees_a_child_process():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(1.5)"])
    with common.PeakMemory(os.getpid(), every=0.05) as memory:
        child.wait()
    assert memory.workers_mb > 150 and memory.driver_mb > 0


def test_side_by_side_takes_turns_and_reports_medians():
    calls = []

    def contender(name, seconds):
        def fn():
            calls.append(name)
            return seconds
        return fn

    out = common.side_by_side({"a": contender("a", 1.0), "b": contender("b", 2.0)}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert out["a"]["median_s"] == 1.0 and len(out["b"]["runs_s"]) == 3
    assert common.rate(10, out["b"]) == 5.0
    assert common.timer()() < time.perf_counter()
