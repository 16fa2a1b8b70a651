"""Read user URL manifests (parquet, csv, tsv, jsonl) and cut them into input shards.

Shards are the unit of work and of resume for every later phase. Each row gets a stable
key, `{shard}_{row:06d}`, that survives every phase and names the sample in the shards.

With `input.shuffle` (the default) the rows are cut in the order of a stable 64-bit hash of
their URL, not in input order: a URL list sorted by host would otherwise hand one host's
million URLs to a few consecutive tasks, all hitting it at once and for hours, while a
hash order gives every shard its share of every host. The shuffle is an external one in
bounded memory: rows are routed to hash-range buckets of about SHUFFLE_BUCKET_ROWS rows,
spilled as runs (one parquet row group per bucket) under input_shards/_shuffle/ whenever
SPILL_ROWS are buffered, then each bucket in turn is read back, sorted by (hash, input
position) and cut. Equal input gives equal shards on every run.
"""
from __future__ import annotations

import codecs
import hashlib
from collections.abc import Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from curate.config import ConfigError, InputConfig
from curate.phases.decide.rebalance import key_hashes
from curate.run.rundir import RunDir, row_keys
from curate.run.storage import Storage
from filters.blocklists import UrlBlocklist
from manifests.schema import ALL
from manifests.where import columns as where_columns
from manifests.where import compile_where

MAX_SHARD_ROWS = 1_000_000  # keys carry the row index in six digits
SHUFFLE_BUCKET_ROWS = 1_000_000   # rows of one hash bucket, sorted in memory when it is cut
SPILL_ROWS = 1_000_000            # rows buffered before a run is spilled
HASH, POSITION = "_url_hash", "_position"   # the shuffle's own columns, dropped before shards are cut
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def expand(paths: list[str], storage: Storage) -> list[str]:
    """Files named by the config (local or URLs), globs in the file name expanded and sorted."""
    files: list[str] = []
    for pattern in paths:
        matches = storage.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"input.paths: no file matches {pattern!r}")
        for m in matches:
            if not storage.exists(m):
                raise ConfigError(f"input.paths: input file not found: {m}")
            files.append(m)
    return files


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return _FORMATS["." + path.rsplit(".", 1)[-1].lower()]
    except KeyError:
        raise ConfigError(f"{path}: cannot tell the format from the extension; set input.format") from None


def _first_bad_line(path: str, encoding: str, storage: Storage) -> int | None:
    """The first line (1-based) of a text file that is not valid `encoding`, None when every line is."""
    decoder = codecs.getincrementaldecoder(encoding)()
    number, rest = 1, b""
    with storage.open_input(path) as f:
        while chunk := f.read(1 << 20):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                try:
                    decoder.decode(line + b"\n")
                except UnicodeDecodeError:
                    return number
                number += 1
    try:
        decoder.decode(rest, final=True)
    except UnicodeDecodeError:
        return number
    return None


def _text_batches(path: str, fmt: str, columns: list[str], encoding: str, storage: Storage,
                  typed: Collection[str] = ()) -> Iterator[pa.RecordBatch]:
    """_batches, with a text that is not valid `encoding` named by file, line and the setting to change."""
    try:
        yield from _batches(path, fmt, columns, encoding, storage, typed)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        if fmt == "parquet" or (isinstance(exc, pa.ArrowInvalid) and not any(
                w in str(exc) for w in ("UTF8", "UTF-8", "utf8", "encoding"))):
            raise
        line = _first_bad_line(path, encoding, storage)
        if line is None:
            raise
        raise ConfigError(f"{path}: line {line} is not valid {encoding} text; set input.encoding to the file's "
                          f"encoding (gb18030 reads GBK, GB2312 and GB18030 exports; big5 for traditional "
                          f"Chinese)") from None


def _csv(path: str, fmt: str, columns: list[str], encoding: str, storage: Storage, typed: Collection[str] = (),
         block_size: int = 16 << 20) -> pacsv.CSVStreamingReader:
    """A csv/tsv reader with the wanted columns as text, but those in `typed` (input.where's) as inferred."""
    return pacsv.open_csv(
        storage.open_input(path),
        read_options=pacsv.ReadOptions(block_size=block_size, encoding=encoding),
        parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in columns if c not in typed}, strings_can_be_null=True),
    )


