"""robots.txt (RFC 9309) in the download task: one request per origin per task, its verdict cached.

The parser is protego (Scrapy's), not the standard library's urllib.robotparser: RFC 9309 (and
Google's parser, which sites write their files for) applies the most specific, i.e. longest,
matching rule with `*` and `$` in paths, while urllib.robotparser applies the first matching
line in file order, knows no wildcards and matches agent names by substring ("bot" matching
"mybot"), so it would allow and refuse other URLs than the site meant. protego follows the RFC,
is pure Python and has no dependencies.

What an answer means (RFC 9309 2.3.1): a body is parsed (its first ROBOTS_MAX_BYTES, the RFC's
minimum); any other final answer (404 and other 4xx, a redirect loop, a refused address, a name
that does not exist) means there are no rules; a transient failure (timeout, 5xx, 429, reset) is
retried by the host queue while the host's URLs wait, and past download.retries the site counts
as disallowing everything (`robots_unavailable`).
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from protego import Protego

from curate.fetch import Fetched

ROBOTS_MAX_BYTES = 512 * 1024


def origin(url: str) -> str:
    """scheme://host[:port] of a URL: robots.txt applies per origin (RFC 9309 2.3)."""
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    name = f"[{host}]" if ":" in host else host
    port = parts.port
    return f"{scheme}://{name}" if port in (None, 443 if scheme == "https" else 80) else f"{scheme}://{name}:{port}"


def robots_url(origin_: str) -> str:
    return f"{origin_}/robots.txt"


@dataclass(frozen=True)
class Rules:
    """One origin's verdict. `parser` None: no rules. `unavailable`: every URL refused."""
    agent: str
    source: str
    parser: Protego | None = None
    unavailable: bool = False

    @classmethod
    def from_answer(cls, got: Fetched, agent: str) -> Rules:
        """Rules from a final answer (a body, or a failure that means no rules)."""
        if got.body is None:
            return cls(agent, f"no rules: {got.error}")
        text = got.body.read().decode("utf-8", errors="replace")
        return cls(agent, "rules", Protego.parse(text))

    @classmethod
    def unreachable(cls, agent: str, error: str | None) -> Rules:
        return cls(agent, f"unavailable: {error}", unavailable=True)

    def refusal(self, url: str) -> tuple[str, str] | None:
        """(error_kind, error) when the URL must not be requested, else None."""
        if self.unavailable:
            return "robots_unavailable", f"not requested: robots.txt could not be read ({self.source})"
        if self.parser is not None and not self.parser.can_fetch(url, self.agent):
            return "robots_disallowed", f"not requested: robots.txt disallows it for {self.agent!r}"
        return None

    def interval(self) -> float:
        """Seconds between requests the site asks for (Crawl-delay, or Request-rate), 0 for none."""
        if self.parser is None:
            return 0.0
        delay = self.parser.crawl_delay(self.agent) or 0.0
        rate = self.parser.request_rate(self.agent)
        if rate is not None and rate.requests:
            delay = max(delay, rate.seconds / rate.requests)
        return float(delay)
