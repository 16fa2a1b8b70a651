"""Near-duplicate search at scale: random view hashes with planted near copies, on a 2-CPU Ray.

Each row has len(VIEWS) random hashes; a planted copy carries its original's hashes with 1 to
MAX_DISTANCE bits flipped in every view. The real search (curate/dedupe.py route, then one
partition_edges Ray task per partition) runs over all of them. Prints JSON: seconds, peak
memory (driver and Ray workers, PSS) and whether every planted pair ended in one group.
Quick mode: 1M rows; --full: 10M.

    .venv/bin/python -m bench.bench_decide [--full]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.common import PeakMemory, machine, versions

PLANTED_SHARE = 0.01   # one row in a hundred is a near copy of another row
MAX_DISTANCE = 6
PARTITIONS = 16


def planted_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, views) hashes: random rows plus near copies (1..MAX_DISTANCE bits flipped in each view);
    the (copy, original) rows."""
    from filters.multihash import VIEWS

    rng = np.random.default_rng(seed)
    copies = int(n * PLANTED_SHARE)
    hashes = rng.integers(0, 2**64, (n, len(VIEWS)), dtype=np.uint64, endpoint=False)
    original = rng.choice(n - copies, copies, replace=False)
    flips = np.zeros(copies, np.uint64)
    distance = rng.integers(1, MAX_DISTANCE + 1, copies)
    for d in range(1, MAX_DISTANCE + 1):
        rows = np.flatnonzero(distance == d)
        bits = np.argsort(rng.random((rows.size, 64)), axis=1)[:, :d].astype(np.uint64)
        flips[rows] = np.bitwise_or.reduce(np.uint64(1) << bits, axis=1)
    copy_rows = np.arange(n - copies, n)
    hashes[copy_rows] = hashes[original] ^ flips[:, None]
    order = rng.permutation(n)                    # spread the copies among the rows
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    return hashes[order], np.stack([position[copy_rows], position[original]])


def near_edges(hashes: np.ndarray, distance: int, partitions: int) -> np.ndarray:
    """Every partition's forest from the real route and partition_edges, one Ray task per partition."""
    import ray

    from curate.dedupe import partition_edges, route

    n = len(hashes)
    node = {"row": np.arange(n, dtype=np.int64), "pref": np.zeros((n, 1)), "caption": np.zeros(n, np.uint64),
            "sha": np.zeros(n, np.uint64), "phash": hashes, "phash_valid": np.ones(n, bool)}
    task = ray.remote(num_cpus=1)(partition_edges)
    parts = [ray.put(p) for p in route([node], False, distance, 1, partitions)]
    del node
    return np.concatenate([r[0]["edges"] for r in ray.get([task.remote(distance, None, p) for p in parts])], axis=1)


def main(full: bool, n: int | None = None) -> dict:
    """Run the benchmark once; the JSON dict it prints."""
    import ray

    from filters.phash import roots

    n = n or (10_000_000 if full else 1_000_000)
    hashes, planted = planted_hashes(n)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ours = not ray.is_initialized()      # bench/run.py may have started Ray already
    if ours:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    try:
        with PeakMemory() as memory:
            started = time.perf_counter()
            edges = near_edges(hashes, MAX_DISTANCE, PARTITIONS)
            root = np.arange(n)
            nodes, best = roots(edges)
            root[nodes] = best
            seconds = time.perf_counter() - started
    finally:
        if ours:
            ray.shutdown()
    found = int((root[planted[0]] == root[planted[1]]).sum())
    return {
        "benchmark": "decide_near_dedup",
        "rows": n, "planted_pairs": planted.shape[1], "planted_found": found,
        "max_distance": MAX_DISTANCE, "views": hashes.shape[1], "partitions": PARTITIONS, "ray_cpus": cpus,
        "grouped_rows": int((root != np.arange(n)).sum()),
        "seconds": round(seconds, 2), "peak_memory_mb": memory.result(),
        "ratios": {"planted_recall": round(found / planted.shape[1], 6),
                   "rows_per_second": round(n / seconds, 1)},
        "machine": machine(), "versions": versions(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10M hashes instead of 1M")
    print(json.dumps(main(parser.parse_args().full), indent=2))
