"""Curves as vector (SVG) figures: the mean over seeds with its 95% confidence band.

What is drawn, so that the figures read like TensorBoard's and survive a grey-scale print:

* the band is the 95% t-interval of the mean over seeds at each x (half-width
  t(0.975, n−1)·s/√n, s the sample std), shown only when n ≥ 2;
* each series of a panel has its own colour (Okabe–Ito, colour-blind safe) *and* its own
  line style and marker, so lines are told apart without colour;
* the y-range is taken from the curves after their first steps (see `y_limits`), so an
  early spike does not flatten the rest; what is cut is said by `off_scale_note`, for
  the caption;
* epoch axes tick at whole epochs only.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from contract.files import write_atomic

matplotlib.rcParams.update({
    "svg.fonttype": "none",  # keep text as text: searchable in the PDF
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "tb-lab-report",
})


RASTER_POINTS = 500  # curves longer than this are drawn as an image inside the SVG
MARKER_POINTS = 30   # curves up to this long get a marker at every point
# Okabe & Ito's colour-blind-safe palette (yellow last: it is faint on white).
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000", "#F0E442"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v"]
HEAD_FRACTION = 0.05  # of a long series' x positions, left out of the robust y-range
HEAD_MIN_POINTS = 50  # only series longer than this have a head left out
CUT_RATIO = 1.5       # cut only when the full y-span is more than this times the robust one
PAD = 0.05            # of the span, above and below


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, scipy.stats.t.ppf(p, df)."""
    return float(stats.t.ppf(p, df))


@dataclass
class Series:
    """One curve: the mean over `n` seeds at each x.

    `band` is the half-width of the 95% t-interval of that mean, t(0.975, n−1)·sd/√n
    (None when n < 2); `sd` is the sample std over seeds (ddof=1), kept for readers that
    want the spread itself (`std` is the same, read-only, from when the band was ±1 std).
    """
    label: str
    x: np.ndarray
    mean: np.ndarray
    band: np.ndarray | None = None
    n: int = 1
    sd: np.ndarray | None = None

    @property
    def std(self) -> np.ndarray | None:
        return self.sd


def smooth(values, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average; non-finite points pass through.

    Written out because it must match TensorBoard's scalar dashboard exactly:
    last = last·w + (1−w)·y, shown as last / (1 − w^n) over the n finite points so far.
    """
    out = np.empty(len(values), dtype=float)
    last, n = 0.0, 0
    for i, y in enumerate(values):
        if not math.isfinite(y):
            out[i] = y
            continue
        last = last * weight + (1 - weight) * y
        n += 1
        out[i] = last / (1 - weight ** n) if weight < 1 else last
    return out


def curve(scalars: pd.DataFrame, runs: list[str], split: str, tag: str, *, label: str,
          x_scale: float = 1.0, x_offset: float = 0.0) -> Series | None:
    """Mean over `runs` at each step (steps that all runs share), with its 95% t-interval."""
    df = scalars[(scalars["run"].isin(runs)) & (scalars["split"] == split) & (scalars["tag"] == tag)]
    if df.empty:
        return None
    wide = df.pivot_table(index="step", columns="run", values="value", aggfunc="last")
    wide = wide.dropna()
    if wide.empty:
        return None
    n = wide.shape[1]
    mean = wide.mean(axis=1).to_numpy(dtype=float)
    sd = band = None
    if n > 1:
        sd = wide.std(axis=1, ddof=1).to_numpy(dtype=float)
        band = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    x = wide.index.to_numpy(dtype=float) * x_scale + x_offset
    return Series(label, x, mean, band, n=n, sd=sd)


def _plotted(s: Series, smoothing: float) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The line drawn bold, the lines drawn (bold, and faint raw under a smoothed one), the band's edges.

    With smoothing the band is smoothed the same way as the mean, so it sits around the
    bold line: EMA is linear, so smooth(mean ± band) = smooth(mean) ± smooth(band), and as
    the sample std is a seminorm, smooth(band) is never narrower than the t-interval of
    the smoothed mean itself (a conservative band).
    """
    line = smooth(s.mean, smoothing) if smoothing else np.asarray(s.mean, dtype=float)
    lines = [line, np.asarray(s.mean, dtype=float)] if smoothing else [line]
    band = _band(s, smoothing)
    edges = [] if band is None else [line - band, line + band]
    return line, lines, edges


def _band(s: Series, smoothing: float) -> np.ndarray | None:
    if s.band is None:
        return None
    return smooth(s.band, smoothing) if smoothing else np.asarray(s.band, dtype=float)


def _head(s: Series) -> int:
    """How many leading x positions of `s` are left out of the robust y-range."""
    return math.ceil(HEAD_FRACTION * len(s.x)) if len(s.x) > HEAD_MIN_POINTS else 0


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.3g}"


