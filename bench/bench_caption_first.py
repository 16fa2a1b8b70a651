"""Caption first: planning rate with the before-download rules, and the requests they save.

A synthetic input shaped like LAION's multilingual part (LAION-2B-multi): uppercase URL and TEXT,
float WIDTH/HEIGHT, similarity (at least 0.26, as that set was filtered), punsafe, pwatermark and
LANGUAGE, with most captions not Chinese, some stock captions on thousands of URLs and some URLs
repeated. Two measurements:

1. planning: the cut and the screen (curate/phases/download/plan.py, curate/phases/download/screen.py)
   on `rows` rows through a local Ray (warmed up on 2,000 other rows first), with LAION's own thresholds
   in input.where and input.caption_first, as rows/s of the whole plan; the same plan with caption_first
   off shows what the caption columns cost;
2. requests: a served sample of the same input (bench.hosts_server counts every request) downloaded
   by our download phase and by img2dataset (which downloads every row it is given): the requests
   each makes and the raw bytes each stores, against the rows that pass every before-download rule.

    python -m bench.bench_caption_first [--rows 1000000] [--sample 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import photos

SIZES = {"smoke": (2_000, 60), "quick": (200_000, 600), "full": (1_000_000, 1_000)}
WHERE = "punsafe < 0.5 and pwatermark < 0.8"   # LAION-5B's published thresholds
# LAION-2B-multi's largest languages, roughly; zh is a small share of it
LANGUAGES = {"ru": 0.14, "fr": 0.10, "de": 0.10, "es": 0.10, "ja": 0.07, "zh": 0.07, "it": 0.06, "pt": 0.06,
             "pl": 0.05, "nl": 0.05, "ko": 0.04, "tr": 0.04, "vi": 0.04, "other": 0.08}
WORDS = {
    "ru": "красивый дом природа лето зима город улица море фото собака кошка цветы".split(),
    "fr": "belle maison nature été hiver ville rue mer photo chien chat fleurs".split(),
    "de": "schönes Haus Natur Sommer Winter Stadt Straße Meer Foto Hund Katze Blumen".split(),
    "es": "hermosa casa naturaleza verano invierno ciudad calle mar foto perro gato flores".split(),
    "it": "bella casa natura estate inverno città strada mare foto cane gatto fiori".split(),
    "pt": "linda casa natureza verão inverno cidade rua mar foto cão gato flores".split(),
    "pl": "piękny dom natura lato zima miasto ulica morze zdjęcie pies kot kwiaty".split(),
    "nl": "mooi huis natuur zomer winter stad straat zee foto hond kat bloemen".split(),
    "tr": "güzel ev doğa yaz kış şehir sokak deniz fotoğraf köpek kedi çiçekler".split(),
    "vi": "đẹp nhà thiên nhiên mùa hè mùa đông thành phố đường biển ảnh chó mèo hoa".split(),
    "other": "beautiful house nature summer winter city street sea photo dog cat flowers".split(),
    "ja": "美しい 家 自然 夏の 冬の 街 通り 海 写真 犬 猫 花 の が と".split(),
    "ko": "아름다운 집 자연 여름 겨울 도시 거리 바다 사진 개 고양이 꽃".split(),
    "zh": "美丽的 房子 自然 夏天 冬天 城市 街道 大海 照片 小狗 小猫 鲜花 高清 风景 摄影".split(),
}
STOCK = ["Stock Photo", "Image", "高清壁纸图片素材", "Foto de stock"]   # captions on thousands of URLs


def laion_multi(n: int, seed: int, url=lambda i: f"http://img{i % 997}.example{i % 31}.com/{i}.jpg") -> pa.Table:
    """n rows shaped like LAION-2B-multi's parquet (module docstring); `url(i)` makes row i's URL."""
    rng = np.random.default_rng(seed)
    langs = np.array(list(LANGUAGES))
    lang = rng.choice(langs, n, p=np.array(list(LANGUAGES.values())) / sum(LANGUAGES.values()))
    length = rng.integers(3, 12, n)
    picks = rng.integers(0, 1 << 30, (n, 12))
    text = []
    for i in range(n):
        words = WORDS[lang[i]]
        chosen = [words[p % len(words)] for p in picks[i, :length[i]]]
        text.append(("" if lang[i] == "zh" else " ").join(chosen))
    stock = rng.random(n) < 0.01
    for i in np.flatnonzero(stock):
        text[i] = STOCK[i % len(STOCK)]
    urls = [url(i) for i in range(n)]
    repeat = np.flatnonzero(rng.random(n) < 0.02)                   # a URL listed twice
    for i in repeat:
        urls[i] = urls[max(i - 1, 0)]
    missing = rng.random(n) < 0.001
    return pa.table({
        "URL": pa.array([None if m else u for u, m in zip(urls, missing)], pa.string()),
        "TEXT": pa.array([None if rng_null else t for t, rng_null in zip(text, rng.random(n) < 0.002)], pa.string()),
        "WIDTH": np.round(rng.lognormal(6.3, 0.5, n)).astype(np.float64),
        "HEIGHT": np.round(rng.lognormal(6.2, 0.5, n)).astype(np.float64),
        "similarity": np.clip(rng.normal(0.30, 0.03, n), 0.26, 0.6),
        "punsafe": rng.beta(0.3, 3.0, n),        # 2.6% at or above 0.5
        "pwatermark": rng.beta(1.0, 2.0, n),     # 4% at or above 0.8
        "LANGUAGE": pa.array(lang.tolist(), pa.string()),
    })


def _config(root: Path, source: Path, caption_first: bool, shard_rows: int):
    from curate.config import resolve, validate

    return resolve(validate({
        "run_dir": str(root), "input": {"paths": [str(source)], "url_col": "URL", "caption_col": "TEXT",
                                        "extra_cols": ["LANGUAGE"], "where": WHERE, "caption_first": caption_first,
                                        "shard_rows": shard_rows},
        "download": {"allow_networks": ["127.0.1.0/24"], "retries": 0, "thread_count": 16},
        "ray": {"num_cpus": 2}}))


def plan_once(root: Path, source: Path, caption_first: bool, shard_rows: int) -> dict:
    """One whole plan (cut + screen) as the pipeline runs it; its seconds and what it dropped."""
    import ray

    from curate.phases.download.plan import check_input, cut
    from curate.phases.download.screen import run_screen
    from curate.run.rundir import RunDir
    from curate.run.storage import Storage

    shutil.rmtree(root, ignore_errors=True)
    cfg = _config(root, source, caption_first, shard_rows)
    run = RunDir(cfg.run_dir, Storage())
    started = time.perf_counter()
    check_input(cfg.input, run.storage)
    info = ray.get(ray.remote(num_cpus=0.5)(cut).remote(cfg.input, run))
    cut_s = time.perf_counter() - started
    screened = run_screen(cfg, run, info["shards"], info["rows"])
    seconds = time.perf_counter() - started
    return {"rows": info["rows"], "shards": len(info["shards"]), "seconds": round(seconds, 2),
            "cut_seconds": round(cut_s, 2), "rows_per_s": round(info["rows"] / seconds, 1),
            "dropped_before_download": screened["rows"], "reasons": screened["reasons"]}


def _requests(bases: list[str]) -> tuple[int, int]:
    """(row requests, robots.txt requests) the hosts answered since they were last asked."""
    counts = [json.loads(urllib.request.urlopen(f"{b}/_peak", timeout=10).read()) for b in bases]
    return sum(c["requests"] for c in counts), sum(c["robots"] for c in counts)


def _tar_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def requests_on_sample(root: Path, n: int, seed: int) -> dict:
    """Our download and img2dataset's on the same served sample: requests and raw bytes of each."""
    from bench.bench_download import served_hosts
    from curate.pipeline import run_phases

    files = photos(root / "images", 100, 256, 512, seed)
    with served_hosts(root / "images", 4) as bases:
        table = laion_multi(n, seed, url=lambda i: f"{bases[i % 4]}/{files[i % len(files)].name}?row={i}")
        source = root / "sample.parquet"
        pq.write_table(table, source)
        _requests(bases)
        cfg = _config(root / "ours", source, True, 250)
        out = run_phases(cfg, ("download",))
        if not out.ok:
            raise RuntimeError(f"our download failed: {out.failures}")
        ours, ours_robots = _requests(bases)
        planned = pa.concat_tables(pq.read_table(p) for p in sorted((root / "ours" / "input_shards").glob("*.parquet")))
        passing = sum(r is None and bool(u) for r, u in zip(planned.column("before_download").to_pylist(),
                                                            planned.column("url").to_pylist()))
        i2d = root / "i2d"
        cmd = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(source), "--input_format", "parquet",
               "--url_col", "URL", "--caption_col", "TEXT", "--output_format", "webdataset",
               "--output_folder", str(i2d), "--processes_count", "1", "--thread_count", "16",
               "--number_sample_per_shard", str(n), "--image_size", "1024", "--resize_mode", "keep_ratio",
               "--resize_only_if_bigger", "True", "--encode_format", "jpg", "--retries", "0",
               "--enable_wandb", "False", "--distributor", "multiprocessing"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        theirs, _ = _requests(bases)
    return {"rows": n, "rows_with_url": sum(bool(u) for u in table.column("URL").to_pylist()),
            "passing_before_download": passing,
            "requests": {"ours": ours, "img2dataset": theirs},
            "robots_txt_requests": {"ours": ours_robots, "hosts": len(bases)},
            "raw_bytes": {"ours": _tar_bytes(root / "ours" / "raw"), "img2dataset": _tar_bytes(i2d)}}


