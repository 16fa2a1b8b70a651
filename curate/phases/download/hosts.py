"""Politeness inside one download task: which URL a fetch thread may take next, and when.

img2dataset's Downloader feeds its thread pool in input order, so a per-host limit there would
block threads behind one busy host (head-of-line blocking) and a Retry-After would hold a thread
asleep. `HostQueue` instead keeps one FIFO per host and hands a thread a URL only from a host
that has fewer than `per_host_connections` requests in flight and is not waiting (Retry-After,
backoff, a pause or its robots.txt Crawl-delay); hosts take turns. Transient failures come back
after their delay, up to `retries` times; permanent ones are final at once. A host that failed
most of its last `host_window` first attempts (at least two rounds of its connections) transiently
is paused for `host_pause` seconds (doubling while it stays bad), then gets a single probe
request; retries do not count there, so a few bad URLs retried at the end of a shard cannot
pause a host that serves the rest. The shard's waiting is bounded: once it has spent `max_wait`
seconds with nothing in flight, whatever still waits is given up; at once when all that waits is
on paused hosts that answered none of their requests (dead hosts, tarpits).

With `robots_txt`, the first URL of each origin is held back and a robots.txt request goes out
instead; the origin's URLs wait until it is settled (retried like any transient failure), and
then each is either handed out or ended here, never requested (`ended`, curate/phases/download/robots.py).
"""
from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from curate.config import DownloadConfig
from curate.phases.download.fetch import Fetched
from curate.phases.download.robots import Rules, origin, robots_url

# Failures worth another attempt later; every other kind (404, 410, refused address, opt-out,
# too large, not an image, ...) is final on the first answer.
RETRYABLE = frozenset({"timeout", "connection_reset", "connection_failed", "http_429", "http_503", "http_5xx",
                       "dns_timeout"})
# Host pauses stop growing here (x host_pause): a probe still comes every few minutes.
MAX_PAUSE_DOUBLINGS = 4


@dataclass
class Job:
    """One row's URL and how many attempts it has had; with `robots` set, the robots.txt request of
    that origin instead (index -1: not a row)."""
    index: int
    url: str
    host: str
    attempts: int = 0
    robots: str | None = None


@dataclass
class HostStats:
    """What one host did for the shard; merged across shards into stats.json."""
    rows: int = 0
    success: int = 0
    requests: int = 0
    retries: int = 0
    pauses: int = 0
    kinds: Counter = field(default_factory=Counter)
    robots: str | None = None     # how its robots.txt was settled (rules, no rules: why, unavailable: why)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "success": self.success, "requests": self.requests, "retries": self.retries,
                "pauses": self.pauses, "kinds": dict(self.kinds.most_common()), "robots": self.robots}


@dataclass
class _Host:
    name: str
    window: int
    queue: deque = field(default_factory=deque)
    active: int = 0
    ready_at: float = 0.0        # no request starts before this (Retry-After or pause)
    probing: bool = False        # after a pause: one request at a time until the probe does not fail
    probe: Job | None = None
    pause_doublings: int = 0
    interval: float = 0.0        # robots.txt Crawl-delay: seconds between request starts
    robots_pending: int = 0      # robots.txt requests not settled: the host's URLs wait
    answered: int = 0            # requests that did not fail transiently
    recent: deque = field(init=False)
    stats: HostStats = field(default_factory=HostStats)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)