def _padded(lo: float, hi: float) -> tuple[float, float]:
    span = hi - lo
    pad = PAD * span if span > 0 else max(PAD * abs(hi), PAD)
    return lo - pad, hi + pad


def y_limits(series: list[Series], smoothing: float, *, unit: str = "steps") -> tuple[float, float, str]:
    """The y-limits a panel of `series` is drawn with, and a caption note ("" if nothing is cut).

    Every value drawn (the bold line, the faint raw mean under a smoothed one, both edges
    of each band) is inside the limits, except perhaps an off-scale head: for series of
    more than 50 points the first 5% of x positions are left out of a robust range, and
    when the full range is more than 1.5 times that robust range, the robust range
    (padded 5%) is used and the note says how many of the first points lie outside it and
    how far they reach, e.g. "y-axis cut at 0.85: the first 12 steps (up to 2.95) are
    off-scale". `unit` names the x positions in the note.
    """
    full, robust = [], []
    for s in series:
        _, lines, edges = _plotted(s, smoothing)
        head = _head(s)
        for a in lines + edges:
            full.append(a)
            robust.append(a[head:])

    def extent(arrays):
        vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.empty(0)
        return (float(vals.min()), float(vals.max())) if vals.size else None

    whole, core = extent(full), extent(robust)
    if whole is None:
        return 0.0, 1.0, ""
    if core is None or (whole[1] - whole[0]) <= CUT_RATIO * (core[1] - core[0]):
        return (*_padded(*whole), "")
    lo, hi = _padded(*core)
    off: set[float] = set()  # x values at which some drawn value is off-scale
    far = {True: ([], []), False: ([], [])}  # lines or band edges: values below, above
    for s in series:
        _, lines, edges = _plotted(s, smoothing)
        x = np.asarray(s.x, dtype=float)
        for is_line, arrays in ((True, lines), (False, edges)):
            for a in arrays:
                with np.errstate(invalid="ignore"):
                    out_hi, out_lo = np.isfinite(a) & (a > hi), np.isfinite(a) & (a < lo)
                off.update(x[out_hi | out_lo].tolist())
                far[is_line][0].extend(a[out_lo].tolist())
                far[is_line][1].extend(a[out_hi].tolist())
    # How far the curves go off-scale; the band's edges only where no curve does.
    below = far[True][0] or far[False][0]
    above = far[True][1] or far[False][1]
    if not off:  # padding took the head back in
        return lo, hi, ""
    xs = np.unique(np.concatenate([np.asarray(s.x, dtype=float) for s in series]))
    last = int(np.searchsorted(xs, max(off))) + 1  # off-scale x values are all among the first `last`
    one = unit.removesuffix("s")
    if last == 1:
        which, verb = f"the first {one}", "is"
    elif len(off) == last:
        which, verb = f"the first {last} {unit}", "are"
    else:
        which, verb = f"{len(off)} of the first {last} {unit}", "are"
    if above and below:
        cut, reach = f"to {_fmt(lo)}–{_fmt(hi)}", f"from {_fmt(min(below))} to {_fmt(max(above))}"
    elif above:
        cut, reach = f"at {_fmt(hi)}", f"up to {_fmt(max(above))}"
    else:
        cut, reach = f"at {_fmt(lo)}", f"down to {_fmt(min(below))}"
    return lo, hi, f"y-axis cut {cut}: {which} ({reach}) {verb} off-scale"


