"""One validated config drives every phase; the defaults live here and nowhere else.

Loading is strict (unknown keys are errors) and fails before Ray starts, with a message
that names the key, what was expected and what was given.
"""
from __future__ import annotations

import codecs
import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from curate.run.storage import Storage, StorageOptions, absolute, is_local
from filters.buckets import SDXL_BUCKETS
from filters.models import ModelOptions
from filters.models.recaption import RecaptionOptions
from filters.text import TextOptions
from manifests.ranks import PATTERN as RANK_PATTERN


def proxy_address(proxy: str) -> tuple[str, int]:
    """host and port of a `download.proxy` URL (http://HOST:PORT), or ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://HOST:PORT, got {proxy!r}")
    if parts.username or parts.password:
        raise ValueError("proxy credentials are not supported (they would be written into the run's config)")
    if parts.path not in ("", "/") or parts.query or parts.port is None:
        raise ValueError(f"expected http://HOST:PORT with nothing after the port, got {proxy!r}")
    return parts.hostname, parts.port


class ConfigError(ValueError):
    """A config that cannot run; the message is meant for the user, as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    paths: list[str] = Field(description="URL manifests (files or globs): parquet, csv, tsv or jsonl")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="input format; auto picks it from each file's extension")
    encoding: str = Field("utf-8", description=(
        "text encoding of csv, tsv and jsonl inputs (any Python codec name: gb18030 reads GBK and GB2312 "
        "exports too); parquet text is UTF-8 by definition"))
    url_col: str = Field("url", description="column holding the image URL")
    caption_col: str = Field("caption", description="column holding the caption")
    extra_cols: list[str] = Field(default_factory=list, description="input columns carried into every manifest")
    shard_rows: int = Field(10_000, ge=1, description="rows per input shard (one download task each)")
    shuffle: bool = Field(True, description=(
        "order rows by a stable hash of the URL when cutting shards, so one host's URLs spread over "
        "every shard and over the whole run instead of a few tasks (keys follow the shuffled order)"))
    where: str | None = Field(None, description=(
        "keep only the rows for which this expression over the input's own columns is true, before anything "
        "is downloaded (the grammar of `curate inspect --where`, e.g. \"punsafe < 0.5 and pwatermark < 0.8\" on "
        "LAION parquet); the columns it names are read even when not in extra_cols; other rows get the reason "
        "input_where and are never requested"))
    url_blocklist: str | None = Field(None, description=(
        "file (any URI) of domains, URL prefixes and re: patterns (filters/blocklists.py has the format): a "
        "matching URL is never contacted and its row gets the reason url_blocked; its digest is recorded in "
        "the plan"))
    caption_first: bool = Field(True, description=(
        "apply the caption rules (text.*, caption_common counted by distinct URLs) while planning, before "
        "anything is downloaded: the rows they drop are never requested (status not_requested) and keep "
        "their reason in the manifest; false: every row is downloaded and decide applies them"))


    @field_validator("where")
    @classmethod
    def _where_parses(cls, v: str | None) -> str | None:
        from manifests.where import WhereError, columns, compile_where

        if v is not None:   # the grammar here; the columns against the input files before Ray starts
            try:
                compile_where(v, columns(v))
            except WhereError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        try:
            return codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (e.g. utf-8, gb18030, big5)") from None


# Bytes per pixel the decode of one image may take at its peak (measured in
# tests/curate/phases/download/test_hostile.py: an RGBA or 16-bit image decoded by PIL, composited on
# white, re-encoded for the resizer).
DECODE_BYTES_PER_PIXEL = 20
MIN_BODY_BUFFER_MB = 32


