"""The run directory: where each phase's files live, which shards are done, and who runs it.

Every phase writes one object per input shard under its final name, then a small marker,
`_done/{phase}/{shard}.json`, holding that shard's counts. The marker is written last, so
"the marker exists" means "the shard is done" on every filesystem, object stores included;
a killed attempt leaves at most data objects without a marker, which the next attempt
overwrites. The driver lists each marker folder once per phase and never lists data folders.

A lease object (`_lease.json`: owner and expiry, renewed while the run lives) keeps two runs
from working on one run directory at once.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.storage import Storage, absolute, join

PHASES = ("download", "score", "decide", "write")
LEASE_SECONDS = 120.0   # a lease not renewed for this long belongs to a dead run
MARKER_READERS = 32     # parallel small reads when gathering per-shard markers


def shard_index(shard: str) -> int:
    return int(shard)


def row_keys(row_ids: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """Keys `{shard:05d}_{row:06d}` of integer row ids (shard << 32 | row), built on Arrow buffers."""
    ids = pa.array(row_ids.astype(np.int64), mask=None if valid is None else ~valid)
    shard = pc.utf8_lpad(pc.cast(pc.shift_right(ids, 32), pa.string()), 5, "0")
    row = pc.utf8_lpad(pc.cast(pc.bit_wise_and(ids, 0xFFFFFFFF), pa.string()), 6, "0")
    return pc.binary_join_element_wise(shard, row, "_")


@dataclass(frozen=True)
class RunDir:
    root: str
    storage: Storage = field(default_factory=Storage, compare=False)

    def __post_init__(self) -> None:   # a Path or a relative path becomes an absolute URI, once
        object.__setattr__(self, "root", absolute(str(self.root)))

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    # -- per-shard data --------------------------------------------------------------------
    def input_shard(self, shard: str) -> str:
        return self.uri("input_shards", f"{shard}.parquet")

    def raw_tar(self, shard: str) -> str:
        return self.uri("raw", f"{shard}.tar")

    def raw_table(self, shard: str) -> str:
        return self.uri("raw", f"{shard}.parquet")

    def scores(self, shard: str) -> str:
        return self.uri("scores", f"{shard}.parquet")

    def score_parts(self, shard: str) -> str:
        return self.uri("scores", "_parts", shard)

    def embeddings(self, shard: str) -> str:
        return self.uri("embeddings", f"{shard}.npy")

    def decisions(self, shard: str) -> str:
        return self.uri("decisions", f"{shard}.parquet")

    def manifest(self, shard: str) -> str:
        return self.uri("manifest", f"{shard}.parquet")

    def out_shard(self, name: str) -> str:
        return self.uri("shards", name)

    # -- run-wide files --------------------------------------------------------------------
    @property
    def plan(self) -> str:
        return self.uri("input_shards", "_plan.json")

    @property
    def config(self) -> str:
        return self.uri("config.yaml")

    @property
    def stats(self) -> str:
        return self.uri("stats.json")

    @property
    def decided(self) -> str:
        """Written last by decide: its fingerprint, attempt id and funnel; write requires it."""
        return self.uri("decisions", "_decided.json")

    def file(self, name: str) -> str:
        return self.uri(name)

    def shard_names(self) -> list[str]:
        """Input shard names from the plan written by the download phase."""
        if not self.storage.exists(self.plan):
            raise FileNotFoundError(f"{self.plan} is missing: run `curate download` first")
        return self.storage.read_json(self.plan)["shards"]

    # -- markers ---------------------------------------------------------------------------
    def marker(self, phase: str, shard: str) -> str:
        return self.uri("_done", phase, f"{shard}.json")

    def mark(self, phase: str, shard: str, info: dict[str, Any]) -> None:
        self.storage.write_json(self.marker(phase, shard), info)

    def unmark(self, phase: str, shard: str) -> None:
        self.storage.delete(self.marker(phase, shard))

    def done(self, phase: str) -> set[str]:
        """Shards whose `phase` marker exists: one listing, however many shards."""
        return {n[:-len(".json")] for n in self.storage.list(self.uri("_done", phase)) if n.endswith(".json")}

    def markers(self, phase: str, shards: list[str]) -> list[dict]:
        """The markers of the given shards (all must exist), read in parallel, in order."""
        with ThreadPoolExecutor(MARKER_READERS) as pool:
            return list(pool.map(lambda s: self.storage.read_json(self.marker(phase, s)), shards))


class RunBusy(RuntimeError):
    """Another live run holds the run directory."""


class Lease:
    """An expiring claim on a run directory, renewed by a daemon thread while the run lives.

    Object stores have no atomic create-if-absent here, so the claim is write-then-read-back:
    two runs starting within the same second could both see their own write; anything later
    sees the live owner and stops. A crashed run's lease simply expires.
    """

    def __init__(self, run: RunDir, seconds: float = LEASE_SECONDS):
        self.run, self.seconds = run, seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.uri = run.uri("_lease.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.run.storage.write_json(self.uri, {"owner": self.owner, "expires": time.time() + self.seconds})

    def acquire(self) -> Lease:
        storage = self.run.storage
        if storage.exists(self.uri):
            held = storage.read_json(self.uri)
            if held["owner"] != self.owner and held["expires"] > time.time():
                raise RunBusy(f"{self.run.root} is in use by another run ({held['owner']}, lease valid for "
                              f"{held['expires'] - time.time():.0f} s more); wait for it to finish, or delete "
                              f"{self.uri} if that run is known to be dead")
        self._write()
        if storage.read_json(self.uri)["owner"] != self.owner:
            raise RunBusy(f"{self.run.root}: another run took the lease at the same moment")
        self._thread = threading.Thread(target=self._renew, daemon=True, name="curate-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self._write()
            except Exception:  # a storage hiccup: the next beat retries, the lease outlives several
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.run.storage.delete(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
