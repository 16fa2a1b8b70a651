"""The funnel: rows in, rows dropped per reason, rows kept, as one typed value that adds up across shards.

decide sums its per-shard markers into it, write sums its markers into stats.json's, inspect and the
report count a manifest's `reason` column into it, and the card and the CLI print its `to_dict()`.
Nothing else builds a funnel by hand. The reasons are ordered as the rules table applies them
(manifests.rules.REASONS); a reason the table does not know (a manifest from an older version)
follows them, sorted.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from manifests.rules import REASONS


@dataclass
class Funnel:
    """Rows kept and dropped per reason; rows_in is their sum, so the value cannot disagree with itself."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        return self.kept + sum(self.dropped.values())

    def add(self, reason: str | None, n: int = 1) -> Funnel:
        """Count n rows under `reason` (None: kept)."""
        if n < 0:
            raise ValueError(f"a negative count ({n}) for reason {reason!r}")
        if reason is None:
            self.kept += n
        elif n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        return self

    def merge(self, other: Funnel) -> Funnel:
        """Add another funnel's counts into this one (shards, batches)."""
        self.kept += other.kept
        for reason, n in other.dropped.items():
            self.add(reason, n)
        return self

    def __add__(self, other: Funnel) -> Funnel:
        return Funnel().merge(self).merge(other)

    @classmethod
    def of_counts(cls, counts: Mapping[str | None, int]) -> Funnel:
        """From value counts of a `reason` column, where None counts the kept rows."""
        out = cls()
        for reason, n in counts.items():
            out.add(reason, int(n))
        return out

    @classmethod
    def of_marker(cls, marker: Mapping[str, Any], where: str = "a marker") -> Funnel:
        """From a per-shard marker's counts (decide's or write's: rows, kept, reasons); counts that do not add
        up are an error naming the marker."""
        out = cls.of_counts({**marker["reasons"], None: marker["kept"]})
        if out.rows_in != marker["rows"]:
            raise ValueError(f"{where}: kept ({marker['kept']}) plus dropped ({sum(marker['reasons'].values())}) "
                             f"is not its rows ({marker['rows']})")
        return out

    @classmethod
    def total(cls, markers: Mapping[str, Mapping[str, Any]]) -> Funnel:
        """The sum of per-shard markers, by shard name."""
        out = cls()
        for shard, marker in markers.items():
            out.merge(cls.of_marker(marker, f"the marker of shard {shard}"))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Funnel:
        """Read back `to_dict()` (stats.json's and _decided.json's `funnel`)."""
        out = cls.of_counts({**data["dropped"], None: data["kept"]})
        if out.rows_in != data["rows_in"]:
            raise ValueError(f"a funnel whose kept and dropped rows ({out.rows_in}) are not its rows_in "
                             f"({data['rows_in']})")
        return out

    def reasons(self) -> list[str]:
        """The reasons with drops, in rule order, then unknown ones sorted."""
        return ordered(self.dropped)

    def to_dict(self) -> dict[str, Any]:
        """{"rows_in", "dropped" (in rule order), "kept"}: the JSON shape stats.json and _decided.json hold."""
        return {"rows_in": self.rows_in, "dropped": {r: self.dropped[r] for r in self.reasons()}, "kept": self.kept}


def ordered(reasons: Iterable[str]) -> list[str]:
    """Reasons in the rules table's order, then any it does not know, sorted."""
    have = set(reasons)
    return [r for r in REASONS if r in have] + sorted(have - set(REASONS))