class DownloadConfig(_Section):
    thread_count: int = Field(32, ge=1, description="concurrent fetches per download task")
    per_host_connections: int = Field(
        4, ge=1, description="most requests in flight to one host within a download task")
    timeout: float = Field(10.0, gt=0, description=(
        "seconds one fetch may take in all: connect, TLS, headers and body, redirects included (a server "
        "that drips bytes fails as timeout at this deadline); each DNS lookup gets the time left"))
    retries: int = Field(2, ge=0, description=(
        "extra attempts per URL after a transient failure (timeout, reset, 429, 5xx, DNS timeout); "
        "404, 410, refused addresses, unknown names and opt-outs are never retried"))
    backoff: float = Field(1.0, ge=0, description=(
        "seconds before the first retry; doubled for each further one, with jitter (0.5-1.5x)"))
    max_retry_after: float = Field(60.0, ge=0, description=(
        "longest Retry-After (of a 429 or 503) waited for; longer ones are cut to this"))
    host_window: int = Field(20, ge=2, description=(
        "a host's last first attempts watched (retries of a URL are not a new sample): when most of "
        "them failed transiently, and at least 2 x per_host_connections of them, the host is paused"))
    host_pause: float = Field(30.0, ge=0, description=(
        "seconds a failing host is paused before one probe request; doubles while probes fail"))
    max_wait: float = Field(120.0, ge=0, description=(
        "seconds a shard may sit with nothing in flight waiting on paused hosts and retry delays; "
        "then the rest is given up (error_kind host_unavailable or the last error); at once when all that "
        "waits is on paused hosts that answered none of their requests"))
    dns_ttl: float = Field(300.0, ge=0, description=(
        "seconds a host's checked addresses (or a refusal: address not allowed, name does not exist) are "
        "reused within a task; timed-out lookups are never kept"))
    image_size: int = Field(1024, ge=64, description="images whose shorter side is larger are resized to this")
    encode_quality: int = Field(95, ge=50, le=100, description="JPEG quality of the stored image")
    max_pixels: int = Field(100_000_000, ge=1, description=(
        "images claiming more pixels are refused undecoded; also OpenCV's own limit in the download worker"))
    user_agent_token: str | None = Field(None, description=(
        "your crawler's name: added to the User-Agent, matched by robots.txt groups and X-Robots-Tag agents"))
    robots_txt: bool = Field(True, description=(
        "honour each host's robots.txt (RFC 9309): fetched once per host per task, its rules for "
        "user_agent_token and for * applied, Crawl-delay a floor on the host's request interval"))
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a row count as opted out")
    max_bytes: int = Field(20_000_000, ge=1, description="responses larger than this are refused")
    memory_mb: int = Field(2560, ge=64, description=(
        "memory a download task's images may take, MB: the one image being decoded (max_bytes + "
        f"{DECODE_BYTES_PER_PIXEL} bytes x max_pixels) and the response bodies held in memory (the rest); "
        "bodies past it spill to the task's scratch disk"))
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs fetched even though private or loopback (e.g. 127.0.0.1/32 for a local server)")
    proxy: str | None = Field(None, description=(
        "http://HOST:PORT of a forward proxy every fetch goes through (HTTPS by CONNECT); null: direct. "
        "Proxy environment variables are never used for fetches. Targets are still checked against the "
        "address guard; the proxy's own address needs no allow_networks entry"))
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per download task")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v is not None:
            proxy_address(v)   # ValueError says what is wrong
        return v

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as exc:
                raise ValueError(f"{n!r} is not a CIDR: {exc}") from None
        return v

    def decode_reserve(self) -> int:
        """Bytes set aside in memory_mb for the one image being decoded."""
        return self.max_bytes + DECODE_BYTES_PER_PIXEL * self.max_pixels

    def body_buffer(self) -> int:
        """Bytes of response bodies a task holds in memory; the rest spill to its scratch disk."""
        return self.memory_mb * 2**20 - self.decode_reserve()

    @model_validator(mode="after")
    def _memory_covers_decode(self) -> DownloadConfig:
        need = -(-self.decode_reserve() // 2**20) + MIN_BODY_BUFFER_MB
        if self.memory_mb < need:
            raise ValueError(
                f"memory_mb {self.memory_mb} is too small for max_pixels {self.max_pixels} and max_bytes "
                f"{self.max_bytes}: decoding one image may take {self.decode_reserve() // 2**20} MB, and "
                f"{MIN_BODY_BUFFER_MB} MB more hold response bodies; raise memory_mb to {need} or lower max_pixels")
        return self


class ScoreConfig(_Section):
    batch_size: int = Field(64, ge=1, description="rows per CPU scoring batch")
    decode_size: int = Field(256, ge=32, description=(
        "JPEG draft target: decode no larger than this (or models.image_size, if larger); the metrics "
        "read a 256 px gray thumbnail, so more only costs time"))
    num_cpus: float = Field(1.0, gt=0, description="CPUs per CPU scoring task")
    object_store_mb_per_cpu: int | None = Field(256, ge=16, description=(
        "object-store budget of the score stream with models (blocks between the CPU stage, the actors and the "
        "part writers) per cluster CPU; null: Ray Data's default, half the object store. Shared-memory pages "
        "a run has touched stay resident and count in its workers' memory, so this bounds them "
        "(bench/README.md, scaling)"))


# Any numeric threshold of filters.* may be a rank instead of a value: pNN of the rows that reach its rule,
# over the whole run, optionally per value of a column (manifests/ranks.py; decide resolves it).
Rank = Annotated[str, StringConstraints(pattern=RANK_PATTERN)]


class FiltersConfig(_Section):
    min_side: Annotated[int, Field(ge=0)] | Rank = Field(
        200, description="drop when the original's shorter side is smaller (too_small)")
    max_aspect_ratio: Annotated[float, Field(ge=1.0)] | Rank = Field(
        3.0, description="drop when max/min side exceeds this (bad_aspect)")
    min_entropy: Annotated[float, Field(ge=0.0, le=8.0)] | Rank = Field(
        1.0, description="gray-level entropy floor, bits: blank and two-tone images (low_texture)")
    min_edge_density: Annotated[float, Field(ge=0.0, le=1.0)] | Rank = Field(
        0.0, description="edge density floor (low_texture)")
    nsfw_max: Annotated[float, Field(ge=0.0, le=1.0)] | Rank = Field(
        0.5, description="drop at or above this NSFW probability")
    watermark_max: Annotated[float, Field(ge=0.0, le=1.0)] | Rank = Field(
        0.8, description="drop at or above this watermark probability")
    text_area_max: Annotated[float, Field(ge=0.0, le=1.0)] | Rank = Field(0.2, description=(
        "drop when detected text covers more than this share of the image (text_heavy; needs the ocr scorer); "
        "measured: photos 0, stock-photo watermarks up to 0.15, screenshots and posters 0.34 and up"))
    image_blocklist: str | None = Field(None, description=(
        "file (any URI) of sha256 values and 16-hex-digit pHashes of known-bad images (filters/blocklists.py): "
        "a match drops the row as image_blocked after download; null disables"))
    image_blocklist_distance: int = Field(4, ge=0, le=16, description=(
        "a pHash on filters.image_blocklist matches any of an image's view hashes (whole, mirror, crops) "
        "within this many bits"))
    clip_min: float | Rank | None = Field(
        None, description="drop below this image-caption cosine; null disables")
    aesthetic_min: float | Rank | None = Field(
        None, description="drop below this aesthetic score; null disables")


class DedupeConfig(_Section):
    exact: bool = Field(True, description="group exact duplicates (same sha256 of the served bytes)")
    phash_max_distance: int | None = Field(
        6, ge=0, le=8, description=(
            "group images when the whole or mirror hash of one is within this many bits of any view hash of "
            "the other (filters/multihash.py; measured in bench/README.md); null disables"))
    semantic_threshold: float | None = Field(
        None, gt=0.0, le=1.0,
        description="group images whose embeddings have cosine >= this (needs models.keep_embeddings); null disables")
    semantic_cluster_size: int = Field(10_000, ge=2, description=(
        "rows per k-means cluster for semantic dedup (coarse clusters are cut down to at most twice this, "
        "and each cluster's images are compared pair by pair)"))
    captions_per_image: int = Field(
        1, ge=1, description="rows kept per duplicate group, each with a different caption (1: one row per image)")
    partitions: int = Field(16, ge=1, description="Ray partitions the pair search is split into")
    keep_order: list[str] = Field(
        default_factory=lambda: ["aesthetic", "clip_score", "pixels"],
        description="which member of a duplicate group is kept: best first by these, ties by key")


class StyleTarget(_Section):
    max_share: float | None = Field(None, ge=0.0, le=1.0, description="cap on the style's share of labelled rows")
    min_share: float | None = Field(None, ge=0.0, le=1.0,
                                    description="floor on the style's share, met by down-sampling the others")

    @model_validator(mode="after")
    def _ordered(self) -> StyleTarget:
        if None not in (self.min_share, self.max_share) and self.min_share > self.max_share:
            raise ValueError("min_share is larger than max_share")
        return self


class RebalanceConfig(_Section):
    styles: dict[str, StyleTarget] = Field(
        default_factory=dict, description="share targets per style label among labelled survivors; empty disables")
    style_source: Literal["clip", "column", "graphic"] = Field(
        "clip", description=(
            "where style labels come from: clip (the style scorer's zero-shot label, needs the CLIP tower), "
            "column (an input column through style_map), graphic (photo / graphic from the CPU graphic score)"))
    style_column: str | None = Field(None, description="input column read when style_source is column "
                                                       "(list it in input.extra_cols)")
    style_map: dict[str, str] = Field(default_factory=dict, description=(
        "input value -> style label when style_source is column; values not listed stay unlabelled"))
    graphic_threshold: float = Field(0.35, ge=0.0, le=1.0, description=(
        "graphic score at or above which a row is labelled graphic, else photo (style_source: graphic; "
        "accuracy in bench/README.md)"))

    @model_validator(mode="after")
    def _reachable(self) -> RebalanceConfig:
        if sum(t.min_share or 0.0 for t in self.styles.values()) > 1.0:
            raise ValueError("the min_share values add up to more than 1")
        if self.style_source == "column" and not self.style_column:
            raise ValueError("style_source column needs style_column")
        return self


PREFIX = r"[A-Za-z0-9_.-]+"   # write.prefix: what an output shard's name may start with


class WriteConfig(_Section):
    samples_per_shard: int = Field(1000, ge=1, description="samples per WebDataset shard; only the last is short")
    prefix: str = Field("train", pattern=rf"^{PREFIX}$", description="shard file name prefix")
    ocr_caption: str | None = Field(None, description=(
        "template of the .txt caption where OCR read text, e.g. '{caption} 图中文字：{ocr_text}'; null keeps "
        "the caption as it is (ocr_text is in the sample's JSON either way)"))
    buckets: list[tuple[int, int]] | None = Field(default_factory=lambda: list(SDXL_BUCKETS), description=(
        "training resolutions [width, height] for aspect-ratio buckets: each kept sample gets the one nearest its "
        "stored image's aspect ratio (`bucket`, e.g. \"1152x896\"); the default is the nine ~1 MP SDXL sizes; "
        "null turns bucketing off"))
    group_by_bucket: bool = Field(False, description=(
        "each shard holds one bucket only, named {prefix}-{w}x{h}-{n:06d}.tar and numbered per bucket"))
    caption: Literal["original", "recaption", "mix"] = Field("original", description=(
        "what each sample's .txt holds: original (the normalised caption, with write.ocr_caption), recaption "
        "(the recaption phase's caption where it has one, else the original), or mix (the recaption for a "
        "write.recaption_share of the rows, chosen by a stable hash of the key, so a re-run gives the same mix); "
        "recaption and mix need recaption.enabled"))
    recaption_share: float = Field(0.5, ge=0.0, le=1.0, description=(
        "write.caption mix: the share of rows whose .txt is the recaption (rows without one keep the original)"))

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one [width, height], or null to turn bucketing off")
        for w, h in v:
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise ValueError(f"[{w}, {h}]: width and height must be positive multiples of 8")
        ratios = [w / h for w, h in v]
        for i, r in enumerate(ratios):
            j = next((j for j in range(i) if abs(ratios[j] - r) < 1e-9), None)
            if j is not None:
                raise ValueError(f"{list(v[j])} and {list(v[i])} have the same aspect ratio: the second could never "
                                 f"be chosen")
        return v

    @model_validator(mode="after")
    def _grouping_needs_buckets(self) -> WriteConfig:
        if self.group_by_bucket and self.buckets is None:
            raise ValueError("group_by_bucket: true needs write.buckets (it is null)")
        return self

    @field_validator("ocr_caption")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.format(caption="", ocr_text="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template may use only {{caption}} and {{ocr_text}}: {exc!r}") from None
        return v


class RayConfig(_Section):
    address: str | None = Field(None, description="cluster to attach to; null uses RAY_ADDRESS or starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray; null uses all")


class Config(_Section):
    run_dir: str = Field(description="run directory (local path or s3://bucket/prefix): "
                                     "every phase reads and writes under it")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    input: InputConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    text: TextOptions = Field(default_factory=TextOptions)
    models: ModelOptions = Field(default_factory=ModelOptions)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)
    recaption: RecaptionOptions = Field(default_factory=RecaptionOptions)
    write: WriteConfig = Field(default_factory=WriteConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _style_column_carried(self) -> Config:
        column = self.rebalance.style_column
        if self.rebalance.style_source == "column" and column not in self.input.extra_cols:
            raise ValueError(f"rebalance.style_column {column!r} must be listed in input.extra_cols")
        return self

    @model_validator(mode="after")
    def _recaption_for_captions(self) -> Config:
        if self.write.caption != "original" and not self.recaption.enabled:
            raise ValueError(f"write.caption {self.write.caption!r} needs recaption.enabled: true")
        return self


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {err['msg'].lower()} (got {given!r})"


def validate(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config, turning pydantic's errors into one readable ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in _ranks_merged(exc.errors()))
        raise ConfigError(f"{source} is not valid:\n{lines}") from None


def _ranks_merged(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A threshold that is a number or a rank fails both branches: one line, the number's message, a rank's form."""
    out, seen = [], set()
    for err in errors:
        loc = err["loc"]
        if len(loc) == 3 and loc[0] == "filters" and isinstance(loc[2], str) and loc[2].startswith(
                ("constrained-", "float", "int", "str")):
            if loc[:2] in seen:
                continue
            seen.add(loc[:2])
            numeric = next((e for e in errors if e["loc"][:2] == loc[:2] and "str" not in str(e["loc"][2])), err)
            err = {**numeric, "loc": loc[:2], "msg": f"{numeric['msg']}, or a rank such as p30 or p30 by a column"}
        out.append(err)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML scalars (5.5, true, null, [a, b])."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config (a local path or a URI such as s3://bucket/run/config.yaml) with the safe
    loader, apply --set overrides, take redacted secrets from the environment, validate."""
    path = str(path)
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = apply_overrides(data, list(overrides))
    if isinstance(data, dict) and isinstance(data.get("storage"), dict):
        data["storage"] = {**data["storage"], "options": fill_secrets(data["storage"].get("options") or {}, path)}
    return resolve(validate(data, path))


def read_text(path: str) -> str:
    """A config file's text; a URI is read through the storage module (credentials from the environment)."""
    try:
        if is_local(path):
            return Path(path).read_text(encoding="utf-8")
        return Storage().read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}") from None


def resolve(cfg: Config) -> Config:
    """Make run_dir and input paths absolute URIs, once, on the driver: inside a Ray job the
    working directory is not the user's, and a saved config must re-run from anywhere."""
    refuse_relative_in_job(cfg.run_dir, "run_dir")
    for p in cfg.input.paths:
        refuse_relative_in_job(p, "input.paths")
    cfg.run_dir = absolute(cfg.run_dir)
    cfg.input.paths = [absolute(p) for p in cfg.input.paths]
    for section, key in ((cfg.input, "url_blocklist"), (cfg.filters, "image_blocklist")):
        if getattr(section, key) is not None:
            setattr(section, key, absolute(getattr(section, key)))
    return cfg


def job_working_dir(cwd: Path | None = None) -> Path | None:
    """The copy of a `ray job submit --working-dir` upload that this process runs in, if it does:
    Ray unpacks it under its session folder, `.../runtime_resources/working_dir_files/_ray_pkg_<hash>`."""
    cwd = cwd or Path.cwd()
    for folder in (cwd, *cwd.parents):
        if folder.parent.name == "working_dir_files" and folder.parent.parent.name == "runtime_resources":
            return folder
    return None


def refuse_relative_in_job(uri: str, key: str) -> None:
    """A relative local path inside a Ray job would resolve into Ray's package cache on the head node
    (the job "succeeds" and its run sits in a temporary folder): refuse it, saying what to give instead."""
    if not is_local(uri) or Path(uri.removeprefix("file://")).expanduser().is_absolute():
        return
    folder = job_working_dir()
    if folder is not None:
        raise ConfigError(f"{key} {uri!r} is a relative path, and this runs inside a Ray job's copy of its "
                          f"--working-dir ({folder}): it would land in Ray's package cache on the head node, not in "
                          f"your folder. Give object storage (s3://BUCKET/runs/NAME), or an absolute path on a "
                          f"filesystem every node mounts (with storage.shared_mount: true)")


# -- secrets in storage.options -------------------------------------------------------------------

REDACTED = "<redacted>"
SECRET_ENV = "CURATE_STORAGE_"   # CURATE_STORAGE_<KEY> gives storage.options.<key> where config.yaml has REDACTED
SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|signature|sas", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^/@\s]+@")


def _secret_env(path: list[str]) -> str:
    return SECRET_ENV + "_".join(re.sub(r"\W", "_", p).upper() for p in path)


def redact_options(options: Any) -> Any:
    """storage.options with every secret-named value (at any depth) and every password in a URL replaced."""
    if isinstance(options, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) and v is not None and not isinstance(v, bool)
                else redact_options(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    if isinstance(options, str):
        return URL_PASSWORD.sub(rf"\1{REDACTED}@", options)
    return options


def redact(data: dict) -> dict:
    """A dumped config (a dict) safe to write or show: storage.options and storage.endpoint_url redacted."""
    storage = data.get("storage")
    if not isinstance(storage, dict):
        return data
    storage = {**storage, "options": redact_options(storage.get("options") or {})}
    if isinstance(storage.get("endpoint_url"), str):
        storage["endpoint_url"] = redact_options(storage["endpoint_url"])
    return {**data, "storage": storage}


def fill_secrets(options: Any, source: str, path: tuple[str, ...] = ()) -> Any:
    """Each REDACTED value of storage.options from its environment variable, or a ConfigError naming both."""
    if isinstance(options, dict):
        return {k: fill_secrets(v, source, (*path, str(k))) for k, v in options.items()}
    if options != REDACTED:
        return options
    env = _secret_env(list(path))
    if env not in os.environ:
        raise ConfigError(f"{source}: storage.options.{'.'.join(path)} is {REDACTED} (a run's config.yaml never holds "
                          f"secrets): set the environment variable {env}, or give it with --set "
                          f"storage.options.{'.'.join(path)}=...")
    return os.environ[env]


def dump(cfg: Config) -> str:
    """The resolved config as YAML, every default spelled out, secrets redacted."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False, allow_unicode=True)

