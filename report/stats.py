"""Intervals and tests over seeds: the numbers behind every ± and every claimed direction.

Every interval is a 95% Student-t interval (scipy.stats.t); paired comparisons use
scipy.stats.ttest_rel, trends scipy.stats.linregress against log2(batch size). A
section's comparisons are one family whose error rate is held at 5% by Holm's step-down
adjustment; a direction is claimed only when the adjusted p-value is below 0.05, which
implies that the interval of the difference excludes zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL
# Logged scalars are float32 (relative precision ≈ 1.2e-7): spreads below this fraction of
# the values are rounding, not data.
ROUNDING = 1e-6


def _t(df: int) -> float:
    return float(stats.t.ppf(1 - ALPHA / 2, df))


@dataclass
class Estimate:
    """Mean of n values with the 95% t-interval of the mean (nan bounds for n < 2)."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0

    @property
    def half(self) -> float:
        if self.n < 2 or not math.isfinite(self.std):
            return math.nan
        return _t(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def estimate(values) -> Estimate:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if not len(v):
        return Estimate()
    return Estimate(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v))


@dataclass
class Comparison:
    """One tested difference: `diff` is b − a (paired) or a slope; `p_adj` is set by holm()."""

    what: str                  # e.g. "final epoch validation loss"
    label: str                 # the contrast, e.g. "batch norm at batch size 256"
    kind: str                  # "paired" | "slope"
    diff: float
    low: float
    high: float
    n: int
    p: float
    baseline: float            # the mean the difference is relative to (for ranking by size)
    where: str = ""            # "Table 7", filled in by the builder
    p_adj: float = math.nan
    family: int = 1            # comparisons in the family the adjustment ran over
    extra: dict = field(default_factory=dict)

    @property
    def tested(self) -> bool:
        return self.n >= (2 if self.kind == "paired" else 3) and math.isfinite(self.p)

    @property
    def resolved(self) -> bool:
        return self.tested and math.isfinite(self.p_adj) and self.p_adj < ALPHA

    @property
    def relative(self) -> float:
        """|difference| as a fraction of the baseline, for ranking effects of different units."""
        return abs(self.diff) / abs(self.baseline) if self.baseline else abs(self.diff)


def paired(a: dict, b: dict, *, what: str, label: str) -> Comparison | None:
    """b − a over the keys (seeds) both have; None when no key is shared."""
    keys = sorted(k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k]))
    if not keys:
        return None
    x = np.array([a[k] for k in keys], dtype=float)
    y = np.array([b[k] for k in keys], dtype=float)
    d = y - x
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return Comparison(what, label, "paired", mean, math.nan, math.nan, n, math.nan, float(x.mean()))
    sd = float(d.std(ddof=1))
    if sd <= ROUNDING * float(np.abs(np.concatenate([x, y])).max()):
        # Identical differences in every pair, up to the float32 rounding of logged values:
        # the t statistic is undefined or meaningless; nothing is tested.
        return Comparison(what, label, "paired", mean, mean, mean, n, math.nan, float(x.mean()))
    half = _t(n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(y, x).pvalue)
    return Comparison(what, label, "paired", mean, mean - half, mean + half, n, p, float(x.mean()))


def slope(points: list[tuple[float, float]], *, what: str, label: str) -> Comparison | None:
    """Least-squares slope of value against log2(x) over every run, with its 95% interval."""
    pts = [(x, y) for x, y in points if x and x > 0 and math.isfinite(y)]
    xs = np.log2([x for x, _ in pts]) if pts else np.array([])
    if len(pts) < 3 or len(set(xs.tolist())) < 2:
        return None
    ys = np.array([y for _, y in pts], dtype=float)
    fit = stats.linregress(xs, ys)
    if len(pts) == len(set(xs.tolist())) or fit.stderr <= ROUNDING * float(np.abs(ys).max()):
        # One run per batch size: the residuals would mix seed noise with any bend of the
        # curve, and the interval would rest on one degree of freedom per extra batch
        # size. Without repeated seeds the slope is shown, not tested.
        return Comparison(what, label, "slope", float(fit.slope), math.nan, math.nan, len(pts), math.nan,
                          float(ys.mean()), extra={"x": sorted({x for x, _ in pts})})
    half = _t(len(pts) - 2) * fit.stderr
    p = float(fit.pvalue) if math.isfinite(fit.pvalue) else math.nan
    return Comparison(what, label, "slope", float(fit.slope), float(fit.slope - half), float(fit.slope + half),
                      len(pts), p, float(ys.mean()), extra={"x": sorted({x for x, _ in pts})})


def holm(comparisons: list[Comparison]) -> None:
    """Set p_adj by Holm's step-down method over the tested comparisons (in place).

    Written out because scipy has no Holm adjustment (only Benjamini–Hochberg, which
    controls a different error rate) and it is four lines: sort the p-values, multiply
    the i-th smallest by (m − i), keep the running maximum, cap at 1.
    """
    tested = [c for c in comparisons if c.tested]
    m = len(tested)
    running = 0.0
    for i, c in enumerate(sorted(tested, key=lambda c: c.p)):
        running = max(running, min(1.0, (m - i) * c.p))
        c.p_adj = running
        c.family = m
