"""The weighted mixture of sources as a pure function of position: MM1's 45:45:10 by default.

Stream position n (counting samples from the start of training) maps to (source, record) with
no state at all, which is what makes data order exactly reproducible and step N computable
without replaying steps 0..N-1 (as in Pythia):
- positions come in blocks of `block` samples; each block holds a fixed count per source
  (largest-remainder rounding of the weights), shuffled by a generator seeded with
  (seed, block), so any 10,000 consecutive samples match the weights to within a fraction of a point;
- the k-th draw from a source reads record perm_e[k mod len] of that source's epoch e = k // len,
  a fresh permutation per epoch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def block_counts(weights: list[float], block: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


class Mixture:
    def __init__(self, sizes: list[int], weights: list[float], *, seed: int, block: int = 1000) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source is needed")
        if any(n <= 0 for n in sizes):
            raise ValueError("every source in the mixture needs at least one record")
        self.sizes, self.seed, self.block = list(sizes), seed, block
        self.counts = block_counts(weights, block)
        self.prefix = np.concatenate([[0], np.cumsum(self.counts)])

    @lru_cache(maxsize=64)  # noqa: B019 — few live blocks; the cache dies with the object
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, draw number within its source) for every position of block b."""
        src = np.repeat(np.arange(len(self.counts)), self.counts)
        src = np.random.default_rng([self.seed, 7, b]).permutation(src)
        draw = np.empty(self.block, dtype=np.int64)
        for s, c in enumerate(self.counts):
            where = src == s
            draw[where] = b * c + np.arange(c)
        return src, draw

    @lru_cache(maxsize=64)  # noqa: B019
    def _epoch(self, s: int, e: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 11, s, e]).permutation(self.sizes[s])

    def record(self, s: int, k: int) -> int:
        """Record index of the k-th draw from source s."""
        n = self.sizes[s]
        return int(self._epoch(s, k // n)[k % n])

    def positions(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(source id, record index) for stream positions start..stop-1."""
        out = []
        for n in range(start, stop):
            src, draw = self._block(n // self.block)
            s, k = int(src[n % self.block]), int(draw[n % self.block])
            out.append((s, self.record(s, k)))
        return out
