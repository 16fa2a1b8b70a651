"""report.html: contents, scale (100k rows in seconds, under 20 MB), a real headless browser, the CLI."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from html import escape
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.report import build_report
from curate.report.data import _attributes as attributes
from curate.run.tario import members
from manifests.rules import COMPARE, ROW_RULES, RULES
from manifests.schema import REASONS
from tests.procs import ROOT
from tests.synthetic import CONFIG, RULES_OFF, WARNING, make_run

ARTIFACTS = ROOT / "tests" / "artifacts"


def make_dataset_run(root: Path, n: int, shards: int) -> Path:
    """synthetic.make_run with its manifest as a run writes it: manifest/{shard}.parquet."""
    make_run(root, n, shards=shards)
    table = pq.read_table(root / "manifest.parquet")
    (root / "manifest").mkdir()
    for shard in pc.unique(table.column("shard")).to_pylist():
        part = table.filter(pc.equal(table.column("shard"), shard))
        pq.write_table(part, root / "manifest" / f"{shard}.parquet", row_group_size=max(part.num_rows // 2, 1))
    (root / "manifest.parquet").unlink()
    return root


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    root = make_dataset_run(tmp_path_factory.mktemp("report") / "run", 3000, shards=3)
    build_report(str(root))
    return root


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: $CURATE_CHROMIUM, on PATH, or installed with apt-get (as root, 10 min at most).

    Skips, saying why, only when it is missing and cannot be installed.
    """
    found = os.environ.get("CURATE_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get cannot run here (not root): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        out = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"chromium could not be installed ({exc}): {out.decode(errors='replace')[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def test_report_shows_warnings_funnel_histograms_styles_and_grids(small_run):
    html = (small_run / "report.html").read_text(encoding="utf-8")
    assert html.index(WARNING) < html.index('id="funnel"'), "the RANDOM-weights warning must come first"
    assert "scorer skipped: watermark" in html
    funnel_rows = re.findall(r"<tr><td>([a-z_ ]+)</td><td class=\"num\">", html.split('id="funnel"')[1])
    shown = [r for r in funnel_rows if r in REASONS]
    assert shown == [r for r in REASONS if r in shown] and len(shown) == len(REASONS)
    assert funnel_rows[0] == "rows in" and "kept" in funnel_rows
    for column in ("min_side", "aspect_ratio", "n_chars", "aesthetic", "nsfw", "clip_score", "watermark", "text_area"):
        assert f'data-column="{column}"' in html
    assert "text_heavy: text_area &gt; filters.text_area_max (0.2)" in html and "Dropped: text_heavy" in html
    assert "low_aesthetic: aesthetic &lt; filters.aesthetic_min (4.5)" in html
    assert "caption_long: n_chars &gt; text.max_chars (300)" in html
    assert 'id="styles"' in html and "before rebalance" in html
    assert html.count("data:image/jpeg;base64,") >= 50
    assert "Dropped: nsfw" in html and 'class="nsfw' in html
    assert "Dropped: download_failed" in html and "no image was stored" in html
    assert "Duplicate groups" in html and "representative" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', ""), "the page must not load anything"


def test_report_reads_the_rules_table_and_says_which_rules_were_off(small_run):
    html = (small_run / "report.html").read_text(encoding="utf-8")
    rules = html.split('id="rules"')[1].split("</details>")[0]
    listed = re.findall(r"<tr><td>([a-z_]+)</td><td>", rules)
    assert listed == [r.reason for r in RULES]
    too_small = RULES[3]
    shown = f"<td>{escape(too_small.describe(attributes(CONFIG)))}</td><td>{escape(too_small.doc)}</td><td>on</td>"
    assert shown in rules
    for reason, why in RULES_OFF.items():
        assert f"<td>{reason}</td>" in rules and f"off: {escape(why)}" in rules
    card = html.split('data-column="watermark"')[1].split("</div>")[0]
    assert "threshold-note" not in card and "watermark: watermark &gt;= filters.watermark_max: off (" in card
    assert 'data-column="min_side"' in html and "min(original_width, original_height)" in html


def test_report_metrics_draw_every_threshold_rule_of_the_table():
    from curate.report.data import METRICS, TITLES

    drawn = [r for m in METRICS for r in m.rules]
    thresholds = [r for r in ROW_RULES if r.threshold and r.drops in COMPARE]
    assert sorted(drawn, key=RULES.index) == thresholds and len(set(map(id, drawn))) == len(drawn)
    assert [m.column for m in METRICS] == list(TITLES), "every histogram has a title, every title a histogram"


def test_report_shows_kept_rows_per_bucket(small_run):
    import json

    buckets = json.loads((small_run / "stats.json").read_text())["buckets"]
    section = (small_run / "report.html").read_text(encoding="utf-8").split("<h2>Buckets</h2>")[1].split("<h2>")[0]
    shown = dict(re.findall(r"<tr><td>(\d+x\d+)</td><td class=\"num\">([\d,]+)</td>", section))
    assert {b: int(n.replace(",", "")) for b, n in shown.items()} == buckets and sum(buckets.values()) > 0
    assert "shards mix buckets" in section and "<svg" in section


def test_nsfw_rejected_images_are_blurred(small_run):
    html = (small_run / "report.html").read_text(encoding="utf-8")
    section = html.split("Dropped: nsfw")[1].split("<h3>")[0]
    figures = re.findall(r"<figure class=\"([^\"]*)\"", section)
    assert figures and all("nsfw" in f.split() for f in figures)


@pytest.mark.slow
def test_report_on_100k_rows_takes_seconds_and_stays_small(tmp_path):
    root = make_dataset_run(tmp_path / "big", 100_000, shards=10)
    started = time.time()
    path = Path(build_report(str(root)))
    seconds = time.time() - started
    size = path.stat().st_size
    print(f"report on 100k rows: {seconds:.1f} s, {size / 1e6:.2f} MB")
    assert size < 20e6
    assert seconds < 30, "seconds, not minutes (generous: CI machines are shared)"


def test_tar_reader_matches_tarfile_and_stops_at_missing(small_run):
    import tarfile

    from curate.run.tario import TruncatedTar

    tar_path = next((small_run / "raw").glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        wanted = {names[0], names[-1], "absent.jpg"}
        with open(tar_path, "rb") as f:
            got = dict(members(f, wanted))
        assert set(got) == wanted - {"absent.jpg"}
        assert all(got[n] == tar.extractfile(n).read() for n in got)
    data = tar_path.read_bytes()
    cut = io.BytesIO(data[:512 * 3])   # a header and part of its image: the stream ends inside a member
    with pytest.raises(TruncatedTar):
        list(members(cut))


@pytest.mark.slow
@pytest.mark.timeout(1500)   # the chromium fixture may apt-get install it (600 s per step)
def test_report_in_headless_chromium(small_run, chromium):
    from tests.cdp import Browser

    browser = Browser(chromium)
    try:
        browser.open((small_run / "report.html").as_uri())
        counts = browser.eval("""({
            funnelBars: document.querySelectorAll('#funnel svg rect.bar').length,
            histograms: document.querySelectorAll('#histograms svg.histogram').length,
            thresholds: document.querySelectorAll('#histograms line.threshold').length,
            images: [...document.querySelectorAll('.grid img')].filter(i => i.complete && i.naturalWidth > 0).length,
            alert: document.getElementById('random-weights').getBoundingClientRect().top,
        })""")
        blurred = browser.eval("getComputedStyle(document.querySelector('figure.nsfw img')).filter")
        browser.eval("document.querySelector('figure.nsfw .frame').click()")
        revealed = browser.eval("getComputedStyle(document.querySelector('figure.nsfw img')).filter")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = browser.screenshot(ARTIFACTS / "report.png")
        print(f"screenshot: {shot}")
        errors = list(browser.errors)
    finally:
        browser.close()
    assert not errors, errors
    assert counts["funnelBars"] >= len(REASONS) + 2
    assert counts["histograms"] >= 1 and counts["thresholds"] >= 1
    assert counts["images"] >= 50
    assert counts["alert"] < 400, "the warning sits at the top of the page"
    assert "blur" in blurred and revealed == "none"
    assert shot.stat().st_size > 10_000


def test_cli_report(small_run):
    from typer.testing import CliRunner

    from curate.cli import app

    (small_run / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(small_run)])
    assert result.exit_code == 0, result.output
    assert (small_run / "report.html").exists()
    missing = CliRunner().invoke(app, ["report", str(small_run / "nope")])
    assert missing.exit_code == 2 and "no such run directory" in missing.output


def test_pipeline_writes_the_report(demo_run):
    html = (demo_run / "report.html").read_text(encoding="utf-8")
    assert 'id="funnel"' in html and "data:image/jpeg;base64," in html


def test_report_shows_error_kinds_wait_and_top_hosts(tmp_path):
    import json

    from curate.phases.download.hosts import download_stats

    root = make_dataset_run(tmp_path / "run", 200, shards=1)
    marker = {"error_kinds": {"http_429": 7, "timeout": 2}, "wait_s": 12.5,
              "hosts": {"img.example.cn": {"rows": 150, "success": 141, "requests": 170, "retries": 11, "pauses": 1,
                                           "peak_connections": 4, "kinds": {"http_429": 7, "timeout": 2}},
                        "cdn.example.com": {"rows": 50, "success": 50, "requests": 50, "retries": 0, "pauses": 0,
                                            "peak_connections": 3, "kinds": {}}}}
    stats = json.loads((root / "stats.json").read_text())
    (root / "stats.json").write_text(json.dumps({**stats, "download": download_stats([marker])}))
    build_report(str(root))
    html = (root / "report.html").read_text(encoding="utf-8")
    hosts = html.split('id="hosts"')[1]
    assert hosts.index("img.example.cn") < hosts.index("cdn.example.com")   # by rows
    assert "94.0%" in hosts and "http_429 7, timeout 2" in hosts
    assert 'id="error-kinds"' in html and "HTTP 429 Too Many Requests" in html
    assert "12.5 s" in html


def test_run_section_tells_what_ran_without_reprs_or_secrets(tmp_path):
    """Timings are each phase's last real run (rows and rows/s from timings.json), the models table is
    text a person reads at any depth, and the config shown holds no secret even if config.yaml does."""
    import json

    import yaml

    root = make_dataset_run(tmp_path / "run", 200, shards=1)
    models = {"enabled": ["nsfw"], "weights": "pretrained", "skipped": {},
              "files": [{"name": "open_nsfw", "file": "open-nsfw.onnx", "sha256": "ab" * 32, "pin": "ok"}],
              "clip_score": {"backend": "taiyi", "model": "L/14", "image": "ViT-L-14", "score": "cosine"}}
    (root / "models.json").write_text(json.dumps(models))
    (root / "timings.json").write_text(json.dumps({"download": {"seconds": 156.0, "rows": 2000},
                                                   "score": {"seconds": 40.0, "rows": 1000}}))
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["storage"] = {"endpoint_url": "http://user:hunter2@127.0.0.1:9000", "options": {"account_key": "hunter2"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    build_report(str(root))
    html = (root / "report.html").read_text(encoding="utf-8")
    timings = html.split('id="timings"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(\w+)</td><td class=\"num\">([\d,.]+)</td><td class=\"num\">([\d,-]+)</td>"
                      r"<td class=\"num\">([\d,-]+)</td>", timings)
    assert rows == [("download", "156.0", "2,000", "13"), ("score", "40.0", "1,000", "25")]
    table = html.split('id="models"')[1].split("</table>")[0]
    assert "open-nsfw.onnx" in table and "taiyi" in table and "{" not in table and "&#x27;" not in table
    assert "hunter2" not in html and "&lt;redacted&gt;" in html
