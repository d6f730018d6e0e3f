"""The critical batch size from the training curves: steps and examples to reach target
training losses per batch size, the fit S = S_min + E_min/B, its bootstrap over seeds,
and the model-free 20% check. Pure functions on arrays and DataFrames; nothing is drawn
or written here (report/gradient.py lays the results out).

* A run has reached a loss when the mean of its step losses over the last
  ⌈WINDOW_EXAMPLES / B⌉ steps (about 2,048 examples) is at or below it, so one lucky
  small-batch step does not count. Steps are the logged global steps (1 = after the
  first update); S(B) is that step, E(B) = S(B)·B the examples seen by then.
* McCandlish et al. 2018 (eq. 2.11): S/S_min − 1 = (E/E_min − 1)^−1 with E = S·B,
  which is S = S_min + E_min/B, linear in 1/B. It is fitted to each batch size's mean S
  by least squares on relative residuals (each batch size counts in proportion to its
  own steps, so the small batches' thousands of steps do not swamp the large batches'
  hundreds): minimise Σ ((S_i − S_min − E_min/B_i) / S_i)². B_crit = E_min / S_min:
  the batch size at which S = 2·S_min and E = 2·E_min.
* Intervals of the fit are percentile bootstrap intervals: seeds are resampled with
  replacement within each batch size (a seeded generator, RESAMPLES draws), the means
  and the fit recomputed; the bounds are the 2.5% and 97.5% order statistics (no
  interpolation, so an infinite B_crit in a draw, S_min ≤ 0, gives an open bound).
* Zhang et al. 2025: the batch size at which the steps exceed perfect linear scaling
  from the smallest batch B0, S(B0)·B0/B, by 20%, i.e. E(B)/E(B0) = 1.2; interpolated
  linearly in log2 B between the batch sizes around the first crossing, inf when no
  batch size of the grid crosses. Under eq. 2.11 this is 1.2·B0 + 0.2·B_crit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from contract.layout import STEP_LOSS, TRAIN
from report.stats import Estimate, estimate

# A run has reached a loss when the mean of its step losses over the last ≈ this many
# examples is at or below it: one noisy small-batch step does not count as reaching it.
WINDOW_EXAMPLES = 2048
TARGETS = 4          # target losses chosen from the data
TARGET_SPAN = 1.5    # the highest target is this times the lowest (at most the first-step loss)
RESAMPLES = 1000     # bootstrap draws
OVERHEAD = 0.2       # Zhang et al.'s excess over linear scaling
MIN_BATCHES = 3      # batch sizes needed to fit two parameters and leave a residual
LEVEL = 0.95

NOISE_DOMINATED = "noise-dominated steps"
DIMINISHING = "diminishing returns per example"
NOT_RESOLVED = "not resolved"


# -- reaching a target ---------------------------------------------------------------------

def window(batch_size: int) -> int:
    return max(1, math.ceil(WINDOW_EXAMPLES / batch_size))


def windowed_loss(steps: np.ndarray, losses: np.ndarray, batch_size: int) -> np.ndarray:
    """Trailing mean over ⌈WINDOW_EXAMPLES / batch⌉ steps (fewer at the very start)."""
    w = window(batch_size)
    c = np.cumsum(np.insert(np.asarray(losses, dtype=float), 0, 0.0))
    idx = np.arange(1, len(losses) + 1)
    start = np.maximum(idx - w, 0)
    return (c[idx] - c[start]) / (idx - start)


def step_losses(scalars: pd.DataFrame, run: str) -> tuple[np.ndarray, np.ndarray]:
    df = scalars[(scalars["run"] == run) & (scalars["split"] == TRAIN) & (scalars["tag"] == STEP_LOSS)]
    df = df.sort_values("step")
    return df["step"].to_numpy(dtype=int), df["value"].to_numpy(dtype=float)


def first_reach(steps: np.ndarray, windowed: np.ndarray, target: float) -> int | None:
    """The first step whose windowed loss is at or below `target`, or None."""
    reached = np.flatnonzero(windowed <= target)
    return int(steps[reached[0]]) if len(reached) else None


def steps_to_target(scalars: pd.DataFrame, run: str, batch_size: int, target: float) -> int | None:
    steps, losses = step_losses(scalars, run)
    if not len(steps):
        return None
    return first_reach(steps, windowed_loss(steps, losses, batch_size), target)


def final_windowed_loss(scalars: pd.DataFrame, run: str, batch_size: int) -> float | None:
    steps, losses = step_losses(scalars, run)
    return float(windowed_loss(steps, losses, batch_size)[-1]) if len(steps) else None


def round_up(x: float, digits: int = 3) -> float:
    """`x` rounded up to `digits` significant digits (so a level derived from a loss
    every run reached is still reached)."""
    if not (math.isfinite(x) and x > 0):
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(round(x / scale, 9)) * scale:.{digits}g}")


def default_target(scalars: pd.DataFrame, runs: dict[str, int]) -> float | None:
    """The highest final (windowed) training loss among the runs, rounded up to 3
    significant digits: a level every run reached."""
    finals = [v for run, bs in runs.items() if (v := final_windowed_loss(scalars, run, bs)) is not None
              and math.isfinite(v)]
    return round_up(max(finals)) if finals else None


def loss_range(scalars: pd.DataFrame, runs: dict[str, int]) -> tuple[float, float] | None:
    """(the highest final windowed loss, the lowest first-step loss) over the runs: the
    levels between them are reached by every run, and none at its first step."""
    finals, firsts = [], []
    for run, bs in runs.items():
        steps, losses = step_losses(scalars, run)
        if len(steps) and np.isfinite(losses).all():
            finals.append(float(windowed_loss(steps, losses, bs)[-1]))
            firsts.append(float(losses[0]))
    return (max(finals), min(firsts)) if finals else None


def target_levels(lowest: float, count: int = TARGETS, span: float = TARGET_SPAN,
                  ceiling: float | None = None) -> list[float]:
    """Up to `count` losses evenly spaced in log loss from `lowest` rounded up to 3
    significant digits (L) to span·L, or to `ceiling` if that is lower, the others rounded
    to 3 significant digits; only those below `ceiling` are kept (L always); lowest first."""
    low = round_up(lowest)
    top = low * span if ceiling is None else min(low * span, ceiling)
    if count <= 1 or top <= low:
        return [low]
    levels = [low] + [float(f"{low * (top / low) ** (k / (count - 1)):.3g}") for k in range(1, count)]
    return sorted({x for x in levels if x >= low and (ceiling is None or x < ceiling or x == low)})


def reach_table(scalars: pd.DataFrame, runs: dict[str, int], targets: list[float]) -> pd.DataFrame:
    """One row per run and target: run, batch_size, target, steps (NaN when not reached),
    examples = steps·batch_size. Each run's windowed loss is computed once."""
    rows = []
    for run, bs in runs.items():
        steps, losses = step_losses(scalars, run)
        w = windowed_loss(steps, losses, bs) if len(steps) else np.empty(0)
        for target in targets:
            s = first_reach(steps, w, target) if len(steps) else None
            rows.append({"run": run, "batch_size": int(bs), "target": float(target),
                         "steps": math.nan if s is None else float(s),
                         "examples": math.nan if s is None else float(s * bs)})
    return pd.DataFrame(rows, columns=["run", "batch_size", "target", "steps", "examples"])


