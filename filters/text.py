"""Chinese captions: normalisation, metrics, rules and text safety.

Everything here is pure. `caption_columns` turns a batch of raw captions into the text columns
of the manifest (the score phase); the text rules of manifests/rules.py read those columns (the
decide phase), so changing a threshold never re-normalises anything. Every default lives in
`TextOptions`, which the pipeline config embeds as its `text:` section.

Conventions the normaliser follows (in this order):
  1. the raw caption is cut to `max_input_chars` so a pathological caption costs bounded work;
  2. whitespace and control characters become one space; zero-width and other invisible
     format characters (Unicode Cc, Cf, Cs, Co) are removed;
  3. HTML entities are decoded and tags removed (repeatedly: `&amp;lt;b&amp;gt;` is a tag too);
  4. traditional Chinese becomes simplified (OpenCC t2s);
  5. full-width ASCII letters, digits and symbols become half-width, but the full-width
     Chinese sentence punctuation ，！？：；（） stays, and ASCII , ! ? : ; right after a
     Chinese character becomes full-width (价格:100元 -> 价格：100元): the usual typesetting;
  6. URLs, e-mail addresses, phone numbers, @handles and #hashtags# are removed, masked or kept;
  7. emoji are removed or kept;
  8. boilerplate and file-name junk are stripped; empty brackets, spaces around Chinese
     punctuation and separators left at either end are removed, whitespace is collapsed, and
     runs of emphasis punctuation (！！！, 。。。, ~~~) become one mark (…… and —— keep their
     conventional two).
The whole pass repeats until it changes nothing, so normalising twice changes nothing.
"""
from __future__ import annotations

import hashlib
import html
import logging
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from filters.declare import Column, Scorer

if TYPE_CHECKING:
    import jieba
    import opencc

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_BOILERPLATE = DATA_DIR / "boilerplate_zh.txt"
DEFAULT_BLOCKLIST = DATA_DIR / "blocklist_zh.txt"

Policy = Literal["remove", "mask", "keep"]


class TextOptions(BaseModel):
    """Every knob of caption normalisation and of the text rules (the config's `text:`)."""

    model_config = ConfigDict(extra="forbid")

    t2s: bool = Field(True, description="convert traditional Chinese to simplified (OpenCC t2s)")
    fullwidth_to_halfwidth: bool = Field(
        True, description="full-width ASCII letters, digits and symbols to half-width; Chinese "
        "sentence punctuation ，！？：；（） stays full-width, and ASCII ,!?:; after a Chinese "
        "character becomes full-width")
    urls: Policy = Field("remove", description="URLs and bare domains: remove, mask as [URL], or keep")
    emails: Policy = Field("remove", description="e-mail addresses: remove, mask as [EMAIL], or keep")
    phones: Policy = Field("remove", description="Chinese mobile, landline and 400/800 numbers: "
                           "remove, mask as [PHONE], or keep")
    handles: Policy = Field("remove", description="@handles: remove, mask as [USER], or keep")
    hashtags: Literal["remove", "mask", "keep", "unwrap"] = Field(
        "unwrap", description="#topic# and #topic: unwrap keeps the words without the # marks "
        "(Weibo topics usually name what is pictured), remove drops them, mask writes [TAG]")
    emoji: Literal["keep", "remove"] = Field(
        "remove", description="emoji are decoration in Chinese alt text and most Chinese text "
        "encoders' vocabularies lack them")
    strip_boilerplate: bool = Field(True, description="strip the phrases and patterns of boilerplate_file")
    boilerplate_file: str | None = Field(
        None, description="boilerplate and file-name junk list; None is the shipped "
        "filters/data/boilerplate_zh.txt (its header documents the format)")
    blocklist_file: str | None = Field(
        None, description="text-safety blocklist; None is the shipped filters/data/blocklist_zh.txt "
        "(its header documents the format and how to extend it)")
    max_input_chars: int = Field(
        4096, ge=1, description="raw captions are cut to this many characters before any work, "
        "so metrics describe that prefix; far above max_chars, so such captions still fail caption_long")
    min_chars: int = Field(5, ge=0, description="caption_short below this many characters (LAION-5B uses 5)")
    max_chars: int = Field(300, ge=1, description="caption_long above this many characters: "
                           "far beyond what Chinese text encoders read (52-77 tokens)")
    min_zh_ratio: float = Field(
        0.25, ge=0, le=1, description="not_chinese below this share of CJK characters among "
        "letters; a Latin word is ~5 letters and a Chinese word ~1.5 characters, so 0.25 means "
        "roughly half the words are Chinese (Apple MacBook Pro 笔记本电脑 passes)")
    keep_bilingual_share: float = Field(
        0.0, ge=0, le=1, description="share of the captions below min_zh_ratio kept anyway, chosen "
        "by a stable hash of the normalised caption: keeps some English and bilingual data")
    max_repeat_ratio: float = Field(
        0.4, ge=0, le=1, description="caption_repetitive above this share of characters that "
        "repeat a 1-4 character unit three or more times in a row (哈哈哈哈, 美女美女美女)")
    max_caption_images: int = Field(
        100, ge=1, description="caption_common when more distinct images share the normalised "
        "caption (stock phrases, product titles); counted globally by the pipeline")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> TextOptions:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self