class HostQueue:
    """Hands out jobs under the per-host cap from any number of threads; see the module docstring.

    `take()` blocks until a job may start (None once every job is final or given up);
    `settle()` reports its outcome and says whether the row is final.
    """

    def __init__(self, jobs: Iterable[Job], cfg: DownloadConfig, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random(0)
        self.hosts: dict[str, _Host] = {}
        for job in jobs:
            host = self.hosts.get(job.host) or self.hosts.setdefault(job.host, _Host(job.host, cfg.host_window))
            host.queue.append(job)
            host.stats.rows += 1
        self.pending = sum(len(h.queue) for h in self.hosts.values())   # rows not yet final
        self.in_flight = 0            # requests out, robots.txt ones included
        self.robots_in_flight = 0
        self.ready: deque[str] = deque(self.hosts)
        self.queued_ready = set(self.hosts)
        self.timers: list[tuple[float, int, str, Job | None]] = []   # (when, seq, host, job to requeue or None)
        self.seq = itertools.count()
        self.waited = 0.0            # seconds with nothing in flight and something waiting
        self.peak = Counter()        # most requests in flight per host
        self.given_up: list[Job] = []   # never final through settle(): the caller records them
        self.give_up_reason = "the shard's wait budget (download.max_wait) was spent"
        # fewest first attempts a pause is decided on: two rounds of the host's connections
        self._sample = min(cfg.host_window, 2 * cfg.per_host_connections)
        self.ended: list[tuple[Job, str, str]] = []   # (job, error_kind, error) refused here, never requested
        self.agent = cfg.user_agent_token.strip().lower() if cfg.user_agent_token else "*"
        self.rules: dict[str, Rules | None] = {} if cfg.robots_txt else None   # origin -> verdict (None: asked)
        self.gave_up = False
        self.closed = False
        self._idle_since: float | None = None
        self._cond = threading.Condition()

    # -- scheduling helpers (hold the lock) --------------------------------------------------------

    def _limit(self, host: _Host) -> int:
        return 1 if host.probing else self.cfg.per_host_connections

    def _takeable(self, host: _Host, now: float) -> bool:
        return bool(host.queue) and host.active < self._limit(host) and host.ready_at <= now \
            and (not host.robots_pending or host.queue[0].robots is not None)

    def _wake(self, host: _Host, now: float) -> None:
        if self._takeable(host, now) and host.name not in self.queued_ready:
            self.ready.append(host.name)
            self.queued_ready.add(host.name)

    def _next(self, host: _Host) -> Job | None:
        """The host's next request: its first URL, or that URL's robots.txt request when its origin has
        no verdict yet. URLs their robots.txt refuses are ended on the way, never handed out."""
        while host.queue:
            job = host.queue[0]
            if self.rules is None or job.robots is not None:
                return host.queue.popleft()
            site = origin(job.url)
            if site not in self.rules:
                self.rules[site] = None
                host.robots_pending += 1
                return Job(-1, robots_url(site), host.name, robots=site)
            rules = self.rules[site]
            if rules is None:
                return None   # settled by the robots.txt request in flight
            refusal = rules.refusal(job.url)
            if refusal is None:
                return host.queue.popleft()
            host.queue.popleft()
            self.ended.append((job, *refusal))
            self.pending -= 1
            if self.pending == 0:
                self._cond.notify_all()
        return None

    def _timer(self, when: float, host: _Host, job: Job | None = None) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), host.name, job))

    def _fire_due(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, name, job = heapq.heappop(self.timers)
            host = self.hosts[name]
            if job is not None:
                host.queue.appendleft(job)   # a retry goes before the host's untried URLs
            self._wake(host, now)

    def _give_up(self) -> None:
        """The wait budget is spent: every job not in flight is final as it stands."""
        for _, _, _, job in self.timers:
            if job is not None and job.robots is None:
                self.given_up.append(job)
        self.timers.clear()
        for host in self.hosts.values():
            self.given_up.extend(host.queue)
            host.queue.clear()
        self.pending = self.in_flight - self.robots_in_flight
        self.gave_up = True
        self._cond.notify_all()

    def _only_dead_hosts_left(self) -> bool:
        """Nothing is in flight and every row still waiting is on a paused host that has answered none
        of its requests (a dead host or a tarpit): waiting out max_wait for it would only idle the task."""
        waiting = {name for _, _, name, job in self.timers if job is not None}
        waiting |= {h.name for h in self.hosts.values() if h.queue}
        return bool(waiting) and all(self.hosts[n].probing and not self.hosts[n].answered for n in waiting)

    def _pause(self, host: _Host, now: float) -> None:
        host.probing, host.probe = True, None
        host.recent.clear()
        host.stats.pauses += 1
        seconds = self.cfg.host_pause * 2 ** min(host.pause_doublings, MAX_PAUSE_DOUBLINGS)
        host.pause_doublings += 1
        host.ready_at = max(host.ready_at, now + seconds)
        self._timer(host.ready_at, host)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: backoff * 2^attempt * U(0.5, 1.5), cut to max_retry_after."""
        return min(self.cfg.backoff * 2 ** attempt * self.rng.uniform(0.5, 1.5), self.cfg.max_retry_after)

    # -- the threads' side ---------------------------------------------------------------------------

    def take(self) -> Job | None:
        with self._cond:
            while not self.closed:
                now = self.clock()
                self._fire_due(now)
                while self.ready:
                    name = self.ready.popleft()
                    self.queued_ready.discard(name)
                    host = self.hosts[name]
                    if not self._takeable(host, now):
                        continue   # it comes back through settle() or its timer
                    job = self._next(host)
                    if job is None:
                        continue
                    if host.probing and job.robots is None:
                        host.probe = job
                    if host.interval and job.robots is None:
                        host.ready_at = max(host.ready_at, now + host.interval)
                        self._timer(host.ready_at, host)
                    host.active += 1
                    self.in_flight += 1
                    self.robots_in_flight += job.robots is not None
                    self.peak[name] = max(self.peak[name], host.active)
                    self._wake(host, now)   # to the back of the line: hosts take turns
                    if self._idle_since is not None:
                        self.waited += now - self._idle_since
                        self._idle_since = None
                    return job
                if self.pending == 0:
                    return None
                if self.in_flight == 0:
                    if self._idle_since is None:
                        self._idle_since = now
                    if self._only_dead_hosts_left():
                        self.waited += now - self._idle_since
                        self._idle_since = None
                        self.give_up_reason = "nothing else was left and the host, paused, had answered none of " \
                                              "its requests"
                        self._give_up()
                        continue
                    if self.waited + now - self._idle_since >= self.cfg.max_wait:
                        self.waited += now - self._idle_since
                        self._idle_since = None
                        self._give_up()
                        continue
                timeout = self.timers[0][0] - now if self.timers else None
                if self.in_flight == 0 and self._idle_since is not None:
                    left = self.cfg.max_wait - self.waited - (now - self._idle_since)
                    timeout = left if timeout is None else min(timeout, left)
                self._cond.wait(None if timeout is None else max(timeout, 0.0))
            return None

    def settle(self, job: Job, kind: str | None, retry_after: float | None = None) -> bool:
        """Record one request's outcome (kind None: it answered); True when the row is final,
        False when the job will be handed out again after its delay."""
        with self._cond:
            now = self.clock()
            host = self.hosts[job.host]
            host.active -= 1
            self.in_flight -= 1
            host.stats.requests += 1
            transient = kind in RETRYABLE
            host.answered += not transient
            if job.attempts == 0:   # a retry is the same URL again, not a new sample of the host
                host.recent.append(transient)
            if retry_after is not None and transient:   # the server said when: the whole host waits
                retry_after = min(retry_after, self.cfg.max_retry_after)
                host.ready_at = max(host.ready_at, now + retry_after)
                self._timer(host.ready_at, host)
            if job is host.probe:
                host.probe = None
                if transient:
                    self._pause(host, now)   # still failing: a longer pause
                else:
                    host.probing, host.pause_doublings = False, 0
            elif not host.probing and len(host.recent) >= self._sample and 2 * sum(host.recent) > len(host.recent):
                self._pause(host, now)
            final = self.gave_up or not (transient and job.attempts < self.cfg.retries)
            if final:
                self.pending -= 1
            else:
                delay = retry_after if retry_after is not None else self._backoff(job.attempts)
                job.attempts += 1
                host.stats.retries += 1
                self._timer(max(now + delay, host.ready_at), host, job)
            self._wake(host, now)
            self._cond.notify_all()
            return final

    def settle_robots(self, job: Job, got: Fetched) -> None:
        """Record a robots.txt answer: the origin's verdict, or a retry after its delay (the host's URLs
        keep waiting); past `retries` transient failures the origin counts as disallowing everything."""
        transient = got.kind in RETRYABLE
        retry = transient and job.attempts < self.cfg.retries
        verdict = None if retry else Rules.unreachable(self.agent, got.error) if transient \
            else Rules.from_answer(got, self.agent)   # parsed before taking the lock
        with self._cond:
            now = self.clock()
            host = self.hosts[job.host]
            host.active -= 1
            self.in_flight -= 1
            self.robots_in_flight -= 1
            host.stats.requests += 1
            if retry:
                wait = None if got.retry_after is None else min(got.retry_after, self.cfg.max_retry_after)
                if wait is not None:
                    host.ready_at = max(host.ready_at, now + wait)
                delay = wait if wait is not None else self._backoff(job.attempts)
                job.attempts += 1
                host.stats.retries += 1
                self._timer(max(now + delay, host.ready_at), host, job)
            else:
                self.rules[job.robots] = verdict
                host.robots_pending -= 1
                host.stats.robots = verdict.source
                host.interval = max(host.interval, verdict.interval())
                if host.interval:
                    host.ready_at = max(host.ready_at, now + host.interval)
                    self._timer(host.ready_at, host)
            self._wake(host, now)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out jobs (a fetch thread died): every take() returns None."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def record(self, job: Job, kind: str | None) -> None:
        """Count a row's final outcome (kind None: success) in its host's stats."""
        with self._cond:
            stats = self.hosts[job.host].stats
            if kind is None:
                stats.success += 1
            else:
                stats.kinds[kind] += 1


# -- per-host stats: a marker's top hosts, merged across shards into stats.json ---------------------

TOP_HOSTS = 50           # hosts a download marker names; the rest are summed under OTHER_HOSTS
OTHER_HOSTS = "(other hosts)"
STATS_TOP_HOSTS = 20     # hosts stats.json and the report list


def _merge(into: dict, stats: dict) -> None:
    for k in ("rows", "success", "requests", "retries", "pauses"):
        into[k] = into.get(k, 0) + stats[k]
    if stats.get("robots") is not None:   # one shard's account of it is enough to show
        into["robots"] = stats["robots"]
    into["peak_connections"] = max(into.get("peak_connections", 0), stats["peak_connections"])
    kinds = into.setdefault("kinds", {})
    for kind, n in stats["kinds"].items():
        kinds[kind] = kinds.get(kind, 0) + n


def _ranked(hosts: dict[str, dict], top: int) -> dict[str, dict]:
    """The `top` hosts by rows (ties by name), the others merged under OTHER_HOSTS."""
    order = sorted((h for h in hosts if h != OTHER_HOSTS), key=lambda h: (-hosts[h]["rows"], h))
    out = {h: hosts[h] for h in order[:top]}
    rest = [hosts[h] for h in order[top:]] + ([hosts[OTHER_HOSTS]] if OTHER_HOSTS in hosts else [])
    if rest:
        other: dict = {}
        for stats in rest:
            _merge(other, stats)
        other.pop("robots", None)   # one host's verdict says nothing of the others'
        out[OTHER_HOSTS] = other
    return out


def host_summary(queue: HostQueue, top: int = TOP_HOSTS) -> dict[str, dict]:
    """One shard's per-host stats for its marker (bounded: `top` hosts and the rest together)."""
    return _ranked({name: {**h.stats.as_dict(), "peak_connections": queue.peak[name]}
                    for name, h in queue.hosts.items()}, top)