def run(mode: str, rows: int | None = None, sample: int | None = None) -> dict:
    from curate.config import RayConfig
    from curate.run.runtime import init_ray

    rows, sample = rows or SIZES[mode][0], sample or SIZES[mode][1]
    init_ray(RayConfig(num_cpus=2))
    with tempfile.TemporaryDirectory(prefix="bench_cf_") as tmp:
        root = Path(tmp)
        made = time.perf_counter()
        source = root / "laion_multi.parquet"
        pq.write_table(laion_multi(rows, 0), source, row_group_size=100_000)
        generated = round(time.perf_counter() - made, 1)
        shard_rows = max(1_000, rows // 50)
        warm = root / "warm.parquet"   # Ray's workers start and load jieba and OpenCC once, outside the timing
        pq.write_table(laion_multi(2_000, 9), warm)
        plan_once(root / "plan_warm", warm, True, 1_000)
        first = plan_once(root / "plan_first", source, True, shard_rows)
        where_only = plan_once(root / "plan_where", source, False, shard_rows)
        url_rows = rows - pq.read_table(source, columns=["URL"]).column("URL").null_count
        served = requests_on_sample(root, sample, 1)
    ours, theirs = served["requests"]["ours"], served["requests"]["img2dataset"]
    return {
        "sizes": {"rows": rows, "sample_rows": sample, "shard_rows": shard_rows, "ray_cpus": 2},
        "input": {"shape": "LAION-2B-multi-like", "where": WHERE, "languages": LANGUAGES, "generated_s": generated},
        "plan": {"caption_first": first, "where_only": where_only},
        "plan_rows_per_s": first["rows_per_s"],
        "share_never_requested": round(first["dropped_before_download"] / rows, 4),
        "sample": served,
        "ratios": {
            "caption_first.plan_rows_per_s": first["rows_per_s"],
            "caption_first.requests_over_passing": round(ours / served["passing_before_download"], 4),
            "caption_first.img2dataset_requests_over_ours": round(theirs / ours, 3) if ours else None,
            "caption_first.img2dataset_raw_bytes_over_ours": round(served["raw_bytes"]["img2dataset"]
                                                                   / max(served["raw_bytes"]["ours"], 1), 3),
        },
        "note": ("requests are counted by the server (redirects and retries would add to them; this sample has "
                 "none), robots.txt fetches apart (ours: once per host per task); img2dataset has no caption "
                 "or metadata filter, so it requests every row with a URL "
                 f"({url_rows:,} of {rows:,} in the planned input)"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="quick", choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--sample", type=int, default=None)
    args = parser.parse_args(argv)
    result = run(args.mode, args.rows, args.sample)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
