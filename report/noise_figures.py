"""The gradient-noise section's figures: B_simple against examples seen (log scale, 95%
bands over seeds) and the steps–examples (Pareto) curves with their fitted
S = S_min + E_min/B. Split from report/gradient.py, which lays the section out."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter
from scipy import stats

from contract.layout import NOISE_B_SIMPLE, TRAIN, noise_tag
from report import critical as crit
from report.build import PRETTY_INIT
from report.figures import COLOURS, FigureCache, Series, draw_figure, figure_svg, style

# Drawn figures are cached by their data and this code: a change here draws anew.
_CODE = hashlib.sha256(Path(__file__).read_bytes() + Path(crit.__file__).read_bytes()).hexdigest()[:16]


def num(x: float) -> str:
    """3 significant digits, thousands as 4-digit integers, larger as k/M: 608, 4690, 30.9k."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.3g}M"
    if a >= 1e4:
        return f"{x / 1e3:.3g}k"
    if a >= 1e3:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _bn(bn) -> str:
    return "—" if bn is None else ("on" if bn else "off")


def _short(key: dict) -> str:
    """'Glorot normal': a setting's name short enough for a compact table's first column."""
    return ", ".join(PRETTY_INIT.get(v, str(v)).replace("Xavier (Glorot)", "Glorot") if k == "initializer"
                     else f"{k.replace('_', ' ')} {v}" for k, v in key.items())


def _log_curve(scalars: pd.DataFrame, runs: list[str], tag: str, label: str, x_scale: float) -> Series | None:
    """The mean of log10 of a positive tag over the runs (a geometric mean) at each step,
    with its 95% t-band. B_simple is undefined at a measurement whose averaged |G|² is not
    positive, so a step's mean is over the runs that have a value there; steps where fewer
    than min(2, runs) have one are left out. `n` is the most runs at any step."""
    df = scalars[(scalars["run"].isin(runs)) & (scalars["split"] == TRAIN) & (scalars["tag"] == tag)]
    df = df[np.isfinite(df["value"].to_numpy(dtype=float)) & (df["value"].to_numpy(dtype=float) > 0)]
    if df.empty:
        return None
    wide = np.log10(df.pivot_table(index="step", columns="run", values="value", aggfunc="last"))
    count = wide.notna().sum(axis=1)
    wide = wide[count >= min(2, wide.shape[1])]
    if wide.empty:
        return None
    count = wide.notna().sum(axis=1).to_numpy()
    mean = wide.mean(axis=1).to_numpy(dtype=float)
    band = None
    if count.max() > 1:
        sd = wide.std(axis=1, ddof=1).to_numpy(dtype=float)
        band = np.array([stats.t.ppf(0.975, k - 1) * d / math.sqrt(k) if k > 1 else 0.0
                         for k, d in zip(count, sd)])
    return Series(label, wide.index.to_numpy(dtype=float) * x_scale, mean, band, n=int(count.max()))


def _log_ticks(ax, lo: float, hi: float) -> None:
    """Ticks at 1, 2, 5 × 10^k (or 10^k alone when those are many) of a log10 axis."""
    from matplotlib.ticker import FixedLocator

    decades = range(math.floor(lo), math.ceil(hi) + 1)
    ticks = [d + math.log10(m) for d in decades for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) > 8 or len(ticks) < 2:
        ticks = [t for t in (float(d) for d in decades) if lo <= t <= hi] or ticks
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: num(10 ** y)))


def b_simple_figure(builder, sec, key: dict) -> None:
    logs = builder.logs
    panels = []
    for bn in builder.bn_values:
        series = []
        for bs in builder.batch_sizes:
            if bs is None:
                continue
            where = {**key, "batch_size": bs, **({"batch_norm": bn} if bn is not None else {})}
            s = _log_curve(logs.scalars, builder.runs_where(where), noise_tag(NOISE_B_SIMPLE), f"batch {bs}", bs)
            if s:
                series.append(s)
        if series:
            panels.append((series, "examples seen" + ("" if bn is None else f" (BN {_bn(bn)})"), "B_simple"))
    if not panels:
        return
    size = (6.0, 2.4) if len(panels) == 1 else (7.0, 2.5)

    def draw():
        fig = draw_figure(panels, size=size)
        for ax, (series, _, _) in zip(fig.axes, panels):
            lo, hi = _log_limits(series)
            ax.set_ylim(lo, hi)
            _log_ticks(ax, lo, hi)
        return figure_svg(fig)

    svg = (builder.figure_cache or FigureCache(None)).get_or_draw(
        panels, {"kind": NOISE_B_SIMPLE, "code": _CODE, "size": list(size)}, draw)
    title = f", {builder.section_title(key)}" if key else ""
    n = max(s.n for series, _, _ in panels for s in series)
    cut = any(_log_limits(series, cut=True) for series, _, _ in panels)
    builder.doc.figure(sec, f"Gradient noise scale B_simple over training{title}, against examples seen (steps × "
                            f"batch size), log scale: the geometric mean over seeds" + (
                                "; band: 95% t-interval of the mean of log B_simple over seeds; where a seed has "
                                "no B_simple (its averaged |G|² not positive) the mean is over those that have one"
                                if n > 1 else "") + (
                                f"; bands reaching more than {BAND_REACH:g} decade beyond the lines are cut at "
                                "the axes" if cut else ""), svg)