# Knobs of the text rules, which decide applies to these columns: changing one is a re-decide, never a
# re-score. Every other TextOptions field changes the columns themselves, so it is in the fingerprint.
RULE_KNOBS = frozenset({"min_chars", "max_chars", "min_zh_ratio", "keep_bilingual_share", "max_repeat_ratio",
                        "max_caption_images"})


def _list_files(cfg) -> list[str]:
    """The word lists the columns are computed from: their contents are part of the fingerprint."""
    return [str(_resolve(cfg.text.boilerplate_file, DEFAULT_BOILERPLATE)),
            str(_resolve(cfg.text.blocklist_file, DEFAULT_BLOCKLIST))]


SCORER = Scorer(
    "caption", optional=False, stage="cpu", reads=("caption",),
    keys=lambda cfg: tuple(f"text.{k}" for k in type(cfg.text).model_fields if k not in RULE_KNOBS),
    files=_list_files,
    doc="the caption normalised (TextOptions) and measured: length, language shares, repetition, junk, blocklist",
    columns=(
        Column("caption_norm", pa.string(), "normalised caption (what the shards' .txt holds)"),
        Column("n_chars", pa.int32(), "length of the normalised caption in characters", shown=True),
        Column("n_words", pa.int32(), "length of the normalised caption in jieba words"),
        Column("zh_ratio", pa.float32(), "share of CJK characters among non-space characters", shown=True),
        Column("latin_ratio", pa.float32(), "share of Latin letters and digits among non-space characters"),
        Column("repeat_ratio", pa.float32(), "share of characters that repeat the character before them"),
        Column("n_sentences", pa.int32(), "number of sentences in the normalised caption"),
        Column("caption_junk", pa.bool_(), "caption was nothing but file-name junk or boilerplate"),
        Column("blocked_term", pa.string(), "blocklisted term matched in the caption, null if none"),
    ))
TEXT_COLUMNS = SCORER.column_names


# --- character classes and patterns ---------------------------------------------------------

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_LETTER = re.compile(r"[^\W\d_]")                     # any script's letters, CJK included
_LATIN = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")   # not × and ÷
_CONTENT = re.compile(r"[^\W_]")                      # letters or digits: something to say
_SPACES = re.compile(r"\s+")

_TAG = re.compile(r"<!--.*?-->|<![^<>]{0,500}>|</?[A-Za-z][A-Za-z0-9-]{0,30}(?:\s[^<>]{0,500})?/?>", re.S)

_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
_URL = re.compile(
    rf"(?:https?://|ftp://|www\.){_URL_CHARS}*[A-Za-z0-9/_~#=&%-]"
    r"|(?<![A-Za-z0-9.@_-])(?:[A-Za-z0-9-]+\.)+"
    r"(?:com|cn|net|org|edu|gov|info|io|co|cc|tv|me|top|xyz|vip|hk|tw)"
    rf"(?::\d+)?(?:/{_URL_CHARS}*)?(?![A-Za-z0-9-])", re.I)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\d)(?:(?:\+|00)?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)"
                    r"|(?<!\d)0\d{2,3}-\d{7,8}(?!\d)|(?<!\d)[48]00[\s-]?\d{3}[\s-]?\d{4}(?!\d)")
_HANDLE = re.compile(r"(?<![A-Za-z0-9._%+-])@[\w-]{1,30}")
_HASHTAG = re.compile(r"#+([^#\s]{1,40})#+|(?<![\w#&])#+(\w{1,40})")
_CONTACTS = (("urls", _URL, "[URL]"), ("emails", _EMAIL, "[EMAIL]"),
             ("phones", _PHONE, "[PHONE]"), ("handles", _HANDLE, "[USER]"))