def _batches(path: str, fmt: str, columns: list[str], encoding: str, storage: Storage,
             typed: Collection[str] = ()) -> Iterator[pa.RecordBatch]:
    """Stream a file's batches with every wanted column read as text where the format allows (but `typed`)."""
    if fmt == "parquet":
        pf = storage.parquet(path)
        _check_columns(path, pf.schema_arrow.names, columns)
        yield from pf.iter_batches(columns=columns, batch_size=65_536)
        return
    if fmt in ("csv", "tsv"):
        reader = _csv(path, fmt, columns, encoding, storage, typed)
        _check_columns(path, reader.schema.names, columns)
        for batch in reader:
            yield batch.select(columns)
        return
    stream = storage.open_input(path)
    if encoding != "utf-8":
        stream = pa.transcoding_input_stream(stream, encoding, "utf-8")
    table = pajson.read_json(stream)
    table.validate(full=True)   # the JSON reader does not check UTF-8 itself
    _check_columns(path, table.column_names, columns)
    yield from table.select(columns).to_batches(max_chunksize=65_536)


def _check_columns(path: str, have: list[str], want: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}; it has {have}")


def _as_strings(batch: pa.RecordBatch, cfg: InputConfig) -> dict[str, pa.Array]:
    def text(name: str) -> pa.Array:
        col = batch.column(name)
        return col if pa.types.is_string(col.type) else col.cast(pa.string())

    cols = {"url": text(cfg.url_col), "caption": text(cfg.caption_col)}
    for extra in cfg.extra_cols:
        cols[extra] = batch.column(extra)
    return cols


def _carried(cfg: InputConfig) -> list[str]:
    return [cfg.url_col, cfg.caption_col, *cfg.extra_cols]


def _where_only(cfg: InputConfig) -> list[str]:
    """Columns input.where reads that are not carried: read for it alone, with their own types."""
    return [c for c in where_columns(cfg.where) if c not in _carried(cfg)] if cfg.where else []


def _tables(files: list[str], cfg: InputConfig, storage: Storage) -> Iterator[pa.Table]:
    """The input's rows in input order, as tables of url, caption, the extra columns and `where_excluded`."""
    wanted = list(dict.fromkeys([*_carried(cfg), *_where_only(cfg)]))
    for path in files:
        for batch in _text_batches(path, _format(path, cfg.format), wanted, cfg.encoding, storage, _where_only(cfg)):
            table = pa.table(_as_strings(batch, cfg))
            yield table.append_column("where_excluded", pa.array(_excluded(batch, cfg, path)))


def _excluded(batch: pa.RecordBatch, cfg: InputConfig, path: str) -> np.ndarray:
    """Rows for which input.where is not true (false or null): the rule input_where drops them."""
    if not cfg.where:
        return np.zeros(batch.num_rows, bool)
    table = pa.Table.from_batches([batch]).append_column("_row", pa.array(np.arange(batch.num_rows)))
    try:
        kept = table.filter(compile_where(cfg.where, table.column_names)).column("_row").to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ConfigError(f"input.where {cfg.where!r} cannot be applied to {path}: {exc}") from None
    out = np.ones(batch.num_rows, bool)
    out[kept] = False
    return out


def _schema(path: str, fmt: str, cfg: InputConfig, storage: Storage) -> pa.Schema:
    """The columns of an input file as the cut reads them (csv: the first block's inferred types)."""
    if fmt == "parquet":
        return storage.parquet(path).schema_arrow
    if fmt in ("csv", "tsv"):
        return _csv(path, fmt, _carried(cfg), cfg.encoding, storage, _where_only(cfg), block_size=1 << 20).schema
    stream = storage.open_input(path)
    if cfg.encoding != "utf-8":
        stream = pa.transcoding_input_stream(stream, cfg.encoding, "utf-8")
    return pajson.open_json(stream).schema


