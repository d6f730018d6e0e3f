"""Curves as vector (SVG) figures: mean over seeds with a ±1 std band."""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from contract.files import write_atomic  # noqa: E402

plt.rcParams.update({
    "svg.fonttype": "none",  # keep text as text: searchable in the PDF
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "tb-lab-report",
})


RASTER_POINTS = 500


@dataclass
class Series:
    label: str
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None = None
    n: int = 1


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
    """Mean and std over `runs` at each step (steps that all runs share)."""
    df = scalars[(scalars["run"].isin(runs)) & (scalars["split"] == split) & (scalars["tag"] == tag)]
    if df.empty:
        return None
    wide = df.pivot_table(index="step", columns="run", values="value", aggfunc="last")
    wide = wide.dropna()
    if wide.empty:
        return None
    mean = wide.mean(axis=1).to_numpy()
    std = wide.std(axis=1, ddof=1).to_numpy() if wide.shape[1] > 1 else None
    x = wide.index.to_numpy(dtype=float) * x_scale + x_offset
    return Series(label, x, mean, std, n=wide.shape[1])


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
                h.update(json.dumps([s.label, s.n, s.std is not None]).encode())
                for array in (s.x, s.mean, s.std):
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
                title: str | None = None, size=(6.0, 2.8), cache: FigureCache | None = None) -> str:
    """An SVG document (text) of the curves."""
    return panels_figure([(series, xlabel, ylabel)], smoothing=smoothing, title=title, size=size, cache=cache)


def panels_figure(panels: list[tuple[list[Series], str, str]], *, smoothing: float = 0.0,
                  title: str | None = None, size=(6.0, 2.8), cache: FigureCache | None = None) -> str:
    """Side-by-side panels, each (series, xlabel, ylabel), as one SVG document."""
    options = {"smoothing": smoothing, "title": title, "size": list(size)}
    return (cache or FigureCache(None)).get_or_draw(
        panels, options, lambda: _draw(panels, smoothing=smoothing, title=title, size=size))


def _draw(panels, *, smoothing: float, title: str | None, size) -> str:
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    try:
        for ax, (series, xlabel, ylabel) in zip(axes[0], panels):
            for s in series:
                y = smooth(s.mean, smoothing) if smoothing else s.mean
                marker = "o" if len(s.x) <= 30 else None  # a one-epoch curve is a single point
                # Thousands of per-step points as vector paths make the PDF slow to build and
                # to open; such curves are drawn as a 200-dpi image inside the SVG (every
                # point still drawn), while axes and text stay vector.
                raster = len(s.x) > RASTER_POINTS
                (line,) = ax.plot(s.x, y, label=s.label + (f" (n={s.n})" if s.n > 1 else ""), lw=1.2,
                                  marker=marker, ms=3, rasterized=raster)
                if smoothing:
                    ax.plot(s.x, s.mean, color=line.get_color(), alpha=0.18, lw=0.8, rasterized=raster)
                if s.std is not None:
                    ax.fill_between(s.x, s.mean - s.std, s.mean + s.std, color=line.get_color(),
                                    alpha=0.15, lw=0, rasterized=raster)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if series:
                ax.legend(frameon=False, fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None}, dpi=200)
        return buf.getvalue()
    finally:
        plt.close(fig)
