"""Caption normalisation, metrics, rules and text safety (filters/text.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from filters.text import TEXT_COLUMNS, TextOptions, caption_columns, normalise
from manifests.rules import explain, text_reason, text_reasons
from manifests.schema import REASONS, TEXT

DEFAULTS = TextOptions()
TABLE = Path(__file__).resolve().parents[1] / "data" / "captions_zh.tsv"
TEXT_RULES = ("caption_junk", "caption_short", "caption_long", "not_chinese",
              "caption_repetitive", "caption_unsafe")


def _table() -> list[tuple[str, str, str]]:
    """Rows of captions_zh.tsv, each field read as a JSON string body (so \\t, \\u200b work)."""
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and not line.startswith("caption\t"):
            caption, norm, decision = (json.loads(f'"{field}"') for field in line.split("\t"))
            rows.append((caption, norm, decision))
    return rows


def _decision(result: dict) -> str:
    if result["keep"]:
        return "keep"
    if result["reason"] == "caption_unsafe":
        return f"caption_unsafe:{result['blocked_term']}"
    return result["reason"]


def _options(**changes) -> TextOptions:
    return TextOptions(**changes)


# --- the table ------------------------------------------------------------------------------

@pytest.mark.parametrize("caption,norm,decision", _table(), ids=lambda v: v[:24] if isinstance(v, str) else None)
def test_table(caption: str, norm: str, decision: str) -> None:
    result = explain(caption, DEFAULTS)
    assert (result["caption_norm"], _decision(result)) == (norm, decision)


def test_table_is_broad() -> None:
    rows = _table()
    assert len(rows) >= 60
    decisions = {d.split(":")[0] for _, _, d in rows}
    assert decisions >= {"keep", *TEXT_RULES} - {"caption_long"}   # long captions: see below


# --- contract with the pipeline and the schema ----------------------------------------------

def test_columns_match_schema_and_batch_length() -> None:
    captions = ["一只橘猫趴在窗台上", None, "", "IMG_2031.JPG", "色情网站截图"]
    columns = caption_columns(captions, DEFAULTS)
    assert tuple(columns) == TEXT_COLUMNS
    assert set(columns) == set(TEXT)
    assert all(len(values) == len(captions) for values in columns.values())
    assert set(TEXT_RULES) <= set(REASONS)
    assert list(REASONS).index("caption_junk") < list(REASONS).index("caption_unsafe")


def test_empty_batch() -> None:
    columns = caption_columns([], DEFAULTS)
    assert columns == {name: [] for name in TEXT_COLUMNS}
    assert text_reasons(columns, _options(keep_bilingual_share=0.5)) == []


def test_batch_reasons_equal_row_reasons() -> None:
    captions = [c for c, _, _ in _table()]
    columns = caption_columns(captions, DEFAULTS)
    rows = [{name: columns[name][i] for name in columns} for i in range(len(captions))]
    assert text_reasons(columns, DEFAULTS) == [text_reason(row, DEFAULTS) for row in rows]


def test_reasons_accept_numpy_and_missing_terms() -> None:
    columns = {"caption_norm": np.array(["好", "一只橘猫趴在窗台上"], dtype=object),
               "n_chars": np.array([1, 9], dtype=np.int32), "zh_ratio": np.array([1, 1], dtype=np.float32),
               "repeat_ratio": np.zeros(2, dtype=np.float32), "caption_junk": np.array([False, False]),
               "blocked_term": np.array([None, float("nan")], dtype=object)}
    assert text_reasons(columns, DEFAULTS) == ["caption_short", None]


def test_rule_order_first_failing_rule_wins() -> None:
    row = {"caption_norm": "porn", "n_chars": 4, "zh_ratio": 0.0, "repeat_ratio": 0.9,
           "caption_junk": False, "blocked_term": "porn"}
    assert text_reason(row, DEFAULTS) == "caption_short"
    assert text_reason({**row, "n_chars": 40}, DEFAULTS) == "not_chinese"
    assert text_reason({**row, "n_chars": 40, "zh_ratio": 1.0}, DEFAULTS) == "caption_repetitive"
    assert text_reason({**row, "n_chars": 40, "zh_ratio": 1.0, "repeat_ratio": 0.0}, DEFAULTS) == "caption_unsafe"
    assert text_reason({**row, "caption_junk": True}, DEFAULTS) == "caption_junk"


def test_explain_reports_everything() -> None:
    result = explain("吸大麻的男子被捕", DEFAULTS)
    assert set(result) == {"caption", *TEXT_COLUMNS, "keep", "reason"}
    assert (result["keep"], result["reason"], result["blocked_term"]) == (False, "caption_unsafe", "大麻")


# --- metrics --------------------------------------------------------------------------------

def test_metrics_of_a_mixed_caption() -> None:
    result = explain("iPhone 15 Pro 手机壳。透明硅胶！", DEFAULTS)
    assert result["n_chars"] == len("iPhone 15 Pro 手机壳。透明硅胶！")
    assert result["n_sentences"] == 2
    assert result["n_words"] >= 5                       # iphone, 15, pro, 手机壳, 透明, 硅胶
    assert result["zh_ratio"] == pytest.approx(7 / 16)  # 7 Chinese characters of 16 letters
    assert result["latin_ratio"] == pytest.approx(9 / 16)
    assert result["repeat_ratio"] == 0.0


def test_repeat_ratio_ignores_digits_and_single_reduplication() -> None:
    assert explain("妈妈和宝宝在公园散步", DEFAULTS)["repeat_ratio"] == 0.0
    assert explain("1000000元大奖", DEFAULTS)["repeat_ratio"] == 0.0
    assert explain("哈哈哈哈", DEFAULTS)["repeat_ratio"] == pytest.approx(3 / 4)


# --- empty, None and huge captions ----------------------------------------------------------

@pytest.mark.parametrize("caption", [None, "", "   ", "\u200b\u200b", "&nbsp;"])
def test_empty_captions_are_short_not_errors(caption: str | None) -> None:
    result = explain(caption, DEFAULTS)
    assert (result["caption_norm"], result["n_words"], result["reason"]) == ("", 0, "caption_short")


def test_megabyte_caption_costs_bounded_work() -> None:
    caption = "美丽的风景，" * 200_000                         # 1.2 M characters
    start = time.perf_counter()
    result = explain(caption, DEFAULTS)
    assert time.perf_counter() - start < 5
    assert result["n_chars"] <= DEFAULTS.max_input_chars
    assert result["reason"] == "caption_long"


def test_input_is_cut_before_normalising() -> None:
    opts = _options(max_input_chars=10)
    assert normalise("一只橘猫趴在窗台上晒太阳", opts) == "一只橘猫趴在窗台上晒"


# --- option toggles -------------------------------------------------------------------------

def test_t2s_off_keeps_traditional() -> None:
    assert normalise("臺北101大樓的夜景", _options(t2s=False)) == "臺北101大樓的夜景"


def test_fullwidth_off_keeps_width() -> None:
    assert normalise("ＮＩＫＥ运动鞋,男款", _options(fullwidth_to_halfwidth=False)) == "ＮＩＫＥ运动鞋,男款"


@pytest.mark.parametrize("option,caption,removed,masked,kept", [
    ("urls", "美食分享 http://t.cn/A6abc123 快来看", "美食分享 快来看", "美食分享 [URL] 快来看",
     "美食分享 http://t.cn/A6abc123 快来看"),
    ("emails", "合作邮箱 studio@example.com", "合作邮箱", "合作邮箱 [EMAIL]", "合作邮箱 studio@example.com"),
    ("phones", "咨询电话 138-1234-5678", "咨询电话", "咨询电话 [PHONE]", "咨询电话 138-1234-5678"),
    ("handles", "@人民日报 升旗仪式", "升旗仪式", "[USER] 升旗仪式", "@人民日报 升旗仪式"),
    ("hashtags", "#春天# 樱花盛开", "樱花盛开", "[TAG] 樱花盛开", "#春天# 樱花盛开"),
])
def test_contact_policies(option: str, caption: str, removed: str, masked: str, kept: str) -> None:
    for policy, expected in (("remove", removed), ("mask", masked), ("keep", kept)):
        assert normalise(caption, _options(**{option: policy})) == expected


def test_emoji_policy() -> None:
    assert normalise("今天的晚霞太美了🌅", _options(emoji="keep")) == "今天的晚霞太美了🌅"
    assert normalise("今天的晚霞太美了🌅", _options(emoji="remove")) == "今天的晚霞太美了"


def test_boilerplate_toggle_and_custom_file(tmp_path: Path) -> None:
    caption = "可爱的柯基犬 侵删 本店专供"
    assert normalise(caption, _options(strip_boilerplate=False)) == caption
    custom = tmp_path / "boilerplate.txt"
    custom.write_text("# shop slogans\n本店专供\nre:^柯基$\n", encoding="utf-8")
    opts = _options(boilerplate_file=str(custom))
    assert normalise(caption, opts) == "可爱的柯基犬 侵删"
    assert explain("柯基 本店专供", opts)["caption_junk"] is True


def test_custom_blocklist_words_exceptions_and_patterns(tmp_path: Path) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# test list\n烟花\n!烟花厂\nre:禁[止放]\n", encoding="utf-8")
    opts = _options(blocklist_file=str(blocklist))
    assert explain("除夕夜的烟花表演", opts)["blocked_term"] == "烟花"
    assert explain("老烟花厂改造的创意园区", opts)["blocked_term"] is None
    assert explain("城区禁放烟花爆竹的告示", opts)["blocked_term"] == "烟花"
    assert explain("春节期间严禁放鞭炮", opts)["blocked_term"] == "禁放"
    assert explain("色情网站截图", opts)["blocked_term"] is None        # the default list is replaced


def test_bad_pattern_names_file_and_line(tmp_path: Path) -> None:
    blocklist = tmp_path / "bad.txt"
    blocklist.write_text("色情\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        explain("一只橘猫趴在窗台上", _options(blocklist_file=str(blocklist)))


def test_tokenizer_starts_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    blocklist = tmp_path / "fresh.txt"                   # a new list builds a new tokenizer
    blocklist.write_text("赌博\n", encoding="utf-8")
    explain("网络赌博害人害己", _options(blocklist_file=str(blocklist)))
    assert capfd.readouterr() == ("", "")


def test_length_limits() -> None:
    assert explain("一只猫", _options(min_chars=3))["keep"] is True
    long_caption = "春天公园里盛开的樱花，" * 40
    assert explain(long_caption, DEFAULTS)["reason"] == "caption_long"
    assert explain(long_caption, _options(max_chars=1000, max_repeat_ratio=1.0))["keep"] is True


def test_bilingual_share_is_stable_and_proportional() -> None:
    captions = [f"a photo of a red car number {i}" for i in range(400)]
    columns = caption_columns(captions, DEFAULTS)
    assert set(text_reasons(columns, DEFAULTS)) == {"not_chinese"}
    assert set(text_reasons(columns, _options(keep_bilingual_share=1.0))) == {None}
    half = text_reasons(columns, _options(keep_bilingual_share=0.5))
    assert 140 < half.count(None) < 260
    assert half == text_reasons(columns, _options(keep_bilingual_share=0.5))


def test_options_reject_unknown_keys_and_bad_ranges() -> None:
    with pytest.raises(ValidationError, match="min_chars_typo"):
        TextOptions(min_chars_typo=3)
    with pytest.raises(ValidationError, match="above max_chars"):
        TextOptions(min_chars=50, max_chars=10)
    with pytest.raises(ValidationError):
        TextOptions(urls="blur")


# --- properties -----------------------------------------------------------------------------

ALL_MASKED = _options(t2s=False, emoji="keep", urls="mask", emails="mask", phones="mask",
                      handles="mask", hashtags="mask")
JUNKY = st.sampled_from(["&amp;", "&lt;b&gt;", "<p>", "http://", "www.", ".com", "@", "#", "IMG_", "2031",
                         "侵删", "图片", "\u200b", "\u3000", "ｈ", "，", ",", "!", "！", "…", "🌸", " ", "(", "）"])
CHINESE = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5)
WORDS = st.lists(st.one_of(CHINESE, st.sampled_from([" ", "a", "Z", "7"])), min_size=1, max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(), st.lists(st.one_of(JUNKY, CHINESE), max_size=30).map("".join)),
       st.sampled_from([DEFAULTS, ALL_MASKED]))
def test_normalising_twice_changes_nothing(caption: str, opts: TextOptions) -> None:
    once = normalise(caption, opts)
    assert normalise(once, opts) == once


@settings(max_examples=200, deadline=None)
@given(WORDS.filter(lambda s: any("\u4e00" <= c <= "\u9fa5" for c in s)))
def test_meaningful_captions_never_become_empty(caption: str) -> None:
    assert normalise(caption, DEFAULTS) != ""


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.none(), st.text()), max_size=5))
def test_columns_never_raise_and_stay_in_range(captions: list[str | None]) -> None:
    columns = caption_columns(captions, DEFAULTS)
    for name in ("zh_ratio", "latin_ratio", "repeat_ratio"):
        assert all(0.0 <= v <= 1.0 for v in columns[name])
    assert len(text_reasons(columns, DEFAULTS)) == len(captions)
