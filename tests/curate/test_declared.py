"""Declared once: the scorers' declarations and the rules table are read, never restated.

Each test fails when a consumer drifts from them: a rule reading a column nobody writes, a config key
that does not exist, a hand-kept list of rule knobs, a funnel that does not add up, or a helper that
would need editing beside the declaration when a scorer is added.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import validate
from filters import registry, text
from filters.declare import Column, Scorer, lookup
from manifests import schema
from manifests.funnel import Funnel
from manifests.rules import REASONS, ROW_RULES, RULES, Rule

CFG = validate({"run_dir": "r", "input": {"paths": ["x.parquet"]}})


def test_every_rule_reads_declared_columns():
    fixed = {**schema.IDENTITY, **schema.PLAN, **schema.DOWNLOAD, **schema.DERIVED}
    undeclared = {(r.reason, c) for r in RULES for c in r.columns if c not in registry.COLUMNS and c not in fixed}
    assert not undeclared


def test_every_rule_key_is_a_config_key():
    for rule in RULES:
        for key in rule.config_keys:
            lookup(CFG, key)   # a KeyError names the key


def test_the_caption_scorers_rule_knobs_are_the_rules_text_keys():
    """filters/ cannot import the rules table (it sits below manifests/), so text.RULE_KNOBS is checked here:
    a text key a rule reads must not be in the caption scorer's fingerprint, and every other one must."""
    read = {k.split(".", 1)[1] for r in RULES for k in r.config_keys if k.startswith("text.")}
    assert set(text.RULE_KNOBS) == read
    assert not {f"text.{k}" for k in read} & set(text.SCORER.config_keys(CFG))


def test_every_score_column_has_one_producer():
    assert list(schema.ALL) == list(dict.fromkeys(schema.ALL))
    assert set(registry.COLUMNS) <= set(schema.ALL)
    clash = Scorer("clash", columns=(Column("nsfw", pa.float32(), "again"),), reads=("view",), stage="model")
    with pytest.raises(ValueError, match="'nsfw' is declared by both scorer nsfw and scorer clash"):
        schema.declared((*registry.SCORERS, clash))


# -- adding a scorer touches only its declaration ------------------------------------------------------------

SHARP = Scorer("sharpness", stage="cpu", reads=("image",), optional=False, doc="Laplacian variance",
               columns=(Column("sharpness", pa.float32(), "variance of the Laplacian of the gray image", shown=True),
                        Column("sharpness_raw", pa.float64(), "the same before the log")))
EXTENDED = (*registry.SCORERS, SHARP)
BLURRY = Rule("blurry", "the image is out of focus", "score", ("sharpness",), "filters.min_entropy", "below")


def test_a_new_scorer_reaches_the_schema_inspect_and_the_report():
    from curate.inspect import sample_columns
    from curate.report import card_columns
    from curate.report.data import metrics
    from curate.report.page import card_scores

    columns = schema.declared(EXTENDED)
    assert columns["sharpness"].type == pa.float32() and list(columns).index("sharpness") < list(columns).index("keep")
    assert "sharpness" not in schema.ALL, "the default registry is untouched"
    assert registry.shown(EXTENDED) == (*registry.shown(), "sharpness")
    assert "sharpness" in sample_columns(EXTENDED) and "sharpness_raw" not in sample_columns(EXTENDED)
    assert "sharpness" in card_scores(EXTENDED) and "sharpness" in card_columns(EXTENDED)
    drawn = {m.column: m for m in metrics((*ROW_RULES, BLURRY), columns)}
    assert drawn["sharpness"].rules == (BLURRY,) and drawn["sharpness"].doc == columns["sharpness"].doc
    assert not drawn["sharpness"].integral


def test_inspect_samples_show_a_new_scorers_column(tmp_path):
    from curate.inspect import summarize

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "reason": [None, "blurry", None],
                             "sharpness": pa.array([1.5, 0.1, 2.0], pa.float32())}), path)
    out = summarize(str(path), show=3, scorers=EXTENDED)
    assert sorted(r["sharpness"] for r in out["sample"]) == pytest.approx([0.1, 1.5, 2.0])
    assert out["funnel"] == {"rows_in": 3, "dropped": {"blurry": 1}, "kept": 2}
    assert "sharpness" not in summarize(str(path), show=3)["sample"][0]


# -- the funnel ------------------------------------------------------------------------------------------------

def test_funnel_adds_up_across_shards_in_rule_order():
    a = Funnel.of_marker({"rows": 10, "kept": 4, "reasons": {"nsfw": 2, "too_small": 3, "old_reason": 1}})
    b = Funnel.of_counts({None: 5, "duplicate": 1, "too_small": 2})
    total = Funnel.total({"00000": {"rows": 10, "kept": 4, "reasons": {"nsfw": 2, "too_small": 3, "old_reason": 1}},
                          "00001": {"rows": 8, "kept": 5, "reasons": {"duplicate": 1, "too_small": 2}}})
    assert total == a + b and (a + b).rows_in == 18
    d = total.to_dict()
    assert d == {"rows_in": 18, "dropped": {"too_small": 5, "nsfw": 2, "duplicate": 1, "old_reason": 1}, "kept": 9}
    assert list(d["dropped"])[:-1] == [r for r in REASONS if r in d["dropped"]]
    assert Funnel.from_dict(d) == total and Funnel().to_dict() == {"rows_in": 0, "dropped": {}, "kept": 0}
    assert Funnel().add("nsfw", 0).dropped == {}


def test_funnel_refuses_counts_that_do_not_add_up():
    with pytest.raises(ValueError, match="shard 00003: kept \\(4\\) plus dropped \\(5\\) is not its rows \\(10\\)"):
        Funnel.total({"00003": {"rows": 10, "kept": 4, "reasons": {"nsfw": 5}}})
    with pytest.raises(ValueError, match="not its rows_in"):
        Funnel.from_dict({"rows_in": 7, "dropped": {"nsfw": 1}, "kept": 1})
    with pytest.raises(ValueError, match="negative"):
        Funnel().add("nsfw", -1)


def test_models_list_shows_each_declaration():
    from typer.testing import CliRunner

    from curate.cli import app
    from filters.registry import declarations

    cfg = validate({"run_dir": "r", "input": {"paths": ["x.parquet"]},
                    "models": {"enabled": ["nsfw", "ocr"], "nsfw_backend": "open_nsfw"}})
    rows = {d["scorer"]: d for d in declarations(cfg)}
    assert list(rows) == [s.name for s in registry.SCORERS] + ["embedding"]
    assert rows["ocr"]["columns"] == {"text_area": "float", "text_boxes": "int32", "ocr_text": "string"}
    assert rows["ocr"]["enabled"] and not rows["clip_score"]["enabled"] and rows["image"]["enabled"]
    assert rows["nsfw"]["weights"] == ["open_nsfw"] and "models.nsfw_backend" in rows["nsfw"]["keys"]
    assert rows["aesthetic"]["tower"] == "l14" and rows["aesthetic"]["weights"] == ["aesthetic"]
    out = CliRunner().invoke(app, ["models", "list"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    for name in rows:
        assert f"│ {name} " in out.output
    assert "sac+logos+ava1-l14-linearMSE.pth" in text and "always runs" in text and "models.ocr_side" in text


def test_the_reports_no_models_alert_names_every_model_scorer():
    from curate.report.data import Run
    from curate.report.page import alerts

    html = alerts(Run("r", models={"enabled": []}))
    assert all(s.name in html for s in registry.SCORERS if s.optional)
