"""`make bench`: run every benchmark, write bench/results/{name}.json, print and record the table.

    python -m bench.run            # quick: a few minutes on 2 cores
    python -m bench.run --full     # larger sizes
    python -m bench.run --only download score_cpu   # re-run some; the others' figures are kept

Every JSON carries the machine, versions, sizes, medians with every repeat, and the same
top-level `ratios` object: every headline figure of every benchmark, null where it could not
be measured (the reason is in `ratios_missing`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, machine, versions

RESULTS = ROOT / "bench" / "results"
README = ROOT / "bench" / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
RATIOS = ("download.ours_over_img2dataset", "download.many_hosts_ours_over_img2dataset",
          "score_cpu.ours_over_careful_loop", "score_cpu.ours_over_data_juicer",
          "score_stage.ray_over_loop", "score_stage.ray_over_loop_with_startup", "score_stage.startup_s",
          "score_stage.startup_models_s", "score_gpu.cores_per_gpu",
          "scaling.sec_per_1k_max_over_min", "scaling.peak_mem_max_over_min", "score_gpu.pipeline_over_model_alone",
          "scale.sec_per_row_max_over_min", "scale.driver_peak_max_over_min", "scale.driver_peak_mb_at_max",
          "scale.write_samples_per_s_per_core", "ocr.stage_nsfw_ocr_over_nsfw", "ocr.stage_ocr_over_no_model",
          "score_cpu.view_hashes_overhead", "near_dup.min_recall_crops_mirrors",
          "near_dup.min_recall_others", "near_dup.precision", "near_dup.false_merges_50k", "graphic.accuracy",
          "rescore.add_ocr_over_full",
          "scale1b.driver_peak_mb", "scale1b.object_store_peak_mb", "scale1b.skipped_hashes",
          "scale1b.components_bytes_per_edge_row", "scale1b.largest_group_over_planted",
          "scale1b.shuffle_bytes_per_survivor", "scale1b.plan_us_per_input_row", "scale1b.decide_us_per_row",
          "scale1b.us_per_row",
          "caption_first.plan_rows_per_s", "caption_first.requests_over_passing",
          "caption_first.img2dataset_requests_over_ours", "caption_first.img2dataset_raw_bytes_over_ours",
          "recaption.engine_over_generate_alone", "recaption.images_per_s_per_gpu", "recaption.gpu_hours_per_100m")


def _models(mode: str) -> dict:
    """bench_models (the model scorers' own benchmark): median per configuration over the repeats.

    It builds about a dozen model configurations, minutes on a busy 2-core CPU, so the quick
    mode runs it once and the full mode three times; the smoke test measures one small
    configuration (open_nsfw, 8 images), so it still runs a real model end to end.
    """
    from bench import bench_models

    repeats = 3 if mode == "full" else 1
    argv: list[str] = ["--images", "8", "--batch-size", "4", "--only", "open_nsfw"] if mode == "smoke" else []
    runs = [bench_models.main(argv) for _ in range(repeats)]
    rates = {k: round(statistics.median(r["images_per_s"][k] for r in runs), 2) for k in runs[0]["images_per_s"]}
    return {**runs[0], "images_per_s": rates, "repeats": repeats,
            "runs_images_per_s": [r["images_per_s"] for r in runs], "ratios": {}}


def _bench(name: str) -> Callable[[str], dict]:
    if name == "models":
        return _models
    if name == "scale1b":   # a regime of bench_scale: the same phases at a 1B run's shape
        from bench.bench_scale import run_1b

        return run_1b
    module = __import__(f"bench.bench_{name}", fromlist=["run"])
    return module.run


BENCHMARKS = ("download", "score_cpu", "score_stage", "models", "near_dup", "graphic", "scaling", "scale", "scale1b",
              "ocr", "score_gpu", "rescore", "caption_first", "recaption")


def run_one(name: str, mode: str) -> dict:
    """One benchmark, timed; an exception becomes the JSON's `error`, never a made-up figure."""
    started = time.time()
    try:
        result = _bench(name)(mode)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"[:1500], "traceback": traceback.format_exc()[-3000:],
                  "ratios": {}}
    own = {k if "." in k else f"{name}.{k}": v for k, v in result.pop("ratios", {}).items()}
    return {"benchmark": name, "mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1), "machine": machine(), "versions": versions(),
            **result, "own_ratios": own}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def merge_ratios(results: dict[str, dict]) -> tuple[dict, dict]:
    """Every headline ratio across benchmarks, and why each missing one is missing."""
    ratios = dict.fromkeys(RATIOS)
    for result in results.values():
        ratios.update(result.get("own_ratios", {}))
    missing = {}
    for key in (k for k, v in ratios.items() if v is None):
        source = results.get(key.split(".")[0], {})
        missing[key] = source.get("error") or source.get("data_juicer", {}).get("error") or "benchmark not run"
    return ratios, missing


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:,.3g}" if isinstance(value, float) and abs(value) < 100 else f"{value:,.0f}" \
        if isinstance(value, (int, float)) else str(value)


