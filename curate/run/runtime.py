"""Ray start-up and progress reporting shared by every phase.

One entry point serves a laptop and a cluster: attach to `ray.address` or RAY_ADDRESS when
set (a submitted job), otherwise start an embedded local Ray.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    pass

T = TypeVar("T", bound=Hashable)

log = logging.getLogger("curate")


def setup_logging() -> None:
    """Plain timestamped lines on stdout: they read the same in a terminal and in `ray job logs`."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or attach to Ray once per process (ray.address, ray.num_cpus of the config)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray (%s CPUs)", num_cpus or os.cpu_count())
        # No runtime_env: the workers inherit this process's environment (set above), and a runtime_env
        # sends every worker through Ray's set-up process first, a second import of Ray each (seconds here).
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def alive_nodes() -> list[dict]:
    """The cluster's live nodes, as `ray.nodes()` describes them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def on_every_node(fn: Callable, *args: Any, needs: dict[str, float] | None = None) -> dict[str, Any]:
    """fn(*args) once on every live node offering the resources `needs`, as a zero-CPU task pinned
    to it; {node address: result}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in alive_nodes() if all(n["Resources"].get(k, 0) >= v for k, v in (needs or {}).items())]
    remote = ray.remote(num_cpus=0, max_retries=1)(fn)
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    return dict(zip((n["NodeManagerAddress"] for n in nodes), ray.get(refs)))


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


def windowed(items: Iterable[T], submit: Callable[[T], Any], limit: int | None = None) -> Iterator[tuple[T, Any]]:
    """The one submit-and-collect driver: a Ray task per item (`submit(item)` returns its reference),
    at most `limit` in flight; yields (item, outcome) as tasks finish, an outcome being the result or
    the error text of a task that raised (Window.outcome). Items label their tasks, so they must be
    hashable (shard names, indices)."""
    window = Window(limit)
    for item in items:
        yield from window.submit(submit(item), item).items()
    yield from window.drain().items()


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]