_EMOJI = re.compile("[\U0001f000-\U0001faff\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff"
                    "\u3030\u303d\u3297\u3299\u20e3\ufe0e\ufe0f\U000e0020-\U000e007f]")

_KEEP_FULLWIDTH = "，！？：；（）"
_HALFWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if chr(c) not in _KEEP_FULLWIDTH}
_HALFWIDTH[0x3000] = 0x20
_TO_FULLWIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；"}
_ASCII_PUNCT_AFTER_CJK = re.compile(rf"(?<=[{_CJK}])\s*([,!?:;])")

_PUNCT_RUN = re.compile(r"([!?,;:~*=_\-。，！？、；：～·•…—])\1+")   # emphasis runs; URLs keep their //
_PAIRED = "…—"                                         # written doubled: …… and ——
_SPACE_NEAR_ZH_PUNCT = re.compile(r"\s*([，。！？：；、])\s*|\s+(?=[）》】」』])|(?<=[（《【「『])\s+")
_SEPARATORS = r"[\s,，、;；:：|/\\_·•-]"              # what is left between stripped phrases
_EMPTY_BRACKETS = re.compile("|".join(f"{re.escape(a)}{_SEPARATORS}*{re.escape(b)}"
                                      for a, b in ("()", "（）", "[]", "【】", "《》", "「」", "『』", "“”", "<>")))
_EDGES = re.compile(rf"^{_SEPARATORS}+|{_SEPARATORS}+$")

_SENTENCE_END = re.compile(r"[。！？!?；;…]+|\.(?=\s|$)")
_REPEAT_UNIT = re.compile(r"(.{1,4}?)\1{2,}", re.S)
_MAX_ROUNDS = 8                                        # a safety cap: real captions settle in 1-2


@lru_cache(maxsize=1)
def _invisible() -> re.Pattern[str]:
    """Control, format (zero-width, bidi), surrogate and private-use characters, as ranges."""
    ranges: list[str] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)) in ("Cc", "Cf", "Cs", "Co"):
            if cp != prev + 1:
                if start >= 0:
                    ranges.append(f"{chr(start)}-{chr(prev)}")
                start = cp
            prev = cp
    ranges.append(f"{chr(start)}-{chr(prev)}")
    return re.compile("[" + "".join(ranges) + "]")


@lru_cache(maxsize=1)
def _converter() -> opencc.OpenCC:
    import opencc
    return opencc.OpenCC("t2s")


# --- configurable lists ---------------------------------------------------------------------

def _resolve(path: str | None, default: Path) -> str:
    return str(Path(path).expanduser().resolve()) if path else str(default)


@lru_cache(maxsize=8)
def _entries(path: str) -> tuple[tuple[int, str], ...]:
    """(line number, entry) for every non-blank, non-comment line of a list file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple((n, line.strip()) for n, line in enumerate(lines, 1)
                 if line.strip() and not line.lstrip().startswith("#"))


def _pattern(path: str, lineno: int, source: str) -> str:
    """A list file's `re:` pattern, checked so a typo names its file and line."""
    try:
        re.compile(source)
    except re.error as err:
        raise ValueError(f"{path}:{lineno}: bad regular expression {source!r}: {err}") from None
    return f"(?:{source})"


@lru_cache(maxsize=8)
def _junk(path: str) -> re.Pattern[str] | None:
    """One alternation of every boilerplate phrase (longest first) and pattern in the file."""
    phrases = sorted((e for _, e in _entries(path) if not e.startswith("re:")), key=len, reverse=True)
    parts = [_pattern(path, n, e[3:]) for n, e in _entries(path) if e.startswith("re:")]
    parts += [re.escape(p) for p in phrases]
    return re.compile("|".join(parts), re.I) if parts else None


@dataclass(frozen=True)
class _Blocklist:
    words: frozenset[str]
    exceptions: frozenset[str]
    pattern: re.Pattern[str] | None
    max_len: int

    def find(self, tokens: Sequence[str], text: str) -> str | None:
        """The first blocked term in a segmented, lower-cased caption, or None.

        A word hits as a run of whole tokens (黄色|网站) or as the head or tail of one
        compound token (色情片); never across a token boundary (特色|情况).
        """
        words = [t for t in tokens if not t.isspace()]
        for i, token in enumerate(words):
            if token in self.exceptions:
                continue
            run = ""
            for following in words[i:]:
                run += following
                if len(run) > self.max_len:
                    break
                if run in self.words:
                    return run
            for k in range(2, min(len(token), self.max_len + 1)):
                if token[:k] in self.words:
                    return token[:k]
                if token[-k:] in self.words:
                    return token[-k:]
        found = self.pattern.search(text) if self.pattern else None
        return found.group(0) if found else None