# -- the fit S = S_min + E_min / B ---------------------------------------------------------

def fit_pareto(batch, steps) -> tuple[np.ndarray, np.ndarray]:
    """Least squares on relative residuals of S = S_min + E_min/B.

    `batch`: k batch sizes; `steps`: k mean steps, or an (R, k) array of R sets of them
    (bootstrap draws), fitted row by row. Returns (S_min, E_min), scalars or R-arrays.
    Minimises Σ ((S_i − S_min − E_min/B_i)/S_i)²: the 2×2 normal equations with weights
    1/S_i², solved in closed form so that all draws are fitted at once.
    """
    x = 1.0 / np.asarray(batch, dtype=float)
    y = np.atleast_2d(np.asarray(steps, dtype=float))
    w = 1.0 / y ** 2
    sw, sx, sxx = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
    sy, sxy = (w * y).sum(1), (w * x * y).sum(1)
    det = sw * sxx - sx ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        e_min = (sw * sxy - sx * sy) / det
        s_min = (sy - e_min * sx) / sw
    if np.ndim(steps) == 1:
        return float(s_min[0]), float(e_min[0])
    return s_min, e_min


def critical_batch(s_min, e_min):
    """B_crit = E_min / S_min: inf when S_min ≤ 0 < E_min (the fit sees no floor on the
    steps, so perfect scaling throughout), 0 when E_min ≤ 0 < S_min (no gain from a
    larger batch), NaN when both are ≤ 0."""
    s, e = np.asarray(s_min, dtype=float), np.asarray(e_min, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((s > 0) & (e > 0), e / s, np.nan)
    out = np.where((s <= 0) & (e > 0), np.inf, out)
    out = np.where((e <= 0) & (s > 0), 0.0, out)
    return float(out) if out.ndim == 0 else out


def zhang_batch(batch, steps, overhead: float = OVERHEAD):
    """The batch size at which S(B) first exceeds S(B0)·B0/B by `overhead` (B0 the
    smallest batch): the first crossing of E(B)/E(B0) = 1 + overhead, interpolated
    linearly in log2 B; inf when no batch size of the grid crosses.

    `steps` as for `fit_pareto` (k values, or R rows of k); batch sizes ascending.
    """
    b = np.asarray(batch, dtype=float)
    y = np.atleast_2d(np.asarray(steps, dtype=float))
    ratio = y * b / (y[:, :1] * b[0])
    over = ratio >= 1 + overhead
    first = np.where(over.any(1), over.argmax(1), -1)
    out = np.full(len(y), np.inf)
    lb = np.log2(b)
    for r in np.flatnonzero(first > 0):  # first == 0 cannot happen: ratio is 1 at B0
        i = first[r]
        t = (1 + overhead - ratio[r, i - 1]) / (ratio[r, i] - ratio[r, i - 1])
        out[r] = 2 ** (lb[i - 1] + t * (lb[i] - lb[i - 1]))
    return float(out[0]) if np.ndim(steps) == 1 else out


@dataclass
class Interval:
    low: float = math.nan
    high: float = math.nan

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def percentile_interval(values, level: float = LEVEL) -> Interval:
    """The (1−level)/2 and (1+level)/2 order statistics of the finite-or-infinite values
    (NaN draws dropped); no interpolation, so infinite draws give an infinite bound."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return Interval()
    a = (1 - level) / 2
    return Interval(float(np.quantile(v, a, method="lower")), float(np.quantile(v, 1 - a, method="higher")))


@dataclass
class Critical:
    """One target's fit over batch sizes: the per-batch estimates over seeds, the point
    fit and its bootstrap intervals (undefined when any batch size has a single seed)."""

    target: float
    batch: list[int]                          # batch sizes in the fit, ascending
    steps: dict[int, Estimate]                # batch → mean steps over the seeds that reached
    examples: dict[int, Estimate]             # batch → mean examples
    s_min: float = math.nan
    e_min: float = math.nan
    b_crit: float = math.nan
    zhang: float = math.nan
    s_min_ci: Interval = field(default_factory=Interval)
    e_min_ci: Interval = field(default_factory=Interval)
    b_crit_ci: Interval = field(default_factory=Interval)
    zhang_ci: Interval = field(default_factory=Interval)
    resamples: int = 0

    @property
    def fitted(self) -> bool:
        return len(self.batch) >= MIN_BATCHES and math.isfinite(self.s_min) and math.isfinite(self.e_min)


def critical(per_batch: dict[int, list[float]], target: float, *, resamples: int = RESAMPLES,
             seed: int = 0) -> Critical:
    """Fit S = S_min + E_min/B to the steps each batch size took (one value per seed that
    reached `target`; NaN or an empty list for none), with percentile-bootstrap intervals
    from resampling the seeds within each batch size (`seed` seeds the generator)."""
    values = {int(b): np.asarray([x for x in v if math.isfinite(x)], dtype=float) for b, v in per_batch.items()}
    values = {b: v for b, v in sorted(values.items()) if len(v)}
    batch = list(values)
    out = Critical(target, batch, {b: estimate(v) for b, v in values.items()},
                   {b: estimate(v * b) for b, v in values.items()})
    if len(batch) < MIN_BATCHES:
        return out
    means = np.array([v.mean() for v in values.values()])
    out.s_min, out.e_min = fit_pareto(batch, means)
    out.b_crit = critical_batch(out.s_min, out.e_min)
    out.zhang = zhang_batch(batch, means)
    if resamples and all(len(v) > 1 for v in values.values()):
        rng = np.random.default_rng(seed)
        draws = np.column_stack([v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
                                 for v in values.values()])
        s, e = fit_pareto(batch, draws)
        out.s_min_ci, out.e_min_ci = percentile_interval(s), percentile_interval(e)
        out.b_crit_ci = percentile_interval(critical_batch(s, e))
        out.zhang_ci = percentile_interval(zhang_batch(batch, draws))
        out.resamples = resamples
    return out


def pareto_curve(c: Critical, points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(E, S) along the fitted curve over the batch sizes fitted (log-spaced), for a figure."""
    if not c.fitted:
        return np.empty(0), np.empty(0)
    b = np.geomspace(min(c.batch), max(c.batch), points)
    s = c.s_min + c.e_min / b
    return s * b, s


# -- the noise-scale verdict ----------------------------------------------------------------

def verdict(low: float, high: float, batch: int) -> str:
    """What an interval [low, high] of B_simple says at batch size `batch`: each step's
    gradient is noise-dominated when the whole interval lies above 2·batch (a larger
    batch would still cut the steps almost in proportion), returns per example diminish
    when it lies below batch/2 (the batch already averages most noise away); otherwise,
    or with no interval, not resolved."""
    if math.isnan(low) or math.isnan(high):
        return NOT_RESOLVED
    if low > 2 * batch:
        return NOISE_DOMINATED
    if high < batch / 2:
        return DIMINISHING
    return NOT_RESOLVED
