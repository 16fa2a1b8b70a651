"""Ray start-up and progress reporting shared by every phase.

One entry point serves a laptop and a cluster: attach to `ray.address` or RAY_ADDRESS when
set (a submitted job), otherwise start an embedded local Ray.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Hashable
from typing import Any

from curate.config import RayConfig

log = logging.getLogger("curate")


def setup_logging() -> None:
    """Plain timestamped lines on stdout: they read the same in a terminal and in `ray job logs`."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def init_ray(cfg: RayConfig) -> None:
    """Start or attach to Ray once per process."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray (%s CPUs)", cfg.num_cpus or os.cpu_count())
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})


class Progress:
    """Log rows done, rows per second and elapsed time at most every `every` seconds."""

    def __init__(self, phase: str, total: int, every: float = 10.0):
        self.phase, self.total, self.every = phase, total, every
        self.done = 0
        self.start = self.last = time.time()

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            self._log(now)

    def finish(self) -> float:
        now = time.time()
        self._log(now)
        return now - self.start

    def _log(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        log.info("%s: %d/%d rows, %.1f rows/s, %.1fs elapsed",
                 self.phase, self.done, self.total, self.done / elapsed, elapsed)


class Window:
    """A bounded set of Ray tasks in flight: the driver never holds more than `limit` references.

    `submit` waits for room first and hands back the outcomes it collected meanwhile, as
    {label: result}; a task that raised yields its error text as its result (callers decide
    whether a result means failure). `ray.wait` sees only the window, so waiting is linear
    in tasks, not quadratic.
    """

    def __init__(self, limit: int | None = None):
        import ray

        self.limit = limit or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.pending: dict[Any, Hashable] = {}

    def submit(self, ref: Any, label: Hashable) -> dict:
        done = {}
        while len(self.pending) >= self.limit:
            done.update(self._collect(1))
        self.pending[ref] = label
        return done

    def drain(self) -> dict:
        done = {}
        while self.pending:
            done.update(self._collect(1))
        return done

    def _collect(self, n: int) -> dict:
        import ray

        ready, _ = ray.wait(list(self.pending), num_returns=n)
        return {self.pending.pop(ref): self.outcome(ref) for ref in ready}

    @staticmethod
    def outcome(ref: Any) -> Any:
        """The task's result, or its error's last line (a failed task is data, not an exception)."""
        import ray

        try:
            return ray.get(ref)
        except Exception as exc:
            return error_text(exc)


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]
