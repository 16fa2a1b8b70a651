"""The dataset card beside the shards: a Hugging Face card whose numbers are stats.json's, whose
columns are the sample JSON's, and whose loading code names the shards that are there."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from curate.phases.write import phase as write
from curate.phases.write import sample
from curate.phases.write.card import LICENSE_WARNING, size_category
from curate.phases.write.phase import run_write
from manifests.rules import REASONS, RULES
from manifests.schema import ALL
from tests.synthetic_write import EXTRA, config, decided_run

ROWS = [23, 17, 30, 5, 26, 12, 9]


def table_rows(card: str, heading: str) -> dict[str, list[str]]:
    """The first column -> the other cells of the table under a `## heading`."""
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def check_card(root: Path, stats: dict, config_data: dict) -> str:
    """Every number the card shows equals stats.json's; the header is valid card YAML."""
    card = (root / "shards" / "README.md").read_text(encoding="utf-8")
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    kept = stats["funnel"]["kept"]
    assert meta["language"] == ["zh"] and meta["task_categories"] == ["text-to-image"]
    assert meta["license"] == "unknown" and meta["size_categories"] == [size_category(kept)]
    assert LICENSE_WARNING in body
    funnel = table_rows(body, "Funnel")
    assert int(funnel["rows in"][0]) == stats["funnel"]["rows_in"] and int(funnel["**kept**"][0]) == kept
    assert {k[len("dropped: `"):-1]: int(v[0]) for k, v in funnel.items() if k.startswith("dropped")} == \
        stats["funnel"]["dropped"]
    assert f"{stats['shards']['samples']:,} samples in {stats['shards']['count']} shards" in body
    if stats["buckets"] is not None:
        buckets = table_rows(body, "Shards and buckets")
        assert {k.strip("`"): int(v[0]) for k, v in buckets.items()} == stats["buckets"]
    columns = set(table_rows(body, "Sample format"))
    assert {"`bucket`", "`caption`", "`caption_norm`", "`width`", "`original_width`"} <= columns
    assert not {f"`{c}`" for c in sample.SAMPLE_EXCLUDE} & columns
    thresholds = table_rows(body, "Thresholds")
    assert thresholds["`filters.min_side`"] == [f"`{config_data['filters']['min_side']}`", "`too_small`"]
    assert {f"`{k}`" for r in RULES for k in r.config_keys if "." in k} <= set(thresholds)
    assert {"`text.keep_bilingual_share`", "`dedupe.phash_max_distance`", "`rebalance.style_source`"} <= set(thresholds)
    assert list(funnel)[1:-1] == [f"dropped: `{r}`" for r in REASONS if r in stats["funnel"]["dropped"]]
    for path in config_data["input"]["paths"]:
        assert f"- `{path}`" in body
    assert 'load_dataset("webdataset"' in body and "ray.data.read_webdataset" in body and "wds.WebDataset" in body
    return card


@pytest.mark.parametrize("grouped", [False, True])
def test_the_card_is_made_from_stats_and_config(ray_session, tmp_path, monkeypatch, grouped):
    monkeypatch.setattr(write, "ROWS_PER_TASK", 10)
    run = decided_run(str(tmp_path / "run"), ROWS, failed_download={3}, failed_score={4})
    cfg = config(run, 7, group_by_bucket=grouped, prefix="zh")
    stats = run_write(cfg, run.shard_names())
    assert json.loads(Path(run.stats).read_text()) == stats
    card = check_card(Path(run.root), stats, cfg.model_dump(mode="json"))
    assert all(f"`{c}`" in card for c in EXTRA) and ALL["bucket"].doc in card
    layout = re.escape("`zh-{w}x{h}-{n:06d}.tar`") if grouped else re.escape("`zh-{n:06d}.tar`")
    assert re.search(layout, card)
    biggest = max(stats["buckets"], key=stats["buckets"].get)
    assert (f"zh-{biggest}-*.tar" in card) == grouped, "the one-bucket example names a bucket that exists"


def test_size_categories_follow_the_hub_bins():
    assert [size_category(n) for n in (0, 999, 1000, 54_321, 10**6, 2 * 10**8)] == \
        ["n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M", "100M<n<1B"]
