"""The one module that touches run files: URIs in, pyarrow filesystems underneath.

`run_dir` and every input path are URIs: a local path, `s3://bucket/key`, or any scheme
pyarrow.fs or fsspec knows. Object stores have no rename, so nothing here renames: each
object is written once under its final name (a finished upload appears all at once, and a
local file that a killed writer left half-written is simply overwritten by the next attempt).
"Done" is never inferred from a data file; it is a small marker written last (see rundir.py).

Credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...), and
AWS_ENDPOINT_URL(_S3) works without any storage key in the config. A `Storage` pickles as
its options only, so it travels to Ray workers, which open their own filesystems.
"""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

READ_BUFFER = 1 << 20   # streaming reads from an object store in 1 MiB requests


class StorageOptions(BaseModel):
    """How to reach object storage. Credentials come from the environment; a secret given in `options`
    is never written out (curate/config.py redacts it in config.yaml and the report)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (http://host:port); null uses AWS_ENDPOINT_URL or AWS")
    region: str | None = Field(None, description="S3 region; null uses AWS_REGION / AWS_DEFAULT_REGION")
    anonymous: bool = Field(False, description="read public buckets without credentials")
    options: dict[str, Any] = Field(
        default_factory=dict, description=(
            "extra keyword options for fsspec filesystems (gs://, az://, ...); secrets among them (keys named like "
            "key, secret, token, password) are written to config.yaml as <redacted> and read back from "
            "CURATE_STORAGE_<KEY>"))
    shared_mount: bool = Field(False, description=(
        "run_dir and the local input paths are on a filesystem that every node of the Ray cluster mounts at the "
        "same path (NFS, Lustre, CephFS); without it a cluster of several live nodes refuses local paths"))


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths become absolute (resolved once, on the driver); URLs are kept as they are."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().resolve()) if is_local(uri) else uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if not is_local(uri) else str(Path(uri, *parts))


def name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


class Storage:
    """Filesystem operations on URIs; each process opens (and caches) its own filesystems."""

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions()
        self._fs: dict[str, pafs.FileSystem] = {}

    def __getstate__(self) -> dict:
        return {"options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["options"])

    # -- resolving -------------------------------------------------------------------------
    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem for a URI and the path inside it."""
        if is_local(uri):
            return self._cached("file", pafs.LocalFileSystem), absolute(uri)
        parsed = urlparse(uri)
        fs = self._cached(parsed.scheme, lambda: self._open(parsed.scheme))
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")

    def _cached(self, scheme: str, make) -> pafs.FileSystem:
        if scheme not in self._fs:
            self._fs[scheme] = make()
        return self._fs[scheme]

    def _open(self, scheme: str) -> pafs.FileSystem:
        if scheme in ("s3", "s3a"):
            return self._s3()
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme, **self.options.options)))

    def _s3(self) -> pafs.S3FileSystem:
        opts = self.options
        endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"anonymous": opts.anonymous}
        region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        return pafs.S3FileSystem(**kwargs)

    # -- queries ---------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.File

    def size(self, uri: str) -> int:
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(uri)
        return info.size

    def list(self, uri: str) -> list[str]:
        """Names of the files directly under a folder URI, sorted; empty when there is none."""
        fs, path = self.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def stat_list(self, uri: str) -> list[tuple[str, int, int]]:
        """(name, size, modification time in ns) of the files directly under a folder URI, sorted."""
        fs, path = self.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted((i.base_name, i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)

    def glob(self, pattern: str) -> list[str]:
        """URIs matching a glob in the last path component (`in/part-*.parquet`), sorted."""
        import fnmatch

        folder, pat = pattern.rsplit("/", 1) if "/" in pattern else (".", pattern)
        return [join(folder, n) for n in self.list(folder) if fnmatch.fnmatchcase(n, pat)]

    # -- reading ---------------------------------------------------------------------------
    def open_input(self, uri: str) -> IO[bytes]:
        """A sequential stream (tar files are read with tarfile's stream mode `r|`)."""
        fs, path = self.resolve(uri)
        try:
            return fs.open_input_stream(path, buffer_size=READ_BUFFER)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} does not exist") from None

    def open_random(self, uri: str) -> IO[bytes]:
        fs, path = self.resolve(uri)
        return fs.open_input_file(path)

    def read_bytes(self, uri: str) -> bytes:
        with self.open_input(uri) as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def parquet(self, uri: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.open_random(uri))

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        """Read a parquet file; `columns` may name columns the file lacks (they are skipped)."""
        fs, path = self.resolve(uri)
        if columns is not None:
            have = set(self.parquet(uri).schema_arrow.names)
            columns = [c for c in dict.fromkeys(columns) if c in have]
        return pq.read_table(path, filesystem=fs, columns=columns)

    # -- writing (once, under the final name) -----------------------------------------------
    def open_output(self, uri: str) -> IO[bytes]:
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        return fs.open_output_stream(path)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_output(uri) as f:
            f.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def write_parquet(self, table: pa.Table, uri: str) -> None:
        with self.open_output(uri) as f:
            pq.write_table(table, f, compression="zstd")

    def move(self, src: str, dst: str) -> None:
        """Rename a file (on an object store: a copy, then a delete of the source)."""
        fs, src_path = self.resolve(src)
        _, dst_path = self.resolve(dst)
        fs.move(src_path, dst_path)

    def delete(self, uri: str) -> None:
        """Remove a file if it exists."""
        fs, path = self.resolve(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    def delete_dir(self, uri: str) -> None:
        """Remove a folder and everything under it, if it exists."""
        fs, path = self.resolve(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
