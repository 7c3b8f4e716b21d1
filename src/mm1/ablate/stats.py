"""Intervals over seeds and the verdict of a finding.

Each arm runs with a few seeds (the same seeds for every arm). Seed-to-seed spread is estimated
once per metric, pooled over every arm (a pooled standard deviation with Σ(nᵢ − 1) degrees of
freedom), so two seeds per arm still give a usable interval: with 10 arms of 2 seeds, 10 degrees
of freedom. The 95% interval of an arm's mean is mean ± t·s/√n; of a difference of two arms,
mean₁ − mean₂ ± t·s·√(1/n₁ + 1/n₂).

Verdicts, for a claim that arms score in a given order: *reproduced* when every consecutive
difference's interval lies above 0, *not reproduced* when some interval lies below 0, and
*inconclusive* otherwise. For a claim of no difference (the connector): *reproduced* when every
difference's interval lies within ±margin of the reference arm's mean, *not reproduced* when one
excludes 0 and its mean is beyond the margin, *inconclusive* otherwise.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

from mm1.ablate.findings import Claim, Finding

# two-sided 95% quantiles of Student's t, df 1..30; the normal quantile beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.960


def pooled_sd(groups: list[list[float]]) -> tuple[float, int]:
    """(pooled standard deviation, degrees of freedom) of several groups' values."""
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    if df == 0:
        return math.nan, 0
    ss = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    return math.sqrt(ss / df), df


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its 95% t-interval over seeds."""
    mean: float
    half: float  # half-width of the 95% interval (inf with a single seed)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half:.3f}" if math.isfinite(self.half) else f"{self.mean:.3f} (one seed)"


def mean_interval(values: list[float], sd: float, df: int) -> Interval:
    half = t975(df) * sd / math.sqrt(len(values)) if df and math.isfinite(sd) else math.inf
    return Interval(statistics.fmean(values), half)


def diff_interval(a: list[float], b: list[float], sd: float, df: int) -> Interval:
    half = t975(df) * sd * math.sqrt(1 / len(a) + 1 / len(b)) if df and math.isfinite(sd) else math.inf
    return Interval(statistics.fmean(a) - statistics.fmean(b), half)


@dataclass(frozen=True)
class Verdict:
    """A finding's outcome, with the differences (and their intervals) it was decided on."""
    outcome: str  # "reproduced", "not reproduced" or "inconclusive"
    comparisons: tuple[tuple[str, str, Interval], ...]  # (arm, other arm, difference on the judged scale)
    margin: float = 0.0


def judged(finding: Finding, values: list[float]) -> list[float]:
    """Values on the scale the finding is judged on: higher is better (log and sign as its metric says)."""
    m = finding.metric
    out = [math.log(v) for v in values] if m.log else list(values)
    return [-v for v in out] if m.lower_is_better else out


def verdict(finding: Finding, scores: dict[str, list[float]], sd: float, df: int) -> Verdict:
    """`scores`: arm → its seeds' values on the judged scale; `sd`, `df` pooled on that scale."""
    arms = finding.arms
    if finding.claim == Claim.EQUIVALENT:
        ref = arms[0]
        margin = finding.margin * abs(statistics.fmean(scores[ref]))
        pairs = tuple((a, ref, diff_interval(scores[a], scores[ref], sd, df)) for a in arms[1:])
        if all(-margin <= d.low and d.high <= margin for _, _, d in pairs):
            outcome = "reproduced"
        elif any((d.low > 0 or d.high < 0) and abs(d.mean) > margin for _, _, d in pairs):
            outcome = "not reproduced"
        else:
            outcome = "inconclusive"
        return Verdict(outcome, pairs, margin)
    pairs = tuple((a, b, diff_interval(scores[a], scores[b], sd, df)) for a, b in itertools.pairwise(arms))
    if all(d.low > 0 for _, _, d in pairs):
        outcome = "reproduced"
    elif any(d.high < 0 for _, _, d in pairs):
        outcome = "not reproduced"
    else:
        outcome = "inconclusive"
    return Verdict(outcome, pairs)


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties share their mean rank)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan
