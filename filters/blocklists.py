"""Blocklists: URL rules before download, image hashes after it.

Pure: a list is parsed from its text and matched against batches; curate/ reads the files (from any
URI, once per task) and records their digests. One entry a line; blank lines and lines starting with
`#` are comments.

URL list (`input.url_blocklist`), each entry one of:
  - `example.com`            the domain and every subdomain (`*.example.com` and `.example.com` too);
  - `example.com/adult/`     a domain (and its subdomains) with a path prefix, over http and https;
  - `https://cdn.example.net/u/123/`   a URL prefix (compared case-insensitively);
  - `re:PATTERN`             a regular expression searched in the whole URL (case-insensitive).
Image list (`filters.image_blocklist`), each entry one of:
  - 64 hex digits (or `sha256:` + them): the sha256 of the bytes as served (the manifest's `sha256`);
  - 16 hex digits (or `phash:` + them): a 64-bit perceptual hash as this project computes it (the
    manifest's `phash`, filters/multihash.py), matched within a Hamming distance against every view
    hash of an image (whole, mirror, crops), so mirrored and cropped copies are caught as dedup catches them.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from filters.phash import band_values, hamming, split_bits

_HEX = re.compile(r"[0-9a-fA-F]+")


def _lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _host(url: str) -> tuple[str, str]:
    """(lower-cased host, path) of a URL; empty strings when it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
        return (parts.hostname or "").rstrip("."), parts.path or "/"
    except ValueError:
        return "", ""


@dataclass(frozen=True)
class UrlBlocklist:
    """Domains (with optional path prefixes), URL prefixes and patterns; `match` names the entry that hit."""
    domains: dict[str, list[tuple[str, str]]] = field(default_factory=dict)   # domain -> [(path prefix, entry)]
    prefixes: tuple[tuple[str, str], ...] = ()                               # (lower-cased prefix, entry)
    patterns: tuple[tuple[re.Pattern[str], str], ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = "url blocklist") -> UrlBlocklist:
        domains: dict[str, list[tuple[str, str]]] = {}
        prefixes, patterns = [], []
        for n, entry in _lines(text):
            if entry.startswith("re:"):
                try:
                    patterns.append((re.compile(entry[3:], re.I), entry))
                except re.error as err:
                    raise ValueError(f"{source}:{n}: bad regular expression {entry[3:]!r}: {err}") from None
            elif "://" in entry:
                prefixes.append((entry.lower(), entry))
            else:
                domain, slash, path = entry.lstrip("*").lstrip(".").partition("/")
                if not domain or " " in domain:
                    raise ValueError(f"{source}:{n}: not a domain, URL prefix or re: pattern: {entry!r}")
                domains.setdefault(domain.lower(), []).append(((slash + path) if slash else "", entry))
        return cls(domains, tuple(prefixes), tuple(patterns))

    def __len__(self) -> int:
        return sum(map(len, self.domains.values())) + len(self.prefixes) + len(self.patterns)

    def match(self, url: str | None) -> str | None:
        """The first entry the URL matches (domains, then prefixes, then patterns), or None."""
        if not url:
            return None
        host, path = _host(url)
        labels = host.split(".") if host else []
        for i in range(len(labels)):   # the host itself, then each parent domain
            for prefix, entry in self.domains.get(".".join(labels[i:]), ()):
                if path.startswith(prefix):
                    return entry
        lowered = url.lower()
        for prefix, entry in self.prefixes:
            if lowered.startswith(prefix):
                return entry
        for pattern, entry in self.patterns:
            if pattern.search(url):
                return entry
        return None

    def match_all(self, urls: list[str | None]) -> list[str | None]:
        return [self.match(u) for u in urls]


@dataclass(frozen=True)
class ImageBlocklist:
    """sha256 values and 64-bit pHashes of known-bad images."""
    sha256: frozenset[str]
    phash: np.ndarray   # uint64, sorted, unique

    @classmethod
    def parse(cls, text: str, source: str = "image blocklist") -> ImageBlocklist:
        shas, hashes = set(), []
        for n, entry in _lines(text):
            kind, _, value = entry.rpartition(":")
            value = value.strip()
            if kind not in ("", "sha256", "phash") or not _HEX.fullmatch(value) or len(value) not in (16, 64) \
                    or (kind == "sha256" and len(value) != 64) or (kind == "phash" and len(value) != 16):
                raise ValueError(f"{source}:{n}: expected a sha256 (64 hex digits) or a pHash (16 hex digits), "
                                 f"optionally after sha256: or phash:, got {entry!r}")
            if len(value) == 64:
                shas.add(value.lower())
            else:
                hashes.append(int(value, 16))
        return cls(frozenset(shas), np.unique(np.array(hashes, np.uint64)))

    def __len__(self) -> int:
        return len(self.sha256) + len(self.phash)

    def match(self, sha256: list[str | None], views: np.ndarray, valid: np.ndarray, distance: int) -> list[str | None]:
        """Per row, why it is blocked: `sha256` or `phash:<entry> d=<bits>` for the first view within
        `distance` bits of an entry (views: (n, k) uint64; `valid` masks rows without hashes), else None."""
        out: list[str | None] = ["sha256" if s is not None and s.lower() in self.sha256 else None for s in sha256]
        if not len(self.phash) or not len(views):
            return out
        n, k = views.shape
        flat = views.reshape(-1)
        entry, dist = self._nearest(flat, distance)
        entry, dist = entry.reshape(n, k), dist.reshape(n, k)
        for i in np.flatnonzero(valid & (entry >= 0).any(axis=1)):
            if out[i] is None:
                j = int(np.argmin(np.where(entry[i] >= 0, dist[i], 65)))
                out[i] = f"phash:{int(self.phash[entry[i, j]]):016x} d={int(dist[i, j])}"
        return out

    def _nearest(self, hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
        """(index of the closest entry within `distance`, its distance) per hash; -1 where none.

        Pigeonhole, as filters/phash.py: two hashes within d bits agree exactly on one of d+1 bands, so
        each band's exact matches are the only candidates, each verified by its true distance."""
        best = np.full(len(hashes), -1, np.int64)
        best_d = np.full(len(hashes), 65, np.int64)
        for offset, width in split_bits(64, distance + 1):
            keys = band_values(self.phash, offset, width)
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            probe = band_values(hashes, offset, width)
            left, right = np.searchsorted(keys, probe, "left"), np.searchsorted(keys, probe, "right")
            counts = right - left
            if not counts.sum():
                continue
            rows = np.repeat(np.arange(len(hashes)), counts)
            starts = np.repeat(left - np.cumsum(np.r_[0, counts[:-1]]), counts)
            cand = order[starts + np.arange(len(rows))]
            d = hamming(hashes[rows], self.phash[cand]).astype(np.int64)
            better = (d <= distance)
            rows, cand, d = rows[better], cand[better], d[better]
            for r, c, dd in zip(rows.tolist(), cand.tolist(), d.tolist()):
                if dd < best_d[r]:
                    best[r], best_d[r] = c, dd
        return best, best_d