def table_rows(results: dict[str, dict], ratios: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, value, goal) rows for the printed and recorded table."""
    rows = []
    dl = results.get("download", {})
    for who, v in dl.get("images_per_s", {}).items():
        rows.append(("download", f"{who} images/s", _fmt(v), ""))
    rows.append(("download", "ours / img2dataset", _fmt(ratios["download.ours_over_img2dataset"]), "≥ 0.9"))
    many = dl.get("many_hosts", {})
    for who, v in many.get("images_per_s", {}).items():
        rows.append(("download, 16 hosts (sorted, half on one)", f"{who} images/s", _fmt(v), ""))
    for who, v in many.get("peak_per_host", {}).items():
        goal = f"≤ {many['per_host_connections']}" if who == "ours" else ""
        rows.append(("download, 16 hosts (sorted, half on one)", f"{who} peak connections on one host", _fmt(v), goal))
    rows.append(("download, 16 hosts (sorted, half on one)", "ours / img2dataset",
                 _fmt(ratios["download.many_hosts_ours_over_img2dataset"]), ""))
    pits = dl.get("tarpits") or {}
    for who, v in pits.get("images_per_s", {}).items():
        rows.append((f"download, {pits['hosts']} hosts, {pits['tarpit_hosts']} slow-drip tarpits", f"{who} images/s",
                     _fmt(v), ""))
    sc = results.get("score_cpu", {})
    for who, v in sc.get("images_per_s_per_core", {}).items():
        rows.append(("score_cpu", f"{who} images/s per core", _fmt(v), ""))
    if "captions_per_s_per_core" in sc:
        rows.append(("score_cpu", "captions/s per core (text scorer alone)", _fmt(sc["captions_per_s_per_core"]),
                     "well above ours images/s"))
    rows.append(("score_cpu", "ours / careful single-decode loop", _fmt(ratios["score_cpu.ours_over_careful_loop"]),
                 "≥ 1"))
    rows.append(("score_cpu", "ours / Data-Juicer (not like for like: see JSON)",
                 _fmt(ratios["score_cpu.ours_over_data_juicer"]), "≥ 3"))
    rows.append(("score_cpu", "extra view hashes: CPU over ours without them",
                 _fmt(ratios["score_cpu.view_hashes_overhead"]), "≤ 0.15"))
    st = results.get("score_stage", {})
    cpus = f"{st.get('ray_cpus', 0):g} CPUs"
    for label, v in st.get("rows_per_s_marginal", {}).items():
        rows.append(("score_stage", f"{label}, models off: marginal rows/s ({cpus})", _fmt(v), ""))
    for label, v in st.get("rows_per_s_with_startup", {}).items():
        rows.append(("score_stage", f"{label}, models off: rows/s with start-up, {st.get('rows_big', 0):,} rows",
                     _fmt(v), ""))
    rows.append(("score_stage", f"stage / careful loop in a pool of {cpus}, marginal, models off",
                 _fmt(ratios["score_stage.ray_over_loop"]), "≥ 0.8"))
    rows.append(("score_stage", "the same, rates with start-up", _fmt(ratios["score_stage.ray_over_loop_with_startup"]),
                 ""))
    rows.append(("score_stage", "start-up: `curate run` to first scored row, models off, s",
                 _fmt(ratios["score_stage.startup_s"]), "≤ 10"))
    rows.append(("score_stage", "start-up with open_nsfw and OCR, s", _fmt(ratios["score_stage.startup_models_s"]),
                 "≤ 20"))
    for label, v in results.get("models", {}).get("images_per_s", {}).items():
        if label == "all" or "_without_" not in label:
            rows.append(("models (CPU, tiny towers)", f"{label} images/s", _fmt(v), ""))
    rows.append(("near_dup", "min recall, crops and mirrors", _fmt(ratios["near_dup.min_recall_crops_mirrors"]),
                 "≥ 0.97"))
    rows.append(("near_dup", "min recall, other transforms", _fmt(ratios["near_dup.min_recall_others"]), "≥ 0.99"))
    rows.append(("near_dup", "precision on pairs", _fmt(ratios["near_dup.precision"]), "≥ 0.999"))
    rows.append(("near_dup", "rows merged among 50,000 distinct images", _fmt(ratios["near_dup.false_merges_50k"]),
                 "0"))
    rows.append(("graphic", "photo / graphic label accuracy", _fmt(ratios["graphic.accuracy"]), "≥ 0.9"))
    for n, s in results.get("scaling", {}).get("per_size", {}).items():
        rows.append(("scaling", f"{int(n):,} rows: s per 1k rows beyond the tiny run's", _fmt(s["sec_per_1k"]), ""))
        rows.append(("scaling", f"{int(n):,} rows: peak MB driver / workers",
                     f"{_fmt(s['peak_mb']['driver_mb'])} / {_fmt(s['peak_mb']['workers_mb'])}", ""))
    rows.append(("scaling", "s per 1k max / min", _fmt(ratios["scaling.sec_per_1k_max_over_min"]), "≤ 1.2"))
    rows.append(("scaling", "peak memory max / min", _fmt(ratios["scaling.peak_mem_max_over_min"]), "≤ 1.2"))
    for s in results.get("scale", {}).get("per_size", []):
        rows.append(("scale", f"{s['rows']:,} rows decide+write: µs per row", _fmt(s["us_per_row"]), ""))
        if "decide_us_per_row" in s:
            rows.append(("scale", f"{s['rows']:,} rows decide alone (every rule and dedup kind): µs per row",
                         _fmt(s["decide_us_per_row"]), ""))
        rows.append(("scale", f"{s['rows']:,} rows: peak MB driver / largest worker",
                     f"{_fmt(s['peak_mb']['driver_mb'])} / {_fmt(s['peak_mb'].get('worker_max_mb'))}", ""))
    rows.append(("scale", "s per row max / min", _fmt(ratios["scale.sec_per_row_max_over_min"]), "≤ 1.2"))
    rows.append(("scale", "driver peak max / min", _fmt(ratios["scale.driver_peak_max_over_min"]), "≤ 1.2"))
    rows.append(("scale", "driver peak MB at max", _fmt(ratios["scale.driver_peak_mb_at_max"]), "≤ 2,000"))
    rows.append(("scale", "write samples/s per core", _fmt(ratios["scale.write_samples_per_s_per_core"]), "≥ 5,000"))
    b = results.get("scale1b", {})
    where = (f"scale1b ({b['rows']:,} rows, {b['groups']:,} groups x {b['partitions']} partitions)"
             if "rows" in b else "scale1b")
    for key, label, goal in (("driver_peak_mb", "driver peak MB", "≤ 2,048"),
                             ("object_store_peak_mb", "object store peak MB (shared-memory PSS)", ""),
                             ("skipped_hashes", "near-dup hashes skipped", "0"),
                             ("components_bytes_per_edge_row", "components bytes per row with an edge",
                              "docs/scale.md's bound (≤ 1.2x)"),
                             ("largest_group_over_planted", "largest group / largest planted", "≤ 1.5"),
                             ("shuffle_bytes_per_survivor", "candidates shuffle bytes per survivor", ""),
                             ("plan_us_per_input_row", "input plan µs per input row", ""),
                             ("decide_us_per_row", "decide µs per row", ""),
                             ("us_per_row", "decide + write µs per row", "")):
        rows.append((where, label, _fmt(ratios[f"scale1b.{key}"]), goal))
    ocr = results.get("ocr", {})
    for label, v in ocr.get("scorer_alone", {}).get("images_per_s_per_core", {}).items():
        rows.append(("ocr", f"{label} images/s per core (scorer alone)", _fmt(v), ""))
    for label, v in ocr.get("stage_rows_per_s", {}).items():
        rows.append(("ocr", f"score stage, models {label}: rows/s", _fmt(v), ""))
    rows.append(("ocr", "score stage: nsfw+ocr / nsfw time", _fmt(ratios["ocr.stage_nsfw_ocr_over_nsfw"]), "≤ 2"))
    rows.append(("ocr", "score stage: ocr / no model time", _fmt(ratios["ocr.stage_ocr_over_no_model"]), ""))
    gpu = results.get("score_gpu", {})
    for label, v in gpu.get("images_per_s_per_gpu", {}).items():
        rows.append((f"score_gpu ({gpu.get('device')}, {gpu.get('dtype')})", f"{label} images/s per GPU", _fmt(v), ""))
    if "cpu_cores_to_feed_one_gpu" in gpu:
        rows.append(("score_gpu", "CPU stage images/s per core", _fmt(gpu["cpu_stage_images_per_s_per_core"]), ""))
    rows.append(("score_gpu", "pipeline / model alone", _fmt(ratios["score_gpu.pipeline_over_model_alone"]), "≥ 0.8"))
    rows.append(("score_gpu", "CPU cores per GPU (model images/s per GPU / CPU stage images/s per core)",
                 _fmt(ratios["score_gpu.cores_per_gpu"]), "≤ the machine's cores / GPUs"))
    if "gpu_decode_pipeline_over_model_alone" in gpu:
        rows.append(("score_gpu", "pipeline with gpu_decode / model alone",
                     _fmt(gpu["gpu_decode_pipeline_over_model_alone"]), ""))
    rc = results.get("recaption", {})
    where = f"recaption ({rc.get('device')}, {rc.get('dtype')})" if "device" in rc else "recaption"
    rows.append((where, f"Qwen2-VL-2B images/s per GPU (batch {rc.get('best_batch_size', '—')}, "
                        f"{rc.get('tokens_per_caption', '—')} tokens)",
                 _fmt(ratios["recaption.images_per_s_per_gpu"]), ""))
    rows.append((where, "GPU hours per 100M kept rows", _fmt(ratios["recaption.gpu_hours_per_100m"]), ""))
    rows.append((where, "engine / generate alone", _fmt(ratios["recaption.engine_over_generate_alone"]), "≥ 0.8"))
    cf = results.get("caption_first", {})
    if cf.get("sizes"):
        rows.append(("caption_first", f"plan of {cf['sizes']['rows']:,} LAION-multi-like rows with the rules before "
                                      f"download: rows/s ({cf['sizes']['ray_cpus']} CPUs)",
                     _fmt(ratios["caption_first.plan_rows_per_s"]), ""))
        rows.append(("caption_first", "share of the rows never requested", _fmt(cf.get("share_never_requested")), ""))
    rows.append(("caption_first", "requests / rows passing every rule before download",
                 _fmt(ratios["caption_first.requests_over_passing"]), "1.0"))
    rows.append(("caption_first", "img2dataset requests / ours, same input",
                 _fmt(ratios["caption_first.img2dataset_requests_over_ours"]), ""))
    rows.append(("caption_first", "img2dataset raw bytes / ours, same input",
                 _fmt(ratios["caption_first.img2dataset_raw_bytes_over_ours"]), ""))
    return rows


def markdown(rows: list[tuple[str, str, str, str]], missing: dict, header: str) -> str:
    lines = [header, "", "| benchmark | figure | value | goal |", "|---|---|---|---|"]
    lines += [f"| {b} | {f} | {v} | {g} |" for b, f, v, g in rows]
    if missing:
        lines += ["", "Not measured:"] + [f"- `{k}`: {why.splitlines()[0][:300]}" for k, why in missing.items()]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    """Replace the table between the markers in bench/README.md (append the markers if absent)."""
    block = f"{START}\n{text}\n{END}"
    old = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(new, encoding="utf-8")


def load_previous() -> dict[str, dict]:
    out = {}
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="larger sizes (tens of minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run these; keep the others' last results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds each (the test suite's mode)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args.results.mkdir(parents=True, exist_ok=True)
    results = load_previous() if args.results == RESULTS else {}
    for name in args.only or BENCHMARKS:
        print(f"bench: running {name} ({mode}) ...", flush=True)
        results[name] = run_one(name, mode)
        print(f"bench: {name} done in {results[name]['seconds']} s"
              + (f" — {results[name]['error'][:200]}" if results[name].get("error") else ""), flush=True)
    ratios, missing = merge_ratios(results)
    for name, result in results.items():
        _write(args.results / f"{name}.json", {**result, "ratios": ratios, "ratios_missing": missing})
    info = machine()
    command = {"full": "make bench FULL=1", "quick": "make bench"}.get(mode, "python -m bench.run --smoke")
    if args.only:
        command = f"python -m bench.run{' --full' if mode == 'full' else ''} --only {' '.join(args.only)}"
    header = (f"`{command}` on {info['cpu_model']}, {info['cores']} cores, {info['memory_gb']} GB, "
              f"GPU: {info['gpu'] or 'none'}; finished {time.strftime('%Y-%m-%d %H:%M')}."
              + (" Other rows: each benchmark's last run, in bench/results/." if args.only else ""))
    text = markdown(table_rows(results, ratios), missing, header)
    print("\n" + text)
    if args.results == RESULTS:
        update_readme(text)
    return results


if __name__ == "__main__":
    main()
