"""The manifest contract: every column the phases write, its type and meaning, and the reasons.

This module is the single place where column names, Arrow types and reason names live.
Each phase writes through `conform()`, so a column that is not declared here cannot
reach a manifest, and tests assert the declared types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

from filters.multihash import VIEWS


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str


def _cols(*cols: Column) -> dict[str, Column]:
    return {c.name: c for c in cols}


IDENTITY = _cols(
    Column("key", pa.string(), "stable sample id: {shard}_{row:06d}"),
    Column("row_id", pa.int64(), "the same id as an integer, shard << 32 | row: for joins and dedup arrays"),
    Column("shard", pa.string(), "input shard the row belongs to"),
    Column("url", pa.string(), "image URL as given in the input"),
    Column("caption", pa.string(), "caption as given in the input (never modified)"),
)

DOWNLOAD = _cols(
    Column("status", pa.string(), "download status: success, failed_to_download, failed_to_resize, rejected"),
    Column("error", pa.string(), "download error message, null on success"),
    Column("error_kind", pa.string(), "coarse kind of the download error (see ERROR_KINDS), null on success"),
    Column("width", pa.int32(), "width of the stored image (after the download resize)"),
    Column("height", pa.int32(), "height of the stored image"),
    Column("original_width", pa.int32(), "width of the image as served"),
    Column("original_height", pa.int32(), "height of the image as served"),
    Column("sha256", pa.string(), "sha256 of the bytes as served (exact dedup)"),
)

IMAGE = _cols(
    Column("score_error", pa.string(), "why scoring this row failed (decode error, ...), null otherwise"),
    Column("aspect_ratio", pa.float32(), "max(w, h) / min(w, h) of the original image"),
    Column("entropy", pa.float32(), "Shannon entropy of the gray-level histogram, bits (0..8)"),
    Column("edge_density", pa.float32(), "share of pixels on a strong gradient (texture)"),
    Column("jpeg_bpp", pa.float32(), "stored JPEG bits per pixel"),
    Column("phash", pa.uint64(), "64-bit DCT perceptual hash of the whole image (filters/multihash.py)"),
    Column("phash_views", pa.list_(pa.uint64(), len(VIEWS) - 1),
           "64-bit DCT hashes of the other views, in the order of filters.multihash.VIEWS[1:]: the mirror, "
           "then windows at 96% and 92% of each side anchored at the four corners and the centre"),
    Column("graphic", pa.float32(), "0..1, how drawn the image looks (flat share, palette; filters/graphic.py)"),
)

TEXT = _cols(
    Column("caption_norm", pa.string(), "normalised caption (what the shards' .txt holds)"),
    Column("n_chars", pa.int32(), "length of the normalised caption in characters"),
    Column("n_words", pa.int32(), "length of the normalised caption in jieba words"),
    Column("zh_ratio", pa.float32(), "share of CJK characters among non-space characters"),
    Column("latin_ratio", pa.float32(), "share of Latin letters and digits among non-space characters"),
    Column("repeat_ratio", pa.float32(), "share of characters that repeat the character before them"),
    Column("n_sentences", pa.int32(), "number of sentences in the normalised caption"),
    Column("caption_junk", pa.bool_(), "caption was nothing but file-name junk or boilerplate"),
    Column("blocked_term", pa.string(), "blocklisted term matched in the caption, null if none"),
)

MODEL = _cols(
    Column("clip_score", pa.float32(), "cosine similarity of image and caption (Chinese-capable CLIP)"),
    Column("aesthetic", pa.float32(), "LAION aesthetic predictor v2 score (about 1..10)"),
    Column("nsfw", pa.float32(), "probability the image is NSFW"),
    Column("watermark", pa.float32(), "probability the image carries a watermark"),
    Column("style", pa.string(), "zero-shot style label (photo, cartoon, anime, ...)"),
    Column("style_prob", pa.float32(), "softmax probability of the chosen style"),
    Column("text_area", pa.float32(), "share of the image covered by detected text boxes (PP-OCRv4), 0..1"),
    Column("text_boxes", pa.int32(), "number of detected text boxes"),
    Column("ocr_text", pa.string(), "recognised text in reading order (models.ocr_recognize), cut at models.ocr_text_max"),
)

DECISION = _cols(
    Column("keep", pa.bool_(), "true when the row goes into the shards"),
    Column("reason", pa.string(), "first rule that dropped the row (see REASONS), null when kept"),
    Column("dup_of", pa.string(), "key of its duplicate group's representative: the row dedup kept, which this "
           "row is within the distance of (never merely chained to); the representative itself can then be "
           "dropped as `rebalanced`"),
    Column("style_label", pa.string(), "style the rebalance counted the row under (rebalance.style_source); "
                                       "null: unlabelled"),
)

OUTPUT = _cols(
    Column("out_shard", pa.string(), "name of the WebDataset shard holding the row, null if dropped"),
    Column("bucket", pa.string(), "training resolution WxH (write.buckets) nearest the stored image's aspect ratio; "
                                  "null when bucketing is off or the size is unknown"),
)

ALL: dict[str, Column] = {**IDENTITY, **DOWNLOAD, **IMAGE, **TEXT, **MODEL, **DECISION, **OUTPUT}

# Reasons, in the order decide applies them: a row's reason is the first that fires.
# Names are short snake_case words; stats, inspect and the report use this order.
REASONS: dict[str, str] = {
    "shard_failed": "the row's shard could not be processed (stats.json lists the error)",
    "download_failed": "the image could not be fetched (status is not success)",
    "decode_error": "the fetched bytes could not be decoded as an image",
    "too_small": "the original image's shorter side is below filters.min_side",
    "bad_aspect": "the aspect ratio exceeds filters.max_aspect_ratio",
    "low_texture": "gray-level entropy or edge density is below the texture floor",
    "caption_junk": "the caption is nothing but file-name junk or boilerplate",
    "caption_short": "the normalised caption is shorter than text.min_chars",
    "caption_long": "the normalised caption is longer than text.max_chars",
    "not_chinese": "the share of CJK characters is below text.min_zh_ratio",
    "caption_repetitive": "the repeated-character ratio exceeds text.max_repeat_ratio",
    "caption_unsafe": "the caption matches the text-safety blocklist",
    "caption_common": "the caption is shared by more distinct images than text.max_caption_images",
    "nsfw": "NSFW probability is at or above filters.nsfw_max",
    "watermark": "watermark probability is at or above filters.watermark_max",
    "text_heavy": "detected text covers more of the image than filters.text_area_max (posters, screenshots)",
    "low_clip": "image-caption CLIP similarity is below filters.clip_min",
    "low_aesthetic": "aesthetic score is below filters.aesthetic_min",
    "duplicate": "an exact, near or semantic duplicate of its group's representative (dup_of names it)",
    "rebalanced": "dropped to bring its style's share to the configured target",
}


# Download error kinds: the coarse, named cause beside each failed row's free-text `error`.
# curate/fetch.py and curate/download.py classify every failure into one of these.
ERROR_KINDS: dict[str, str] = {
    "bad_url": "empty URL, a scheme other than http(s), or no host",
    "refused_address": "the host resolves to an address not allowed (private, loopback, metadata, ...)",
    "dns_failed": "the host name could not be resolved within download.timeout",
    "timeout": "no complete answer within download.timeout",
    "connection_reset": "the server reset or closed the connection mid-request",
    "connection_failed": "the connection could not be made (refused, unreachable, TLS)",
    "http_403": "HTTP 403 Forbidden",
    "http_404": "HTTP 404 Not Found",
    "http_410": "HTTP 410 Gone",
    "http_429": "HTTP 429 Too Many Requests",
    "http_503": "HTTP 503 Service Unavailable",
    "http_5xx": "another HTTP 5xx server error",
    "http_4xx": "another HTTP 4xx client error",
    "http_other": "any other unexpected HTTP status (a redirect loop, ...)",
    "opted_out": "X-Robots-Tag opts the image out (download.disallowed_header_directives)",
    "too_large": "more than download.max_bytes served, or more than download.max_pixels claimed",
    "not_an_image": "the bytes could not be decoded and re-encoded as an image",
    "host_unavailable": "never fetched: its host stayed paused past the shard's wait budget",
    "error": "any other failure (the error column says what)",
}


def arrow_schema(names: list[str]) -> pa.Schema:
    """Arrow schema for the given declared columns, in the given order."""
    return pa.schema([pa.field(n, ALL[n].type) for n in names])


def build(columns: dict[str, Any]) -> pa.Table:
    """A table from plain columns, each converted straight to its declared type (no inference)."""
    return pa.table({name: pa.array(values, type=ALL[name].type) for name, values in columns.items()})


def conform(table: pa.Table, extra: Iterable[str] = ()) -> pa.Table:
    """Cast a table to the declared types; `extra` names the input columns carried as they are.

    Any other undeclared column is an error, not a silent extra.
    """
    extra = set(extra)
    fields = []
    for name in table.column_names:
        if name in ALL:
            fields.append(pa.field(name, ALL[name].type))
        elif name in extra:
            fields.append(table.schema.field(name))
        else:
            raise KeyError(f"column {name!r} is not declared in manifests/schema.py")
    return table.cast(pa.schema(fields))