def _unit(xlabel: str) -> str:
    return xlabel.split()[0] + "s" if xlabel.split() and xlabel.split()[0] in ("step", "epoch") else "points"


def off_scale_note(panels: list[tuple[list[Series], str, str]], smoothing: float = 0.0) -> str:
    """What the figure of `panels` leaves off-scale, for its caption; "" when nothing.

    Panels are (series, xlabel, ylabel) as for `panels_figure`, and `smoothing` must be the
    one the figure was drawn with. With more than one panel each note is led by its ylabel;
    notes are joined by "; ", with no closing full stop.
    """
    notes = []
    for series, xlabel, ylabel in panels:
        note = y_limits(series, smoothing, unit=_unit(xlabel))[2]
        if note:
            notes.append(f"{ylabel}: {note}" if len(panels) > 1 else note)
    return "; ".join(notes)


class FigureCache:
    """Drawn figures kept between reports, keyed by everything that goes into the drawing.

    Drawing is most of a report's build time; a second report on unchanged (or partly
    changed) logs redraws only figures whose data changed. The key hashes every number
    plotted, every label and option, matplotlib's version and this module's source, so a
    change to any of them draws anew. Entries are plain SVG text, written atomically.
    """

    _code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self.hits = self.misses = 0
        self._used: set[Path] = set()

    def key(self, panels, options: dict) -> str:
        h = hashlib.sha256(json.dumps({"code": self._code, "matplotlib": matplotlib.__version__,
                                       "options": options}, sort_keys=True, default=str).encode())
        for series, xlabel, ylabel in panels:
            h.update(json.dumps([xlabel, ylabel]).encode())
            for s in series:
                h.update(json.dumps([s.label, s.n, s.band is not None]).encode())
                for array in (s.x, s.mean, s.band):
                    if array is not None:
                        h.update(np.ascontiguousarray(array, dtype=float).tobytes())
        return h.hexdigest()[:32]

    def get_or_draw(self, panels, options: dict, draw) -> str:
        if self.folder is None:
            self.misses += 1
            return draw()
        entry = self.folder / f"{self.key(panels, options)}.svg"
        self._used.add(entry)
        try:
            svg = entry.read_text(encoding="utf-8")
            self.hits += 1
            return svg
        except (OSError, UnicodeDecodeError):
            pass
        self.misses += 1
        svg = draw()
        try:
            write_atomic(entry, svg)
        except OSError:
            pass  # a cache that can't be written only costs time next run
        return svg

    def prune(self) -> None:
        """Drop figures this report no longer uses."""
        if self.folder is not None and self.folder.is_dir():
            for entry in self.folder.glob("*.svg"):
                if entry not in self._used:
                    entry.unlink(missing_ok=True)


def line_figure(series: list[Series], *, xlabel: str, ylabel: str, smoothing: float = 0.0,
                title: str | None = None, size=(6.0, 2.8), cache: FigureCache | None = None,
                integer_x: bool | None = None) -> str:
    """An SVG document (text) of the curves; see `panels_figure`."""
    return panels_figure([(series, xlabel, ylabel)], smoothing=smoothing, title=title, size=size, cache=cache,
                         integer_x=integer_x)


def panels_figure(panels: list[tuple[list[Series], str, str]], *, smoothing: float = 0.0,
                  title: str | None = None, size=(6.0, 2.8), cache: FigureCache | None = None,
                  integer_x: bool | None = None) -> str:
    """Side-by-side panels, each (series, xlabel, ylabel), as one SVG document.

    `integer_x`: tick the x-axis at whole numbers only; None (the default) does so for
    panels whose xlabel is "epoch". The y-range may leave the first steps off-scale;
    `off_scale_note(panels, smoothing)` gives the words for the caption.
    """
    options = {"smoothing": smoothing, "title": title, "size": list(size), "integer_x": integer_x}
    return (cache or FigureCache(None)).get_or_draw(
        panels, options, lambda: _draw(panels, smoothing=smoothing, title=title, size=size, integer_x=integer_x))