@lru_cache(maxsize=8)
def _blocklist(path: str) -> _Blocklist:
    words, exceptions, patterns = set(), set(), []
    for n, entry in _entries(path):
        if entry.startswith("re:"):
            patterns.append(_pattern(path, n, entry[3:]))
        elif entry.startswith("!"):
            exceptions.add(_SPACES.sub("", entry[1:]).lower())
        else:
            words.add(_SPACES.sub("", entry).lower())
    return _Blocklist(frozenset(words), frozenset(exceptions),
                      re.compile("|".join(patterns), re.I) if patterns else None,
                      max((len(w) for w in words), default=0))


@lru_cache(maxsize=8)
def _tokenizer(blocklist_path: str) -> jieba.Tokenizer:
    """A quiet jieba tokenizer that keeps the blocklist's words and exceptions whole.

    Exceptions get the frequency that makes them one token (杀人鲸, not 杀人|鲸); blocked
    words missing from jieba's dictionary get just enough to beat their own characters.
    """
    import jieba
    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    blocklist = _blocklist(blocklist_path)
    for word in sorted(blocklist.exceptions):
        tokenizer.suggest_freq(word, tune=True)
    for word in sorted(blocklist.words):
        if len(word) > 1 and word not in tokenizer.FREQ:
            tokenizer.add_word(word)
    return tokenizer


# --- normalisation --------------------------------------------------------------------------

def _clean(text: str) -> str:
    """Whitespace to one space, invisible characters out."""
    return _invisible().sub("", _SPACES.sub(" ", text))


def _decode(text: str, opts: TextOptions) -> str:
    """Steps 2-5: what the caption says, in one script and one width, without markup."""
    text = _clean(text)
    while "&" in text or "<" in text:                  # an entity can encode a tag or an invisible
        stripped = _clean(_TAG.sub(" ", html.unescape(text)))
        if stripped == text:
            break
        text = stripped
    if opts.t2s:
        text = _converter().convert(text)
    if opts.fullwidth_to_halfwidth:
        text = text.translate(_HALFWIDTH)
    return text


def _strip_contacts(text: str, opts: TextOptions) -> str:
    for option, pattern, mask in _CONTACTS:
        policy = getattr(opts, option)
        if policy != "keep":
            text = pattern.sub(f" {mask} " if policy == "mask" else " ", text)
    if opts.hashtags == "unwrap":
        text = _HASHTAG.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    elif opts.hashtags != "keep":
        text = _HASHTAG.sub(" [TAG] " if opts.hashtags == "mask" else " ", text)
    return text


def _collapse(run: re.Match[str]) -> str:
    char = run.group(1)
    return char * 2 if char in _PAIRED else char