def check_input(cfg: InputConfig, storage: Storage) -> None:
    """Before Ray starts: every column the input settings name exists in every input file, and input.where
    applies to their types; the error names the setting, the column and the columns there are."""
    if cfg.url_blocklist is not None:   # its format too: a bad line is named before any work
        if not storage.exists(cfg.url_blocklist):
            raise ConfigError(f"input.url_blocklist: file not found: {cfg.url_blocklist}")
        try:
            UrlBlocklist.parse(storage.read_bytes(cfg.url_blocklist).decode("utf-8"), cfg.url_blocklist)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"input.url_blocklist: {exc}") from None
    for path in expand(cfg.paths, storage):
        schema = _schema(path, _format(path, cfg.format), cfg, storage)
        names = schema.names
        named = [("input.url_col", cfg.url_col), ("input.caption_col", cfg.caption_col),
                 *(("input.extra_cols", c) for c in cfg.extra_cols),
                 *(("input.where", c) for c in (where_columns(cfg.where) if cfg.where else []))]
        for key, column in named:
            if column not in names:
                raise ConfigError(f"{key}: {path} has no column {column!r}; its columns are: {', '.join(names)}")
        if cfg.where:
            try:
                schema.empty_table().filter(compile_where(cfg.where, names))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                types = ", ".join(f"{c}: {schema.field(c).type}" for c in where_columns(cfg.where))
                raise ConfigError(f"input.where {cfg.where!r} does not apply to {path} ({types}): "
                                  f"{str(exc).splitlines()[0]}") from None


def _count(files: list[str], cfg: InputConfig, storage: Storage) -> int:
    """Rows in the input: parquet from its footers, other formats by reading them once."""
    if all(_format(p, cfg.format) == "parquet" for p in files):
        return sum(storage.parquet(p).metadata.num_rows for p in files)
    return sum(t.num_rows for t in _tables(files, cfg, storage))


