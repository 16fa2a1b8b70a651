"""Shuffles through storage: a writer task writes one object holding a slice per reader, each
reader reads its slice of every writer's object.

Why not Ray object references: a 1B-row decide has about 1,000 groups x 500 partitions, so a
shuffle has 500,000 pieces of tens of KB. Ray returns values under its 100 KiB inline limit
into the caller's own memory, so pieces gathered by the driver would sit in the driver, with
half a million references beside them. Here the driver holds one URI per writer and a few
counts per task; the pieces go from worker to storage to worker.

Object layout: an 8-byte slice count n, n + 1 little-endian uint64 offsets (relative to the end
of the header), then the slices. A slice is a dict of numpy arrays (`pack`): a JSON header of
names, dtypes and shapes, then the raw buffers. A reader fetches the header and its byte range
only (one read: the count and the offsets up to its own), so a slice costs two ranged reads,
issued in parallel across writers.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from curate.run.rundir import RunDir

READERS = 16   # ranged reads in flight per reading task


def pack(cols: dict[str, np.ndarray]) -> bytes:
    """Columns as one buffer: a length-prefixed JSON header, then each array's bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in cols.items()}
    header = json.dumps({k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}).encode()
    return b"".join([len(header).to_bytes(8, "little"), header, *(v.tobytes() for v in arrays.values())])


def unpack(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """The columns `pack` wrote (read-only views on `data`)."""
    data = memoryview(data)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + size]))
    out, at = {}, 8 + size
    for name, (dtype, shape) in header.items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        out[name] = np.frombuffer(data, dt, count, at).reshape(shape)
        at += count * dt.itemsize
    return out


class Exchange:
    """One shuffle of one decide attempt: `name` under the run's scratch folder."""

    def __init__(self, run: RunDir, attempt: str, name: str):
        self.run, self.attempt, self.name = run, attempt, name

    @staticmethod
    def folder(run: RunDir, attempt: str | None = None) -> str:
        parts = ("_scratch", "decide") + ((attempt,) if attempt else ())
        return run.uri(*parts)

    def uri(self, writer: int) -> str:
        return self.run.uri("_scratch", "decide", self.attempt, self.name, f"{writer:06d}.bin")

    def write(self, writer: int, slices: list[dict[str, np.ndarray]]) -> int:
        """Write writer's slices (one per reader, in reader order); returns the bytes written."""
        blobs = [pack(s) for s in slices]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs], dtype=np.uint64)]).astype("<u8")
        head = np.array([len(blobs)], "<u8").tobytes() + offsets.tobytes()
        with self.run.storage.open_output(self.uri(writer)) as f:
            f.write(head)
            for b in blobs:
                f.write(b)
        return len(head) + int(offsets[-1])

    def read_one(self, writer: int, reader: int) -> dict[str, np.ndarray]:
        with self.run.storage.open_random(self.uri(writer)) as f:
            head = f.read_at(8 * (reader + 3), 0)      # the count and the offsets up to this slice's end
            n = int.from_bytes(head[:8], "little")
            if not 0 <= reader < n:
                raise ValueError(f"{self.uri(writer)} holds {n} slices, not slice {reader}")
            start, end = (int(x) for x in np.frombuffer(head, "<u8", 2, 8 * (reader + 1)))
            return unpack(f.read_at(end - start, 8 + 8 * (n + 1) + start))

    def read(self, writers: int, reader: int) -> list[dict[str, np.ndarray]]:
        """Slice `reader` of every writer's object, in writer order (ranged reads in parallel)."""
        with ThreadPoolExecutor(min(READERS, max(1, writers))) as pool:
            return list(pool.map(lambda w: self.read_one(w, reader), range(writers)))
