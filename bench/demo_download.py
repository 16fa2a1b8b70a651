"""The demo's download phase alone, timed: `python -m bench.demo_download OUT [N]`.

The same corpus, server and config as `curate demo --out OUT --n N` (jobs/demo.yaml; OUT fresh, or
from an earlier run of this script, whose port it reuses), with each
input shard downloaded by `download_shard` in this process, one after another, without Ray: the
figure is the download's own work (the phase under Ray runs the shards num_cpus at a time). Prints
the seconds, per-shard seconds, waits, host pauses and error kinds from the shards' markers.
"""
from __future__ import annotations

import io
import json
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from curate.demo.run import demo_config, image_folder, make_corpus
from curate.demo.server import serve
from curate.phases.download.phase import download_shard
from curate.phases.download.plan import plan
from curate.run.rundir import RunDir
from curate.run.storage import Storage, join


def main(out: str, n: int = 2000) -> dict:
    import img2dataset.resizer  # noqa: F401 - its import (seconds) stays outside the timing

    cfg = demo_config(out, [])
    storage = Storage(cfg.storage)
    info = make_corpus(out, n, 0, storage)
    with serve(image_folder(out, n, 0), slow_seconds=cfg.download.timeout + 5, port=info["port"]) as base:
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": [f"{base}/{name}" for name in info["names"]], "caption": info["captions"],
                                 "kind": info["kinds"]}), buf)
        storage.write_bytes(cfg.input.paths[0], buf.getvalue())
        storage.write_json(join(out, "input", "corpus.json"), {**info, "port": int(base.rsplit(":", 1)[1])})
        run = RunDir(cfg.run_dir, storage)
        shards = plan(cfg.input, run)
        started = time.time()
        results = [download_shard(cfg, s) for s in shards]
        total = time.time() - started
    markers = [storage.read_json(run.marker("download", s)) for s in shards]
    return {"download_s": round(total, 1), "shards": len(shards),
            "per_shard_s": [round(r["seconds"], 1) for r in results],
            "success": sum(r["success"] for r in results), "rows": sum(r["rows"] for r in results),
            "wait_s": [m["wait_s"] for m in markers],
            "pauses": [sum(h["pauses"] for h in m["hosts"].values()) for m in markers],
            "error_kinds": [m["error_kinds"] for m in markers], "bodies": [m["bodies"] for m in markers]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))))