def _strip_and_tidy(text: str, opts: TextOptions) -> str:
    """Steps 6-8: contacts, emoji and junk out, punctuation and spaces tidied."""
    text = _strip_contacts(text, opts)
    if opts.emoji == "remove":
        text = _EMOJI.sub("", text)
    if opts.strip_boilerplate and (junk := _junk(_resolve(opts.boilerplate_file, DEFAULT_BOILERPLATE))):
        text = junk.sub(" ", text)
    text = _EMPTY_BRACKETS.sub(" ", text)
    if opts.fullwidth_to_halfwidth:
        text = _ASCII_PUNCT_AFTER_CJK.sub(lambda m: _TO_FULLWIDTH[m.group(1)], text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_NEAR_ZH_PUNCT.sub(lambda m: m.group(1) or "", text)
    text = _PUNCT_RUN.sub(_collapse, text)
    return _EDGES.sub("", text)


def _normalise(caption: str | None, opts: TextOptions) -> tuple[str, bool]:
    """The normalised caption, and whether stripping URLs, contacts and junk left nothing.

    The whole pass repeats until it changes nothing, which is what makes normalising twice a
    no-op: removing one thing can expose another (图片 | 侵删 -> 图片 -> empty, <a🌸> -> <a>).
    """
    text = _decode((caption or "")[: opts.max_input_chars], opts)
    had_content = _CONTENT.search(text) is not None
    text = _strip_and_tidy(text, opts)
    for _ in range(_MAX_ROUNDS):
        again = _strip_and_tidy(_decode(text, opts), opts)
        if again == text:
            break
        text = again
    return text, had_content and _CONTENT.search(text) is None


def normalise(caption: str | None, opts: TextOptions) -> str:
    """The caption as written to the shards' .txt (see the module docstring for the steps)."""
    return _normalise(caption, opts)[0]


# --- metrics --------------------------------------------------------------------------------

def _f32(x: float) -> float:
    """Round to float32, the manifest's type, so explain and re-decide compare equal values."""
    return float(np.float32(x))


def _repeat_ratio(text: str) -> float:
    """Share of non-space characters repeating a 1-4 character unit 3+ times (digits exempt)."""
    compact = _SPACES.sub("", text)
    if not compact:
        return 0.0
    repeated = sum(m.end() - m.start() - len(m.group(1))
                   for m in _REPEAT_UNIT.finditer(compact) if not m.group(1).isdigit())
    return repeated / len(compact)


# The columns that need the caption segmented (jieba), the costly part: the rest are cheap.
SEGMENTED = ("n_words", "blocked_term")


def _plain_row(caption: str | None, opts: TextOptions) -> dict[str, Any]:
    """The text columns that need no segmentation, for one caption."""
    text, junk = _normalise(caption, opts)
    letters = len(_LETTER.findall(text))
    return {
        "caption_norm": text,
        "n_chars": len(text),
        "zh_ratio": _f32(len(_CJK_CHAR.findall(text)) / letters) if letters else 0.0,
        "latin_ratio": _f32(len(_LATIN.findall(text)) / letters) if letters else 0.0,
        "repeat_ratio": _f32(_repeat_ratio(text)),
        "n_sentences": sum(1 for part in _SENTENCE_END.split(text) if _CONTENT.search(part)),
        "caption_junk": junk,
    }


def _segmented(text: str, opts: TextOptions) -> dict[str, Any]:
    """n_words and blocked_term of a normalised caption."""
    blocklist_path = _resolve(opts.blocklist_file, DEFAULT_BLOCKLIST)
    lowered = text.lower()
    tokens = _tokenizer(blocklist_path).lcut(lowered) if text else []
    return {"n_words": sum(1 for t in tokens if _CONTENT.search(t)),
            "blocked_term": _blocklist(blocklist_path).find(tokens, lowered) if text else None}


def _caption_row(caption: str | None, opts: TextOptions) -> dict[str, Any]:
    """All text columns for one caption."""
    row = _plain_row(caption, opts)
    return {**row, **_segmented(row["caption_norm"], opts)}


def plain_caption_columns(captions: Sequence[str | None], opts: TextOptions) -> dict[str, list]:
    """The text columns but SEGMENTED, the same values as caption_columns: for the download plan, which
    segments only the captions its cheaper rules leave in (segmented_columns)."""
    columns: dict[str, list] = {name: [] for name in TEXT_COLUMNS if name not in SEGMENTED}
    for caption in captions:
        for name, value in _plain_row(caption, opts).items():
            columns[name].append(value)
    return columns


def segmented_columns(normalised: Sequence[str], opts: TextOptions) -> dict[str, list]:
    """The SEGMENTED columns of normalised captions (caption_norm)."""
    columns: dict[str, list] = {name: [] for name in SEGMENTED}
    for text in normalised:
        for name, value in _segmented(text, opts).items():
            columns[name].append(value)
    return columns


def caption_columns(captions: Sequence[str | None], opts: TextOptions) -> dict[str, list]:
    """Text columns (TEXT_COLUMNS) for a batch of raw captions; None counts as empty.

    n_chars counts the normalised caption, which comes from at most `max_input_chars` raw
    characters. zh_ratio and latin_ratio are shares of letters (any script; digits,
    punctuation, emoji and spaces carry no language and are not counted).
    """
    columns: dict[str, list] = {name: [] for name in TEXT_COLUMNS}
    for caption in captions:
        for name, value in _caption_row(caption, opts).items():
            columns[name].append(value)
    return columns


# --- rules ----------------------------------------------------------------------------------

def _in_share(text: str, share: float) -> bool:
    """Stable pseudo-random choice of `share` of all captions, the same on every worker."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def bilingual_spared(captions: Sequence[str | None], share: float) -> np.ndarray:
    """Which captions text.keep_bilingual_share keeps although they are not Chinese enough."""
    if share <= 0:
        return np.zeros(len(captions), bool)
    return np.array([_in_share(str(c or ""), share) for c in captions], bool)


def caption_row(caption: str | None, opts: TextOptions) -> dict[str, Any]:
    """The text columns of one caption (what `curate text` prints beside the decision)."""
    return {"caption": caption, **_caption_row(caption, opts)}
