"""What every benchmark shares: the machine it ran on, median-of-N timing, peak memory, a served folder.

Figures from a shared 2-core box are noisy, so every contender is timed side by side in one
run, warm-up excluded, and reported as the median of its repeats with every repeat kept.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ray", "img2dataset", "pillow", "numpy", "pyarrow", "torch", "open-clip-torch",
            "opencv-python-headless")


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gpu() -> str | None:
    """Name of the first CUDA device, or None: nvidia-smi answers without importing torch."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0] if out.returncode == 0 and names else None


def machine() -> dict:
    """Cores, memory, CPU model and GPU: the context without which a figure means nothing."""
    mem_kb = _first("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "gpu": gpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    """Installed versions of the libraries the figures depend on, and the commit measured."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        out["git_commit"] = None
    return out


def median_of(fn: Callable[[], float], repeats: int, warmup: int = 1) -> dict:
    """Call `fn` (which returns the seconds it measured) warmup + repeats times; median of the repeats."""
    for _ in range(warmup):
        fn()
    return summary([fn() for _ in range(repeats)])


def side_by_side(contenders: dict[str, Callable[[], float]], repeats: int,
                 warm: Collection[str] | None = None) -> dict[str, dict]:
    """Warm up the named contenders (default: all), then they take turns every repeat,
    so a drift in the machine's load hits all of them alike."""
    for name, fn in contenders.items():
        if warm is None or name in warm:
            fn()
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            runs[name].append(fn())
    return {name: summary(r) for name, r in runs.items()}


def summary(runs: list[float]) -> dict:
    """Median seconds and every repeat, so the spread is on record."""
    return {"median_s": round(statistics.median(runs), 4), "runs_s": [round(r, 4) for r in runs]}


def rate(images: int, timing: dict) -> float:
    """Images per second at the median time."""
    return round(images / timing["median_s"], 2)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids = []
        for task in tasks:
            kids += [int(p) for p in (task / "children").read_text().split()]
        return kids
    except OSError:
        return []


def _pss_mb(pid: int) -> float:
    """Proportional set size (shared pages split among their users, so a tree's sum is not inflated)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Samples the PSS of a process (the driver) and of its descendants (Ray and its workers).

    Used as a context manager around the measured work; peaks are in MB.
    """

    def __init__(self, pid: int | None = None, every: float = 0.2):
        self.pid = pid or os.getpid()
        self.every = every
        self.driver_mb = self.workers_mb = self.total_mb = self.worker_max_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        tree, todo = [], _children(self.pid)
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += _children(pid)
        driver = _pss_mb(self.pid)
        each = [_pss_mb(p) for p in tree]
        workers = sum(each)
        self.worker_max_mb = max([self.worker_max_mb, *each])
        self.driver_mb = max(self.driver_mb, driver)
        self.workers_mb = max(self.workers_mb, workers)
        self.total_mb = max(self.total_mb, driver + workers)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def result(self) -> dict:
        """Peaks in MB: the driver, all its descendants together, both, and the largest single descendant."""
        return {"driver_mb": round(self.driver_mb, 1), "workers_mb": round(self.workers_mb, 1),
                "total_mb": round(self.total_mb, 1), "worker_max_mb": round(self.worker_max_mb, 1)}


_SERVE = """
import sys, threading
from pathlib import Path
from curate.demo_server import serve
with serve(Path(sys.argv[1])) as base:
    print(base, flush=True)
    threading.Event().wait()
"""


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """The demo's multi-threaded HTTP server on 127.0.0.1, in its own process.

    Its own process keeps the server's threads from competing for the GIL of whichever
    contender runs in the benchmark process; yields the base URL.
    """
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        base = proc.stdout.readline().strip()
        if not base.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the benchmark's HTTP server did not start (exit {proc.poll()})")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def photos(folder: Path, n: int, lo: int, hi: int, seed: int = 0) -> list[Path]:
    """n photo-like JPEGs with sides drawn from [lo, hi]; the same seed gives the same bytes."""
    import numpy as np

    from curate.demo_corpus import photo

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        photo(rng, h, w).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def timer() -> Callable[[], float]:
    """perf_counter start; calling the result returns the wall seconds since."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def cpu_timer() -> Callable[[], float]:
    """This process's CPU time (all threads): per-core cost, robust to other jobs on the machine."""
    start = time.process_time()
    return lambda: time.process_time() - start


def rescore_seconds(out: Path, overrides: list[str]) -> float:
    """run_score from scratch on a downloaded demo run (its scores and markers dropped); wall seconds."""
    from curate.demo import demo_config
    from curate.rundir import RunDir
    from curate.score import run_score

    cfg = demo_config(out, overrides)
    run = RunDir(cfg.run_dir)
    run.storage.delete_dir(run.uri("scores"))
    run.storage.delete_dir(run.uri("_done", "score"))
    start = time.perf_counter()
    failures, _ = run_score(cfg, run, sorted(run.done("download")))
    if failures:
        raise RuntimeError(f"score failed: {failures[:3]}")
    return time.perf_counter() - start
