"""The demo corpus through all four phases: every row accounted for, shards consistent with the manifest."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import DedupeConfig
from filters.multihash import MATCHES
from manifests.schema import ALL, ERROR_KINDS, REASONS
from tests.conftest import DEMO_N


def _manifest(run: Path):
    return pq.read_table(run / "manifest").to_pandas()


def test_every_input_row_is_in_the_manifest_once(demo_run):
    m = _manifest(demo_run)
    urls = pq.read_table(demo_run / "input" / "urls.parquet")
    assert len(m) == urls.num_rows == DEMO_N
    assert m.key.is_unique
    assert m.status.notna().all()
    assert set(m.reason.dropna()) <= set(REASONS)
    assert (m.keep == m.reason.isna()).all()


def test_manifest_columns_have_declared_types(demo_run):
    schema = pq.read_table(demo_run / "manifest").schema
    for field in schema:
        if field.name != "kind":  # the demo's extra input column, carried as is
            assert field.type == ALL[field.name].type, field.name


def test_each_kind_of_trouble_ends_with_a_reason(demo_run):
    m = _manifest(demo_run)
    skipped = m[m.status == "not_requested"]   # a caption rule dropped them before download: never fetched
    assert (skipped.reason == skipped.before_download).all() and skipped.error_kind.isna().all()
    m = m[m.status != "not_requested"].set_index("kind")
    expect = {"http_404": "download_failed", "http_500": "download_failed", "html_page": "download_failed",
              "slow": "download_failed", "truncated": "download_failed", "corrupt": "download_failed",
              "bomb": "download_failed", "tiny": "too_small", "strip_1x6000": "too_small"}
    for kind, reason in expect.items():
        assert set(m.loc[[kind], "reason"]) == {reason}, kind
    bomb = m.loc[["bomb"]].iloc[0]
    assert "too large" in bomb.error
    kinds = {"http_404": "http_404", "http_500": "http_5xx", "slow": "timeout", "bomb": "too_large",
             "html_page": "not_an_image", "corrupt": "not_an_image"}
    for kind, error_kind in kinds.items():
        assert set(m.loc[[kind], "error_kind"]) == {error_kind}, kind
    assert ((m.status == "success") == m.error_kind.isna()).all()
    assert set(m.error_kind.dropna()) <= set(ERROR_KINDS)
    assert m.loc[["exact_dup"], "reason"].eq("duplicate").any()
    for kind in ("grayscale", "cmyk", "rgba_png", "png16", "palette_gif", "animated_gif"):
        assert m.loc[[kind], "entropy"].notna().all(), kind  # decoded and scored, whatever the mode


def test_inspect_filters_on_error_kind(demo_run):
    from curate.inspect import summarize

    m = _manifest(demo_run)
    assert summarize(str(demo_run), where="error_kind == 'http_404'")["rows"] == (m.error_kind == "http_404").sum() > 0


def test_duplicates_name_their_representative_within_the_distance(demo_run):
    """dup_of is the group's representative: kept by dedup (the rebalance may drop it after), and
    every member is within the distance of it, not merely chained to it through others."""
    m = _manifest(demo_run)
    dups = m[m.reason == "duplicate"]
    kept = m.set_index("key")
    assert len(dups)
    for _, row in dups.iterrows():
        original = kept.loc[row.dup_of]
        assert original.keep or original.reason == "rebalanced"
        same_bytes = original.sha256 == row.sha256
        assert same_bytes or _view_distance(original, row) <= DedupeConfig().phash_max_distance


def _view_distance(a, b) -> int:
    """Smallest Hamming distance over the view pairs the matching rule compares."""
    ha = np.array([a.phash, *a.phash_views], np.uint64)
    hb = np.array([b.phash, *b.phash_views], np.uint64)
    return int(np.bitwise_count(ha[:, None] ^ hb[None, :])[MATCHES].min())


def test_demo_rebalances_the_graphic_share_to_its_cap(demo_run):
    """jobs/demo.yaml labels styles with the CPU graphic score and caps graphic at 10%."""
    stats = json.loads((demo_run / "stats.json").read_text())
    styles = json.loads((demo_run / "decisions" / "_decided.json").read_text())["styles"]
    before, after = styles["before"], styles["after"]
    assert set(before) == {"photo", "graphic"} and before["graphic"] / sum(before.values()) > 0.11, styles
    assert abs(after["graphic"] / sum(after.values()) - 0.10) <= 0.01, styles
    m = _manifest(demo_run)
    kept = m[m.keep]
    assert kept.style_label.value_counts().to_dict() == after
    assert set(m.loc[m.kind == "cartoon", "style_label"].dropna()) <= {"graphic"}
    assert stats["styles"] == styles


def _shard_samples(run: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    out = {}
    for tar_path in sorted((run / "shards").glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out[tar_path.name] = samples
    return out


def test_shards_hold_exactly_the_kept_rows(demo_run):
    m = _manifest(demo_run)
    cfg_size = 200  # jobs/demo.yaml write.samples_per_shard
    shards = _shard_samples(demo_run)
    seen = [k for samples in shards.values() for k in samples]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(m[m.keep].key)
    sizes = [len(s) for _, s in sorted(shards.items())]
    assert all(n == cfg_size for n in sizes[:-1]) and 0 < sizes[-1] <= cfg_size
    by_key = m.set_index("key")
    for name, samples in shards.items():
        for key, sample in samples.items():
            row = by_key.loc[key]
            assert row.out_shard == name
            assert set(sample) == {"jpg", "json", "txt"}
            assert sample["txt"].decode() == row.caption_norm
            meta = json.loads(sample["json"])
            assert meta["key"] == key and meta["url"] == row.url and meta["caption"] == row.caption
            Image.open(io.BytesIO(sample["jpg"])).verify()


def test_shards_load_with_webdataset_and_ray(demo_run, ray_session):
    import webdataset as wds

    names = sorted(str(p) for p in (demo_run / "shards").glob("*.tar"))
    kept = int(_manifest(demo_run).keep.sum())
    samples = list(wds.WebDataset(names, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt"))
    assert len(samples) == kept
    assert all(img.size[0] > 0 for _, img, _ in samples)
    ds = ray_session.data.read_webdataset(names, decoder=None)
    assert ds.count() == kept


def test_stats_funnel_adds_up(demo_run):
    stats = json.loads((demo_run / "stats.json").read_text())
    funnel = stats["funnel"]
    assert funnel["rows_in"] == DEMO_N
    assert funnel["kept"] + sum(funnel["dropped"].values()) == DEMO_N
    assert list(funnel["dropped"]) == [r for r in REASONS if r in funnel["dropped"]]
    assert stats["models"]["enabled"] == ["nsfw", "ocr"]  # open_nsfw and PP-OCRv4 ran for real
    download = stats["download"]
    m = _manifest(demo_run)
    assert download["error_kinds"] == m.error_kind.value_counts().to_dict()
    ((host, top),) = download["top_hosts"].items()   # the demo serves everything from one host
    fetched = DEMO_N - (m.error_kind == "bad_url").sum() - (m.status == "not_requested").sum()
    assert host == "127.0.0.1" and top["rows"] == fetched
    assert top["success_rate"] == pytest.approx((m.status == "success").sum() / top["rows"], abs=1e-3)
    assert top["peak_connections"] <= 4   # download.per_host_connections


def test_open_nsfw_scores_are_probabilities_and_low(demo_run):
    m = _manifest(demo_run)
    scored = m.nsfw.dropna()
    assert len(scored) > DEMO_N // 2
    assert scored.between(0, 1).all() and scored.median() < 0.1


def test_ocr_drops_text_images_as_text_heavy_and_no_photo(demo_run):
    m = _manifest(demo_run)
    limit = 0.2  # filters.text_area_max
    scored = m[m.text_area.notna()]
    assert len(scored) > DEMO_N // 2 and scored.text_boxes.notna().all()
    assert (scored[scored.kind == "text_image"].text_area > limit).all()
    photos = scored[scored.kind == "photo"]
    assert (photos.text_area <= limit).all() and photos.text_boxes.eq(0).all()
    assert set(m[m.reason == "text_heavy"].kind) == {"text_image"}


@pytest.mark.parametrize("phase", ["download", "score", "decide", "write"])
def test_a_phase_whose_outputs_exist_does_nothing(demo_run, phase, ray_session):
    from curate.config import load
    from curate.pipeline import run_phases

    cfg = load(demo_run / "config.yaml")
    watched = [p for p in demo_run.rglob("*") if p.is_file() and p.suffix in (".parquet", ".tar", ".npy")
               and p.parent.name != "manifest"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    run_phases(cfg, (phase,))
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def test_the_demo_writes_buckets_and_a_card(demo_run):
    """Every kept sample has a bucket, stats.json counts them, and the card beside the shards repeats
    stats.json's numbers, the config's thresholds and the shipped OCR weights' checksums."""
    import yaml

    from filters.models.weights import SHIPPED
    from tests.curate.phases.write.test_card import check_card

    stats = json.loads((demo_run / "stats.json").read_text())
    m = _manifest(demo_run)
    kept = m[m.keep]
    assert kept.bucket.notna().all()
    assert {b: n for b, n in stats["buckets"].items() if n} == kept.bucket.value_counts().to_dict()
    assert sum(n > 0 for n in stats["buckets"].values()) >= 2, "the demo's images come in several shapes"
    card = check_card(demo_run, stats, yaml.safe_load((demo_run / "config.yaml").read_text()))
    assert SHIPPED["ocr_det"].sha256 in card and "open_nsfw" in card
