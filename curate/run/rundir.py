"""The run directory: where each phase's files live, which shards are done, and who runs it.

Every phase writes one object per input shard under its final name, then a small marker,
`_done/{phase}/{shard}.json`, holding that shard's counts. The marker is written last, so
"the marker exists" means "the shard is done" on every filesystem, object stores included;
a killed attempt leaves at most data objects without a marker, which the next attempt
overwrites. The driver lists each marker folder once per phase and never lists data folders.

A lease object (`_lease.json`: its holder and expiry, renewed while the run lives) keeps two
runs from working on one run directory at once; a dead holder on this machine loses it at once.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.run.storage import Storage, absolute, join

PHASES = ("download", "score", "decide", "recaption", "write")
LEASE_SECONDS = 120.0   # a lease not renewed for this long belongs to a dead run
MARKER_READERS = 32     # parallel small reads when gathering per-shard markers
log = logging.getLogger("curate")


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

    def recaption(self, shard: str) -> str:
        """The recaption phase's result: every row of the shard, recaption and recaption_error (null where dropped)."""
        return self.uri("recaption", f"{shard}.parquet")

    def recaption_cache(self, shard: str) -> str:
        """A folder of cache parts (cache_key, output, error), each written once; the phase compacts them."""
        return self.uri("recaption", "_cache", shard)

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

    def invalidate(self, shard: str, phase: str) -> None:
        """Unmark `phase` and every later phase of a shard (latest first), so that the next run does
        that phase again and everything made from it."""
        for later in reversed(PHASES[PHASES.index(phase):]):
            self.unmark(later, shard)

    def done(self, phase: str) -> set[str]:
        """Shards whose `phase` marker exists: one listing, however many shards."""
        return {n[:-len(".json")] for n in self.storage.list(self.uri("_done", phase)) if n.endswith(".json")}

    def markers(self, phase: str, shards: list[str]) -> list[dict]:
        """The markers of the given shards (all must exist), read in parallel, in order."""
        with ThreadPoolExecutor(MARKER_READERS) as pool:
            return list(pool.map(lambda s: self.storage.read_json(self.marker(phase, s)), shards))


class RunBusy(RuntimeError):
    """Another live run holds the run directory."""


def boot_id() -> str | None:
    """This boot of this machine (Linux); with a pid and its start time it names one process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_started(pid: int) -> str | None:
    """A live process's start time, in clock ticks after boot (/proc/PID/stat, field 22): a pid reused by
    a later process has another. None when the process is gone or a zombie, or without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": boot_id(), "pid": pid, "started": process_started(pid)}


class Lease:
    """An expiring claim on a run directory, renewed by a daemon thread while the run lives.

    Object stores have no atomic create-if-absent here, so the claim is write-then-read-back:
    two runs starting within the same second could both see their own write; anything later
    sees the live owner and stops. The holder is recorded as host, boot, pid and the process's
    start time: a lease whose holder was a process on this machine that is gone (killed, or its
    pid now someone else's) is taken over at once; one held from another host lasts until it
    expires, since no one here can tell whether that process lives.
    """

    def __init__(self, run: RunDir, seconds: float = LEASE_SECONDS):
        self.run, self.seconds = run, seconds
        self.holder = _holder()
        self.owner = f"{self.holder['host']}:{self.holder['pid']}:{uuid.uuid4().hex[:8]}"
        self.uri = run.uri("_lease.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.run.storage.write_json(self.uri, {"owner": self.owner, **self.holder,
                                               "expires": time.time() + self.seconds})

    def holder_is_gone(self, held: dict) -> bool:
        """Whether a lease's holder was a process of this machine's current boot that no longer runs."""
        mine = self.holder
        if held.get("host") != mine["host"] or held.get("boot") != mine["boot"] or not held.get("pid"):
            return False
        if mine["boot"] is None:   # no /proc: the pid alone, and a reused pid reads as alive
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:   # alive, another user's
                pass
            return False
        return process_started(held["pid"]) != held.get("started")

    def _held(self) -> dict | None:
        """The lease as written, or None: absent, or torn by a writer that died inside its few-byte write
        (a live holder's write lands in milliseconds, so a second look tells them apart)."""
        for _ in range(3):
            try:
                return self.run.storage.read_json(self.uri)
            except FileNotFoundError:
                return None
            except ValueError:
                time.sleep(0.5)
        log.warning("lease: %s is unreadable: its writer died while writing it; taking it over", self.uri)
        return None

    def acquire(self) -> Lease:
        storage = self.run.storage
        held = self._held()
        if held is not None and held["owner"] != self.owner and held["expires"] > time.time():
            if not self.holder_is_gone(held):
                raise RunBusy(f"{self.run.root} is in use by another run ({held['owner']}, lease valid for "
                              f"{held['expires'] - time.time():.0f} s more); wait for it to finish, or delete "
                              f"{self.uri} if that run is known to be dead")
            log.warning("lease: %s was held by process %s on this host (%s), which is gone: taking it over",
                        self.run.root, held["pid"], held["host"])
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