def _shuffled(files: list[str], cfg: InputConfig, run: RunDir) -> Iterator[pa.Table]:
    """The input's rows in (URL hash, input position) order, through spilled runs (module docstring)."""
    storage = run.storage
    buckets = max(1, -(-_count(files, cfg, storage) // SHUFFLE_BUCKET_ROWS))
    buffered: list[list[pa.Table]] = [[] for _ in range(buckets)]
    runs: list[tuple[str, dict[int, int]]] = []   # (uri, bucket -> row group)
    position = n_buffered = 0

    def spill() -> None:
        nonlocal n_buffered
        uri = run.uri("input_shards", "_shuffle", f"run-{len(runs):06d}.parquet")
        groups: dict[int, int] = {}
        writer = None
        with storage.open_output(uri) as sink:
            for b, parts in enumerate(buffered):
                if parts:
                    table = pa.concat_tables(parts)
                    writer = writer or pq.ParquetWriter(sink, table.schema)
                    writer.write_table(table, row_group_size=table.num_rows)
                    groups[b] = len(groups)
                    parts.clear()
            writer.close()
        runs.append((uri, groups))
        n_buffered = 0

    for table in _tables(files, cfg, storage):
        hashes = key_hashes(table.column("url").fill_null(""))
        table = table.append_column(HASH, pa.array(hashes)).append_column(
            POSITION, pa.array(np.arange(position, position + table.num_rows, dtype=np.int64)))
        position += table.num_rows
        bucket = ((hashes >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)   # hash ranges, in order
        order = np.argsort(bucket, kind="stable")
        table, bucket = table.take(pa.array(order)), bucket[order]
        edges = np.searchsorted(bucket, np.arange(buckets + 1, dtype=np.uint64))
        for b in np.flatnonzero(np.diff(edges)):
            buffered[b].append(table.slice(int(edges[b]), int(edges[b + 1] - edges[b])))
        n_buffered += table.num_rows
        if n_buffered >= SPILL_ROWS:
            spill()
    if n_buffered:
        spill()
    files_of_runs = [(storage.parquet(uri), groups) for uri, groups in runs]
    for b in range(buckets):
        parts = [pf.read_row_group(groups[b]) for pf, groups in files_of_runs if b in groups]
        if parts:
            table = pa.concat_tables(parts)
            table = table.take(pc.sort_indices(table, sort_keys=[(HASH, "ascending"), (POSITION, "ascending")]))
            yield table.drop_columns([HASH, POSITION])
    storage.delete_dir(run.uri("input_shards", "_shuffle"))


def signature(cfg: InputConfig) -> dict:
    """What an existing plan was cut from: changing any of it needs a new run directory."""
    return {"paths": list(cfg.paths), "shard_rows": cfg.shard_rows, "url_col": cfg.url_col,
            "caption_col": cfg.caption_col, "extra_cols": list(cfg.extra_cols), "shuffle": cfg.shuffle,
            "encoding": cfg.encoding, "caption_first": cfg.caption_first, "where": cfg.where,
            "url_blocklist": cfg.url_blocklist}


# What a plan recorded before a setting existed was made with.
_BEFORE = {"shuffle": False, "encoding": "utf-8", "caption_first": False}


def check_plan(cfg: InputConfig, run: RunDir) -> None:
    """Refuse a config whose input differs from the one the run's shards were cut from
    (a plan recorded before `shuffle` existed was cut in input order; one before `encoding`, from UTF-8;
    one before `caption_first`, without it)."""
    planned = run.storage.read_json(run.plan)
    recorded = {**_BEFORE, **planned.get("input", {})}
    changed = {k: (recorded.get(k), v) for k, v in signature(cfg).items() if recorded.get(k) != v}
    listed = (planned.get("before_download") or {}).get("url_blocklist")
    if cfg.url_blocklist and "url_blocklist" not in changed and listed:   # the same file, but the same list?
        digest = hashlib.sha256(run.storage.read_bytes(cfg.url_blocklist)).hexdigest()
        if digest != listed["sha256"]:
            changed["url_blocklist (contents, sha256)"] = (listed["sha256"], digest)
    if changed:
        lines = "\n".join(f"  - input.{k}: planned with {old!r}, now {new!r}" for k, (old, new) in changed.items())
        why = ("input.where is applied as the shards are cut, from input columns they do not keep, so a changed "
               "one cannot be applied to them (a looser text.* setting can: its rows are downloaded then)\n"
               if "where" in changed else "")
        raise ConfigError(f"{run.root} was planned from a different input:\n{lines}\n{why}"
                          f"start a new run (another run_dir), or restore the original input settings")


def plan(cfg: InputConfig, run: RunDir) -> list[str]:
    """Write input_shards/{shard}.parquet for every shard, then the plan (the marker); return shard names.

    Idempotent: an existing plan is the record of a finished split and is reused, provided the
    input settings are the ones it was cut from. (The pipeline runs `cut`, then the before-download
    rules of curate/phases/download/screen.py on the shards, then writes the plan.)
    """
    if run.storage.exists(run.plan):
        check_plan(cfg, run)
        return run.shard_names()
    info = cut(cfg, run)
    run.storage.write_json(run.plan, info)
    return info["shards"]


def cut(cfg: InputConfig, run: RunDir) -> dict:
    """Write input_shards/{shard}.parquet for every shard; return what the plan records (not written yet)."""
    storage = run.storage
    if cfg.shard_rows > MAX_SHARD_ROWS:
        raise ConfigError(f"input.shard_rows: at most {MAX_SHARD_ROWS}, got {cfg.shard_rows}")
    clash = [c for c in cfg.extra_cols if c in ALL]
    if clash:
        raise ConfigError(f"input.extra_cols: {clash} collide with manifest columns; rename them")
    files = expand(cfg.paths, storage)
    shards: list[str] = []
    pending: list[pa.Table] = []
    n_pending = 0

    def flush(rows: int) -> None:
        nonlocal pending, n_pending
        table = pa.concat_tables(pending).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        index = len(shards)
        name = f"{index:05d}"
        row_id = (index << 32) | np.arange(head.num_rows, dtype=np.int64)
        head = head.add_column(0, "shard", pa.array([name] * head.num_rows))
        head = head.add_column(0, "row_id", pa.array(row_id))
        storage.write_parquet(head.add_column(0, "key", row_keys(row_id)), run.input_shard(name))
        shards.append(name)
        pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows

    total = 0
    for table in _shuffled(files, cfg, run) if cfg.shuffle else _tables(files, cfg, storage):
        pending.append(table)
        n_pending += table.num_rows
        total += table.num_rows
        while n_pending >= cfg.shard_rows:
            flush(cfg.shard_rows)
    if n_pending:
        flush(n_pending)
    if not shards:
        raise ConfigError(f"input.paths: the input files hold no rows: {files}")
    return {"shards": shards, "rows": total, "sources": files, "input": signature(cfg)}
