"""The manifest contract: every column the phases write, its type and meaning.

The identity, download, decision and output columns are declared here; the score columns come
from the scorers' own declarations (filters/registry.py) and the reasons from the rules table
(manifests/rules.py). Each phase writes through `conform()`, so a column that is declared nowhere
cannot reach a manifest, and tests assert the declared types.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from filters import image, text
from filters.declare import Column, Scorer
from filters.models.catalog import MODEL_SCORERS
from filters.registry import SCORERS
from manifests.rules import REASONS  # noqa: F401  (the reasons live with their rules; re-exported here)


def _cols(*cols: Column) -> dict[str, Column]:
    return {c.name: c for c in cols}


IDENTITY = _cols(
    Column("key", pa.string(), "stable sample id: {shard}_{row:06d}"),
    Column("row_id", pa.int64(), "the same id as an integer, shard << 32 | row: for joins and dedup arrays"),
    Column("shard", pa.string(), "input shard the row belongs to"),
    Column("url", pa.string(), "image URL as given in the input"),
    Column("caption", pa.string(), "caption as given in the input (never modified)"),
)

# What the download plan found before anything was fetched (input.where, input.url_blocklist, the caption
# rules with input.caption_first); the rules of manifests/rules.py with when="input" read these columns.
PLAN = _cols(
    Column("where_excluded", pa.bool_(), "input.where was not true (false or null) for the row's input columns"),
    Column("url_blocked_by", pa.string(), "the input.url_blocklist entry the URL matches, null if none"),
    Column("caption_urls", pa.int32(), "distinct URLs sharing the normalised caption among the rows the other "
                                       "before-download rules pass (input.caption_first); null: not counted"),
    Column("before_download", pa.string(), "the before-download rule that dropped the row, so it was never "
                                           "requested (status not_requested); null: requested"),
)

DOWNLOAD = _cols(
    Column("status", pa.string(), "download status: success, failed_to_download, failed_to_resize, rejected, "
                                  "not_requested (a rule before download dropped it: before_download names it)"),
    Column("error", pa.string(), "download error message, null on success"),
    Column("error_kind", pa.string(), "coarse kind of the download error (see ERROR_KINDS), null on success"),
    Column("width", pa.int32(), "width of the stored image (after the download resize)"),
    Column("height", pa.int32(), "height of the stored image"),
    Column("original_width", pa.int32(), "width of the image as served"),
    Column("original_height", pa.int32(), "height of the image as served"),
    Column("sha256", pa.string(), "sha256 of the bytes as served (exact dedup)"),
)

# The score columns are the scorers' own declarations (filters/registry.py), in their order.
IMAGE = _cols(*image.SCORER.columns)
TEXT = _cols(*text.SCORER.columns)
MODEL = _cols(*(c for s in MODEL_SCORERS for c in s.columns))

# Columns decide derives as it reads a shard, for a rule to read; they are not stored in the manifest.
DERIVED = _cols(
    Column("image_blocked_by", pa.string(), "the filters.image_blocklist entry the image matches (its sha256, or a "
                                            "pHash within filters.image_blocklist_distance bits), null if none"),
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

# Written by the recaption phase (curate/phases/recaption/) when recaption.enabled; absent otherwise.
RECAPTION = _cols(
    Column("recaption", pa.string(), "caption a vision-language model wrote for the kept row (recaption.*), "
                                     "normalised and passed by the caption rules; null: dropped row, or no usable "
                                     "caption (recaption_error says why)"),
    Column("recaption_error", pa.string(), "why a kept row has no recaption: the model failed on it, its output was "
                                           "empty or garbled, a caption rule rejected it (rejected: REASON), or its "
                                           "shard's recaption failed; null otherwise"),
)

OUTPUT = _cols(
    Column("out_shard", pa.string(), "name of the WebDataset shard holding the row, null if dropped"),
    Column("bucket", pa.string(), "training resolution WxH (write.buckets) nearest the stored image's aspect ratio; "
                                  "null when bucketing is off or the size is unknown"),
)



def declared(scorers: tuple[Scorer, ...] = SCORERS) -> dict[str, Column]:
    """Every manifest column, in manifest order, the score columns being those `scorers` declare; a column
    two declarations claim is an error naming both."""
    out = {**IDENTITY, **PLAN, **DOWNLOAD}
    owner = {name: "manifests/schema.py" for name in (*out, *DECISION, *RECAPTION, *OUTPUT)}
    for scorer in scorers:
        for column in scorer.columns:
            if column.name in owner:
                raise ValueError(f"column {column.name!r} is declared by both {owner[column.name]} and scorer "
                                 f"{scorer.name}")
            out[column.name], owner[column.name] = column, f"scorer {scorer.name}"
    return {**out, **DECISION, **RECAPTION, **OUTPUT}


ALL: dict[str, Column] = declared()

# Download error kinds: the coarse, named cause beside each failed row's free-text `error`.
# curate/phases/download/fetch.py and curate/phases/download/phase.py classify every failure into one of these.
ERROR_KINDS: dict[str, str] = {
    "bad_url": "empty URL, a scheme other than http(s), or no host",
    "refused_address": "the host resolves to an address not allowed (private, loopback, metadata, ...)",
    "dns_failed": "the host name does not exist (or has no address)",
    "dns_timeout": "the lookup did not finish within download.timeout, or failed temporarily; retried, never cached",
    "timeout": "no complete answer within download.timeout (one deadline for connect, headers and body)",
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
    "robots_disallowed": "never requested: the host's robots.txt disallows it for download.user_agent_token or *",
    "robots_unavailable": "never requested: the host's robots.txt failed transiently past download.retries "
                          "(RFC 9309: assume disallowed)",
    "too_large": "more than download.max_bytes served, or more than download.max_pixels claimed",
    "not_an_image": "the bytes are not an image format identified before decoding, or could not be decoded",
    "host_unavailable": "never fetched: its host stayed paused past the shard's wait budget (download.max_wait), "
                        "or answered none of its requests and was all that was left",
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
