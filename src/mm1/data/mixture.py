"""The mixture of sources as a pure function of the sequence number: MM1's 45:45:10 by default.

MM1 (like AXLearn's `sample_from_datasets`) draws whole packed sequences from each source, so its
weights are shares of sequences. Global sequence g of a run maps to a source and a sequence of it
with no state at all, which is what makes data order exactly reproducible and any step's batch
computable without replaying the run (as in Pythia):
- sequences come in blocks of `block`; each block holds a fixed count per source (largest
  remainder rounding of the weights), shuffled by a generator seeded with (seed, block), so any
  10,000 consecutive sequences match the weights to within a fraction of a point;
- the k-th draw from a source of n sequences is sequence perm_e(k mod n) of epoch e = k // n, where
  perm_e is a fresh pseudo-random permutation per epoch. It is a Feistel network evaluated per index
  (with cycle walking), so it needs no memory: 10 thousand or 100 million sequences cost the same.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random bijection of range(n), keyed by `key`, evaluated in O(1) per index."""

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        if n <= 0:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # the domain 4^half covers n
        self.mask = (1 << self.half) - 1
        self.keys = [_mix(key * 0x9E3779B97F4A7C15 + r & MASK64) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside range({self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: stays a bijection of range(n)
            x = self._encrypt(x)
        return x


def block_counts(weights: list[float], block: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


class Mixture:
    """Global sequence g → (source s, epoch e of s, sequence j of s)."""

    def __init__(self, sizes: list[int], weights: list[float], *, seed: int, block: int = 1000) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source is needed")
        if any(n <= 0 for n in sizes):
            raise ValueError("every source in the mixture needs at least one sequence")
        self.sizes, self.seed, self.block = list(sizes), seed, block
        self.counts = block_counts(weights, block)

    @lru_cache(maxsize=64)  # noqa: B019 — few live blocks; the cache dies with the object
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, draw number within its source) for every position of block b."""
        src = np.repeat(np.arange(len(self.counts)), self.counts)
        src = np.random.default_rng([self.seed, 7, b]).permutation(src)
        draw = np.empty(self.block, dtype=np.int64)
        for s, c in enumerate(self.counts):
            draw[src == s] = b * c + np.arange(c)
        return src, draw

    @lru_cache(maxsize=256)  # noqa: B019
    def _permutation(self, s: int, epoch: int) -> Permutation:
        return Permutation(self.sizes[s], _mix(_mix(self.seed * 1_000_003 + s) + epoch))

    def locate(self, g: int) -> tuple[int, int, int]:
        """(source, epoch, sequence index within the source) of global sequence g."""
        src, draw = self._block(g // self.block)
        s, k = int(src[g % self.block]), int(draw[g % self.block])
        n = self.sizes[s]
        return s, k // n, self._permutation(s, k // n)(k % n)

    def draws(self, s: int, g: int) -> int:
        """How many of the first g global sequences come from source s."""
        b, r = divmod(g, self.block)
        return b * int(self.counts[s]) + int((self._block(b)[0][:r] == s).sum())

    def epochs(self, g: int) -> list[float]:
        """Epochs of each source consumed by the first g global sequences."""
        return [self.draws(s, g) / n for s, n in enumerate(self.sizes)]
