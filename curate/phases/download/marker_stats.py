"""stats.json's `download` section, summed from the download markers by Ray tasks.

Each download marker holds a shard's error kinds, wait and a table of its top hosts (51
entries). At 100k shards, parsing every marker on the driver would hold about 5 GB of Python
dicts there, so tasks each read a chunk of markers and return one marker-shaped summary of it
(error kinds summed, host tables merged and cut to PARTIAL_TOP_HOSTS hosts plus the rest, as
each shard already cuts its own), and the driver merges those few summaries the same way.
"""
from __future__ import annotations

from curate.phases.download.hosts import STATS_TOP_HOSTS, TOP_HOSTS, download_stats
from curate.run.rundir import RunDir
from curate.run.runtime import windowed

CHUNK = 1_000              # markers one task reads
PARTIAL_TOP_HOSTS = TOP_HOSTS * 4   # hosts a chunk's summary names; the rest are summed under the other hosts
TOTALS = ("rows", "not_requested", "tar_bytes")   # marker counts summed over the run (screen.spared reads them)


def chunk_summary(run: RunDir, shards: list[str]) -> dict:
    """One chunk's download markers as one marker: error kinds and hosts merged, waits, rows, rows not
    requested and raw-tar bytes summed."""
    markers = run.markers("download", shards)
    merged = download_stats(markers, top=PARTIAL_TOP_HOSTS)
    waits = [m.get("wait_s", 0.0) for m in markers]
    return {"error_kinds": merged["error_kinds"], "hosts": merged["top_hosts"],
            "wait_total": sum(waits), "wait_max": max(waits, default=0.0),
            **{k: sum(m.get(k, 0) for m in markers) for k in TOTALS}}


def download_summary(run: RunDir, shards: list[str], top: int = STATS_TOP_HOSTS) -> dict:
    """download_stats over every marker of `shards`, summed chunk by chunk in Ray tasks."""
    import ray

    task = ray.remote(num_cpus=1)(chunk_summary)
    parts = dict(windowed(range(0, len(shards), CHUNK), lambda i: task.remote(run, shards[i:i + CHUNK])))
    failed = [p for p in parts.values() if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"summing the download markers failed: {failed[0]}")
    ordered = [parts[i] for i in sorted(parts)]
    for part in ordered:   # success rates and kinds are recomputed from the merged counts
        for stats in part["hosts"].values():
            stats.pop("success_rate", None)
    stats = download_stats(ordered, top=top)
    stats["wait_s"] = {"total": round(sum(p["wait_total"] for p in ordered), 3),
                       "max_shard": round(max((p["wait_max"] for p in ordered), default=0.0), 3)}
    stats.update({k: sum(p[k] for p in ordered) for k in TOTALS})
    return stats