BAND_REACH = 0.5  # decades of log10 B_simple that a band may add to the lines' range


def _log_limits(series, *, cut: bool = False):
    """y-limits (log10) of a B_simple panel: the lines' range, widened by the bands up to
    BAND_REACH decades each way, padded 5%; with `cut`, whether some band was cut."""
    means = np.concatenate([s.mean for s in series])
    means = means[np.isfinite(means)]
    edges = np.concatenate([means] + [np.concatenate([s.mean - s.band, s.mean + s.band]) for s in series
                                      if s.band is not None])
    edges = edges[np.isfinite(edges)]
    lo = max(float(edges.min()), float(means.min()) - BAND_REACH)
    hi = min(float(edges.max()), float(means.max()) + BAND_REACH)
    if cut:
        return bool(edges.min() < lo or edges.max() > hi)
    pad = 0.05 * (hi - lo) if hi > lo else 0.1
    return lo - pad, hi + pad


def pareto_figure(builder, sec, keys: list[dict], fits: dict, targets: list[float]) -> None:
    """Steps against examples per target (log-log): each batch size's mean with its 95%
    t-interval over seeds, the fitted S = S_min + E_min/B, and (2·E_min, 2·S_min)."""
    grid = [(key, bn) for key in keys for bn in builder.bn_values]
    if not any(fits.get((builder.slug(k), bn, t)) and fits[builder.slug(k), bn, t].fitted
               for k, bn in grid for t in targets):
        return
    rows, cols = len(keys), len(builder.bn_values)
    size = (7.0, 0.5 + 1.8 * rows)
    payload = []
    for key, bn in grid:
        for t in targets:
            c = fits.get((builder.slug(key), bn, t))
            if c is None:
                continue
            payload.append([_short(key), str(bn), t, c.batch, [c.examples[b].mean for b in c.batch],
                            [c.steps[b].mean for b in c.batch], [c.steps[b].half for b in c.batch],
                            c.s_min, c.e_min])

    def draw():
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, NullFormatter

        fig = Figure(figsize=size)
        axes = fig.subplots(rows, cols, squeeze=False)
        for (key, bn), ax in zip(grid, axes.flat):
            for i, t in enumerate(targets):
                c = fits.get((builder.slug(key), bn, t))
                if c is None or not c.batch:
                    continue
                look = style(i)
                e = np.array([c.examples[b].mean for b in c.batch])
                s = np.array([c.steps[b].mean for b in c.batch])
                half = np.array([c.steps[b].half for b in c.batch])
                err = None if np.isnan(half).all() else np.nan_to_num(half)
                ax.errorbar(e, s, yerr=err, xerr=None if err is None else err * np.array(c.batch),
                            color=look["color"], marker=look["marker"], ms=3.5, lw=0, elinewidth=0.8,
                            capsize=1.5, label=f"loss {t:g}", zorder=3)
                if c.fitted:
                    fe, fs = crit.pareto_curve(c)
                    ax.plot(fe, fs, color=look["color"], linestyle=look["linestyle"], lw=1.0, zorder=2)
                    if 0 < c.b_crit < math.inf:
                        ax.plot([2 * c.e_min], [2 * c.s_min], marker="x", color=COLOURS[6], ms=5, lw=0,
                                zorder=4, label="(2·E_min, 2·S_min)" if i == 0 else None)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
                axis.set_minor_formatter(NullFormatter())
            ax.set_title(", ".join(p for p in (_short(key), None if bn is None else f"BN {_bn(bn)}") if p),
                         fontsize=8)
            ax.set_xlabel("examples E to the target")
            ax.set_ylabel("steps S")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        top = 1.0
        if handles:
            fig.legend(handles, labels, loc="upper center", ncol=len(handles), fontsize=7, frameon=False)
            top = 1 - 0.3 / size[1]
        fig.tight_layout(rect=(0, 0, 1, top))
        return figure_svg(fig)

    svg = (builder.figure_cache or FigureCache(None)).get_or_draw(
        [], {"kind": "pareto", "code": _CODE, "size": list(size), "data": payload}, draw)
    builder.doc.figure(sec, "Steps against examples to each target training loss (log-log): one point per batch "
                            "size (smallest batch top left), mean over seeds with its 95% t-interval; lines: the "
                            "fitted S = S_min + E_min/B; ×: (2·E_min, 2·S_min), where the batch size is B_crit",
                       svg)


# -- the critical batch size -----------------------------------------------------------------
