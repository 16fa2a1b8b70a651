"""Hostile input end to end: every nasty row ends in the manifest with a status and a reason.

URLs point only at loopback test servers: 127.0.0.1 is allowed by the config, 127.0.0.2 is
not (and must never be contacted, directly or by redirect). The download runs in a
subprocess that reports its peak memory, so the 100 MB response and the decompression bomb
are shown to be refused within bounded memory.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curate.config import ConfigError, load
from curate.demo.corpus import bomb_png, photo
from manifests.schema import REASONS
from tests.procs import ROOT, env
from tests.servers import serve

STATUSES = {"success", "failed_to_download", "failed_to_resize", "rejected"}
CAPTION = "一只橘猫趴在窗台上晒太阳，高清摄影"
MB = 1 << 20

# Download in a fresh interpreter; peak RSS is measured after every import, around the work only.
DOWNLOAD = """
import json, resource, sys
from pathlib import Path
from curate.config import load
from curate.phases.download.phase import download_shard
from curate.phases.download.plan import plan
from curate.run.rundir import RunDir
import img2dataset.resizer
cfg = load(sys.argv[1])
shards = plan(cfg.input, RunDir(Path(cfg.run_dir)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for shard in shards:
    download_shard(cfg, shard)
print(json.dumps({"kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    import numpy as np

    folder = tmp_path_factory.mktemp("hostile_files")
    rng = np.random.default_rng(0)
    for name in ("photo.jpg", "photo2.jpg", "photo3.jpg"):
        photo(rng, 360, 480).save(folder / name, quality=90)
    (folder / "bomb.png").write_bytes(bomb_png())
    Image.new("RGB", (60000, 1), (90, 120, 150)).save(folder / "strip.png")
    return folder


def write_config(tmp: Path, urls: list[str], captions: list[str], **download) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp / "urls.parquet")
    cfg = {"run_dir": str(tmp / "run"), "input": {"paths": [str(tmp / "urls.parquet")], "shard_rows": 8},
           "download": {"thread_count": 4, "timeout": 20, **download}, "write": {"samples_per_shard": 4}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)   # a download subprocess (up to 300 s), then the other phases
def test_hostile_rows_end_with_reasons_in_bounded_memory(files, tmp_path, ray_session):
    from curate.pipeline import run_phases

    marker = tmp_path / "pwned"
    with serve(files) as srv, serve(files, host="127.0.0.2") as other:
        rows = {  # label: (url, caption, status, reason, error fragment, error kind)
            "ok": (f"{srv.base}/img/photo.jpg", CAPTION, "success", None, None, None),
            "file": ("file:///etc/passwd", CAPTION, "rejected", "download_failed", "scheme", "bad_url"),
            "ftp": ("ftp://127.0.0.1/photo.jpg", CAPTION, "rejected", "download_failed", "scheme", "bad_url"),
            "data": ("data:image/png;base64,iVBORw0KGgo=", CAPTION, "rejected", "download_failed", "scheme", "bad_url"),
            "other_loopback": (f"{other.base}/img/photo.jpg", CAPTION, "failed_to_download", "download_failed",
                               "address not allowed", "refused_address"),
            "redirect": (f"{srv.base}/redirect?to={other.base}/img/photo.jpg", CAPTION, "failed_to_download",
                         "download_failed", "address not allowed", "refused_address"),
            "noai": (f"{srv.base}/noai/photo3.jpg", CAPTION, "failed_to_download", "download_failed", "X-Robots-Tag",
                     "opted_out"),
            "bomb": (f"{srv.base}/img/bomb.png", CAPTION, "failed_to_resize", "download_failed", "too large",
                     "too_large"),
            "100mb": (f"{srv.base}/big?mb=100", CAPTION, "failed_to_download", "download_failed", "larger than",
                      "too_large"),
            "strip": (f"{srv.base}/img/strip.png", CAPTION, "success", "too_small", None, None),
            "1mb_caption": (f"{srv.base}/img/photo2.jpg", (CAPTION * 40_000)[:MB // 3 + 1], "success",
                            "caption_long", None, None),
            # The caption rules come first in the rules table, so the shell caption's reason wins over
            # its failed fetch (this script skips the before-download screen, so the URL is requested).
            "shell": (f"{srv.base}/img/x;touch${{IFS}}{marker}", f"$(touch {marker})`touch {marker}`",
                      "failed_to_download", "not_chinese", "404", "http_404"),
        }
        cfg_path = write_config(tmp_path, [r[0] for r in rows.values()], [r[1] for r in rows.values()],
                                allow_networks=["127.0.0.1/32"])
        done = subprocess.run([sys.executable, "-c", DOWNLOAD, str(cfg_path)], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert other.hits == []  # 127.0.0.2 was never contacted, not even through the redirect
    grown_mib = json.loads(done.stdout.strip().splitlines()[-1])["kib"] / 1024
    assert grown_mib < 80, f"download grew by {grown_mib:.0f} MiB"  # the bomb alone would need 400 MB

    assert run_phases(load(cfg_path)).ok  # score, decide, write on what was downloaded
    run = tmp_path / "run"
    manifest = pq.read_table(run / "manifest").to_pylist()
    assert len(manifest) == len(rows)
    by_url = {r["url"]: r for r in manifest}   # shards are cut in URL-hash order
    for label, (url, caption, status, reason, error, kind) in rows.items():
        row = by_url[url]
        assert row["caption"] == caption, label
        assert (row["status"], row["reason"]) == (status, reason), (label, row["status"], row["reason"], row["error"])
        assert error is None or error in row["error"], (label, row["error"])
        assert row["error_kind"] == kind, (label, row["error_kind"], row["error"])
    assert {r["status"] for r in manifest} <= STATUSES
    assert {r["reason"] for r in manifest} - {None} <= set(REASONS)
    assert not marker.exists()
    names = [m.name for tar in (run / "shards").glob("*.tar") for m in tarfile.open(tar)]
    assert names and all(re.fullmatch(r"\d{5}_\d{6}\.(jpg|json|txt)", n) for n in names)


def test_loopback_is_refused_end_to_end_when_not_allowed(files, tmp_path):
    from curate.phases.download.phase import download_shard
    from curate.phases.download.plan import plan
    from curate.run.rundir import RunDir

    with serve(files) as srv:
        cfg = load(write_config(tmp_path, [f"{srv.base}/img/photo.jpg", f"{srv.base}/redirect?to=/img/photo.jpg"],
                                [CAPTION, CAPTION]))
        assert cfg.download.allow_networks == []  # the default
        for shard in plan(cfg.input, RunDir(Path(cfg.run_dir))):
            download_shard(cfg, shard)
        assert srv.hits == []
    raw = pq.read_table(tmp_path / "run" / "raw" / "00000.parquet").to_pylist()
    assert [r["status"] for r in raw] == ["failed_to_download"] * 2
    assert all("address not allowed: 127.0.0.1" in r["error"] for r in raw)


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\ninput: {{paths: [x]}}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("prefix", ["../x", "a/b", "/abs", ""])
def test_write_prefix_cannot_leave_the_shards_folder(tmp_path, prefix):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "input": {"paths": ["x"]},
                                    "write": {"prefix": prefix}}))
    with pytest.raises(ConfigError, match="write.prefix"):
        load(path)


# OpenCV is loaded before the download, so its own pixel limit stays at its default (2^30): only the
# identify-first check in curate/phases/download/phase.py stands between these bytes and a decoder. Then an RGBA
# image within max_pixels is decoded, and its peak is held to the decode reserve the config states.
BOMBS = """
import cv2, io, json, resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from curate.config import DECODE_BYTES_PER_PIXEL, load
from curate.phases.download.phase import _Images, download_shard
from curate.phases.download.plan import plan
from curate.run.rundir import RunDir
import img2dataset.resizer
cfg = load(sys.argv[1])
shards = plan(cfg.input, RunDir(Path(cfg.run_dir)))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = rss()
for shard in shards:
    download_shard(cfg, shard)
bombs = rss() - before
ramp = np.linspace(0, 255, 3000, dtype=np.uint8)
rgba = Image.fromarray(np.dstack([np.tile(ramp, (2000, 1))] * 4), "RGBA")
buf = io.BytesIO(); rgba.save(buf, format="PNG"); data = buf.getvalue(); del rgba, buf
before = rss()
image, row = _Images(cfg.download)(data)
print(json.dumps({"bombs_kib": bombs, "rgba_kib": rss() - before, "rgba_status": row.status,
                  "reserve_kib": DECODE_BYTES_PER_PIXEL * 3000 * 2000 // 1024}))
"""


@pytest.mark.slow   # a fresh interpreter importing OpenCV, img2dataset and the pipeline
def test_bombs_in_formats_pil_cannot_identify_are_refused_without_a_large_allocation(files, tmp_path):
    from tests.bombs import gif_screen, hdr_rle, pam_header, pfm_color

    (files / "rle.hdr").write_bytes(hdr_rle(4000, 4000))   # 0.8 MB; 192 MB as OpenCV's float32 RGB
    (files / "huge.pam").write_bytes(pam_header(30000))
    (files / "huge.pfm").write_bytes(pfm_color(30000))
    (files / "screen.gif").write_bytes(gif_screen(60000))
    expect = {"rle.hdr": "not_an_image", "huge.pam": "not_an_image", "huge.pfm": "not_an_image",
              "screen.gif": "too_large", "bomb.png": "too_large", "photo.jpg": None}
    with serve(files) as srv:
        urls = [f"{srv.base}/img/{name}" for name in expect]
        cfg_path = write_config(tmp_path, urls, [CAPTION] * len(urls), allow_networks=["127.0.0.1/32"],
                                max_pixels=10_000_000, memory_mb=512)
        done = subprocess.run([sys.executable, "-c", BOMBS, str(cfg_path)], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["bombs_kib"] / 1024 < 60, measured   # the .hdr alone decodes to 192 MB
    assert measured["rgba_status"] == "success"
    assert measured["rgba_kib"] < measured["reserve_kib"], measured   # img2dataset's float matting: ~70 B/px
    raw = pq.read_table(tmp_path / "run" / "raw" / "00000.parquet").to_pylist()
    kinds = {r["url"].rsplit("/", 1)[1]: r["error_kind"] for r in raw}
    assert kinds == expect, kinds
    assert all("identified before decoding" in r["error"] for r in raw if r["error_kind"] == "not_an_image")


def test_opencv_pixel_limit_is_set_to_max_pixels_before_it_loads():
    script = ("import io, numpy as np\nfrom PIL import Image\nfrom curate.phases.download.phase import limit_opencv\n"
              "assert limit_opencv(1000)\nimport cv2\nb = io.BytesIO(); Image.new('RGB', (100, 100)).save(b, 'PNG')\n"
              "try:\n    cv2.imdecode(np.frombuffer(b.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)\n"
              "    print('decoded')\nexcept cv2.error:\n    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "refused", done.stdout + done.stderr[-2000:]


def test_no_fetch_of_the_pipeline_goes_through_proxy_variables(files, tmp_path, monkeypatch):
    """Image and robots.txt requests alike ignore http_proxy, https_proxy, HTTP_PROXY and ALL_PROXY
    (Ray's own processes read them: docs/politeness.md); a metadata URL is refused before connecting."""
    from curate.phases.download.phase import download_shard
    from curate.phases.download.plan import plan
    from curate.run.rundir import RunDir
    from tests.servers import serve_proxy

    with serve(files) as srv, serve_proxy("127.0.0.5") as proxy:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.base)
        urls = [f"{srv.base}/img/photo.jpg", "http://169.254.169.254/latest/meta-data/",
                "https://169.254.169.254/latest/meta-data/"]
        cfg = load(write_config(tmp_path, urls, [CAPTION] * 3, allow_networks=["127.0.0.1/32"]))
        for shard in plan(cfg.input, RunDir(Path(cfg.run_dir))):
            download_shard(cfg, shard)
        assert len(srv.robots) == 1 and srv.hits == ["/img/photo.jpg"]
    assert proxy.hits == []
    raw = {r["url"]: r for r in pq.read_table(tmp_path / "run" / "raw" / "00000.parquet").to_pylist()}
    assert raw[urls[0]]["status"] == "success"
    assert raw[urls[1]]["error_kind"] == raw[urls[2]]["error_kind"] == "refused_address"
