"""Counting what was skipped, and why: bad data is reported, never silently dropped.

Readers and the packer call `DataStats.skip`; the warning names the shard and key, and the counts
per source and reason end up in the run's statistics (`metrics.jsonl`, `data_stats.json`).
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("mm1.data")


class DataStats:
    """Counts of records read and skipped per source and reason, with a bounded number of warnings."""

    def __init__(self, max_warnings: int = 50) -> None:
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.counts: Counter[str] = Counter()
        self.max_warnings = max_warnings
        self._warned = 0

    def skip(self, source: str, where: str, reason: str) -> None:
        self.skipped[(source, reason)] += 1
        if self._warned < self.max_warnings:
            log.warning("skipped %s record %s: %s", source, where, reason)
            self._warned += 1
            if self._warned == self.max_warnings:
                log.warning("further skip warnings are counted but not printed")

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def merge(self, other: DataStats) -> None:
        self.skipped.update(other.skipped)
        self.counts.update(other.counts)

    def skipped_by_source(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (source, _), n in self.skipped.items():
            out[source] += n
        return dict(out)

    def to_dict(self) -> dict:
        return {
            "skipped": {f"{s}/{r}": n for (s, r), n in sorted(self.skipped.items())},
            "skipped_by_source": self.skipped_by_source(),
            "counts": dict(sorted(self.counts.items())),
        }