def merge_summaries(*tables: dict[str, dict], top: int = TOP_HOSTS) -> dict[str, dict]:
    """Per-host tables of one shard's downloads (an earlier one and its increment) as one marker table."""
    if sum(bool(t) for t in tables) < 2:
        return next((t for t in tables if t), {})
    hosts: dict[str, dict] = {}
    for table in tables:
        for name, stats in table.items():
            _merge(hosts.setdefault(name, {}), stats)
    return _ranked(hosts, top)


def download_stats(markers: list[dict], top: int = STATS_TOP_HOSTS) -> dict:
    """stats.json's `download` section from the download markers: error kinds, the shards' wait,
    and the top hosts by rows with their success rate and main error kinds. A host outside a
    shard's own top TOP_HOSTS counts only under OTHER_HOSTS there; with shuffled shards every
    shard samples the same big hosts, so the ranking holds."""
    kinds: dict[str, int] = {}
    hosts: dict[str, dict] = {}
    for m in markers:
        for kind, n in m.get("error_kinds", {}).items():
            kinds[kind] = kinds.get(kind, 0) + n
        for name, stats in m.get("hosts", {}).items():
            _merge(hosts.setdefault(name, {}), stats)
    waits = [m.get("wait_s", 0.0) for m in markers]
    ranked = _ranked(hosts, top)
    for stats in ranked.values():
        stats["success_rate"] = round(stats["success"] / stats["rows"], 4) if stats["rows"] else None
        stats["kinds"] = dict(sorted(stats["kinds"].items(), key=lambda kv: -kv[1]))
    return {"error_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "wait_s": {"total": round(sum(waits), 3), "max_shard": round(max(waits, default=0.0), 3)},
            "requests": sum(s.get("requests", 0) for s in hosts.values()),
            "retries": sum(s.get("retries", 0) for s in hosts.values()),
            "top_hosts": ranked}