def style(i: int) -> dict:
    """Colour, line style and marker of the i-th series of a panel (the same i, the same look)."""
    return {"color": COLOURS[i % len(COLOURS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def _is_integer_x(xlabel: str, integer_x: bool | None) -> bool:
    return integer_x if integer_x is not None else xlabel.strip().lower() == "epoch"


def draw_figure(panels: list[tuple[list[Series], str, str]], *, smoothing: float = 0.0,
                title: str | None = None, size=(6.0, 2.8), integer_x: bool | None = None) -> Figure:
    """The matplotlib Figure of `panels` (what `panels_figure` saves as SVG)."""
    fig = Figure(figsize=size)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (series, xlabel, ylabel) in zip(axes[0], panels):
        for i, s in enumerate(series):
            look = style(i)
            line_y, _, _ = _plotted(s, smoothing)
            band = _band(s, smoothing)
            # Thousands of per-step points as vector paths make the PDF slow to build and
            # to open; such curves are drawn as a 200-dpi image inside the SVG (every
            # point still drawn), while axes and text stay vector.
            raster = len(s.x) > RASTER_POINTS
            if len(s.x) <= MARKER_POINTS:  # a one-epoch curve is a single point
                markevery = None
            else:  # a few markers, staggered between series, so the legend shows them too
                step = max(1, len(s.x) // 8)
                markevery = (i * step // len(MARKERS) % step, step)
            ax.plot(s.x, line_y, label=s.label + (f" (n={s.n})" if s.n > 1 else ""), lw=1.4,
                    ms=3.5, markevery=markevery, rasterized=raster, zorder=3, **look)
            if smoothing:
                ax.plot(s.x, s.mean, color=look["color"], alpha=0.2, lw=0.7, rasterized=raster, zorder=2)
            if band is not None:
                ax.fill_between(s.x, line_y - band, line_y + band, color=look["color"], alpha=0.15, lw=0,
                                rasterized=raster, zorder=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        xs = np.unique(np.concatenate([np.asarray(s.x, dtype=float) for s in series])) if series else np.empty(0)
        xs = xs[np.isfinite(xs)]
        integer = _is_integer_x(xlabel, integer_x)
        if integer:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if xs.size == 1:  # one x (a one-epoch run): one tick, with room either side
            x0 = float(xs[0])
            half = 0.5 if integer else max(0.5, 0.05 * abs(x0))
            ax.set_xlim(x0 - half, x0 + half)
            ax.set_xticks([x0])
        if series:
            lo, hi, _ = y_limits(series, smoothing, unit=_unit(xlabel))
            ax.set_ylim(lo, hi)
            _legend(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Where no spot inside the axes is free of the lines' points (a wide legend over a
    # one-epoch panel, say), the legend goes outside, to the right.
    moved = False
    fig.draw_without_rendering()
    for ax, (series, _, _) in zip(axes[0], panels):
        legend = ax.get_legend()
        if legend is not None and _covers_points(ax, legend):
            legend.remove()
            _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
            moved = True
    if moved:
        fig.tight_layout()
    return fig


def _legend(ax, **where):
    return ax.legend(frameon=True, framealpha=0.85, edgecolor="none", fontsize=8, handlelength=3.2, **where)


def _covers_points(ax, legend) -> bool:
    """Whether the legend's box hides a point of one of the bold lines (their markers' size in)."""
    box = legend.get_window_extent().padded(4)
    for line in ax.get_lines():
        if line.get_label().startswith("_"):
            continue  # the faint raw line has no label
        xy = line.get_transform().transform(line.get_xydata())
        if box.count_contains(xy[np.isfinite(xy).all(axis=1)]):
            return True
    return False


def figure_svg(fig: Figure) -> str:
    """`fig` as SVG text; the same figure gives the same text (no date, fixed hash salt)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, dpi=200)
    return buf.getvalue()


def _draw(panels, *, smoothing: float, title: str | None, size, integer_x: bool | None = None) -> str:
    return figure_svg(draw_figure(panels, smoothing=smoothing, title=title, size=size, integer_x=integer_x))
