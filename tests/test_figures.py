"""Figures: the 95% t-band, the y-range that an early spike does not flatten, line styles
that survive grey-scale, whole-epoch ticks, deterministic SVG."""
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from report.figures import (FigureCache, Series, curve, draw_figure, line_figure, off_scale_note,
                            panels_figure, y_limits)

def scalars(values: dict[str, list[float]], *, split="train", tag="loss", steps=None) -> pd.DataFrame:
    rows = []
    for run, vs in values.items():
        for i, v in enumerate(vs):
            rows.append({"run": run, "split": split, "tag": tag, "step": (steps or range(len(vs)))[i], "value": v})
    return pd.DataFrame(rows, columns=["run", "split", "tag", "step", "value"])


def test_band_is_the_95_percent_t_interval_of_the_mean_over_seeds():
    values = {"a": [1.0, 2.0, 0.5], "b": [1.5, 2.5, 0.25], "c": [0.7, 3.5, 0.4]}
    s = curve(scalars(values), ["a", "b", "c"], "train", "loss", label="x", x_offset=1)
    assert s.n == 3 and list(s.x) == [1.0, 2.0, 3.0]
    by_step = np.array(list(values.values())).T  # rows: steps, columns: seeds
    for i, seeds in enumerate(by_step):
        mean = sum(seeds) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in seeds) / 2)
        assert s.mean[i] == pytest.approx(mean, abs=1e-12)
        assert s.band[i] == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3), abs=1e-9)
        assert s.sd[i] == s.std[i] == pytest.approx(sd, abs=1e-12)
    # Two seeds: t with one degree of freedom; one seed: no band at all.
    two = curve(scalars(values), ["a", "b"], "train", "loss", label="x")
    assert two.band[0] == pytest.approx(stats.t.ppf(0.975, 1) * abs(1.0 - 1.5) / math.sqrt(2) / math.sqrt(2), abs=1e-9)
    one = curve(scalars(values), ["a"], "train", "loss", label="x")
    assert one.n == 1 and one.band is None and one.std is None


def spiky(n_steps=200, head=6, peak=5.0) -> Series:
    x = np.arange(n_steps, dtype=float)
    mean = 0.5 + 0.05 * np.sin(x / 7)
    mean[:head] = np.linspace(peak, 2.0, head)  # the first steps' spike
    return Series("spike", x, mean, band=np.full(n_steps, 0.02), n=3)


def test_y_limits_cut_an_early_spike_and_say_so():
    s = spiky()
    lo, hi, note = y_limits([s], 0.0)
    assert hi < 1.0  # the spike to 5 does not set the scale
    assert note == f"y-axis cut at {hi:.3g}: the first 6 steps (up to 5) are off-scale"
    # Every point after the head, band edges included, is on the scale.
    assert lo <= (s.mean - s.band)[6:].min() and (s.mean + s.band)[6:].max() <= hi
    # Drawn with those limits.
    ax = draw_figure([([s], "step", "loss")]).axes[0]
    assert ax.get_ylim() == pytest.approx((lo, hi))
    # The caption note of a two-panel figure names the panel; a panel with nothing cut adds nothing.
    flat = Series("flat", np.arange(5.0), np.array([1.0, 1.1, 0.9, 1.0, 1.05]))
    assert off_scale_note([([s], "step", "loss"), ([flat], "epoch", "accuracy")], 0.0) == "loss: " + note


def test_y_limits_cut_on_the_smoothed_curve_when_smoothing():
    s = spiky()
    lo, hi, note = y_limits([s], 0.6)
    # The smoothed line decays from the spike over more steps than the raw one.
    assert hi < 1.0 and re.fullmatch(r"y-axis cut at [0-9.]+: the first \d+ steps \(up to 5\) are off-scale", note)
    assert int(re.search(r"first (\d+)", note).group(1)) > 6


def test_y_limits_do_not_cut_a_flat_series_nor_a_short_one():
    x = np.arange(300, dtype=float)
    flat = Series("flat", x, 0.5 + 0.1 * np.sin(x / 5), band=np.full(300, 0.05), n=3)
    lo, hi, note = y_limits([flat], 0.0)
    assert note == ""
    assert lo <= 0.35 and hi >= 0.65 and hi - lo < 0.45
    # 50 points or fewer (epoch curves): every point counts, spike or not.
    short = Series("short", np.arange(1.0, 11.0), np.array([5.0] + [0.5] * 9))
    lo, hi, note = y_limits([short], 0.0)
    assert note == "" and lo < 0.5 and hi > 5.0


def four_series(n_points=5) -> list[Series]:
    x = np.arange(1.0, n_points + 1)
    return [Series(f"batch {b}", x, 1.0 / (x + i), band=np.full(n_points, 0.01), n=3)
            for i, b in enumerate((32, 64, 128, 256))]


def test_four_series_differ_in_line_style_marker_and_colour():
    for n_points in (5, 300):  # markers at every point, and a few markers on a long curve
        ax = draw_figure([(four_series(n_points), "epoch", "validation loss")]).axes[0]
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in lines] == [f"batch {b} (n=3)" for b in (32, 64, 128, 256)]
        assert len({line.get_linestyle() for line in lines}) == 4
        assert len({line.get_marker() for line in lines}) == 4
        assert len({line.get_color() for line in lines}) == 4
        assert all(line.get_marker() not in (None, "None", "") for line in lines)
    # In the SVG itself: three dash patterns besides the solid line.
    svg = line_figure(four_series(), xlabel="epoch", ylabel="loss")
    assert len(set(re.findall(r"stroke-dasharray: ([0-9.,\s]+)", svg))) >= 3


def visible_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]


def test_epoch_axis_ticks_at_whole_epochs_only():
    one = Series("one epoch", np.array([1.0]), np.array([0.4]))
    ax = draw_figure([([one], "epoch", "loss")]).axes[0]
    assert visible_ticks(ax) == [1.0] and ax.get_xlim() == pytest.approx((0.5, 1.5))
    three = Series("three", np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.4, 0.35]))
    ax = draw_figure([([three], "epoch", "loss")]).axes[0]
    assert visible_ticks(ax) == [1.0, 2.0, 3.0]
    # Any axis can ask for it.
    ax = draw_figure([([three], "round", "loss")], integer_x=True).axes[0]
    assert visible_ticks(ax) == [1.0, 2.0, 3.0]


def test_a_legend_that_would_hide_points_goes_outside_the_axes():
    x = np.array([1.0])
    crowded = [Series(f"a rather long label {i}", x, np.array([0.3 + 0.05 * i]), n=3) for i in range(4)]
    fig = draw_figure([(crowded, "epoch", "loss"), (four_series(), "epoch", "loss")])
    ax = fig.axes[0]
    fig.draw_without_rendering()
    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # to the right of the panel, over no point


def test_svg_is_deterministic_and_long_curves_are_rasterised():
    panels = [(four_series(), "epoch", "loss"), ([spiky(600)], "step", "loss")]
    first, second = panels_figure(panels, smoothing=0.6), panels_figure(panels, smoothing=0.6)
    assert first == second and first.lstrip().startswith("<?xml") and "<svg" in first
    assert "<image" in first  # the 600-step curve is an image inside the SVG
    assert "<image" not in line_figure(four_series(), xlabel="epoch", ylabel="loss")
    assert panels_figure(panels, smoothing=0.0) != first


def test_figure_cache_key_follows_the_band():
    s = four_series()
    cache = FigureCache(None)
    key = cache.key([(s, "epoch", "loss")], {})
    wider = [Series(x.label, x.x, x.mean, band=x.band * 2, n=x.n) for x in s]
    no_band = [Series(x.label, x.x, x.mean, n=x.n) for x in s]
    assert cache.key([(wider, "epoch", "loss")], {}) != key
    assert cache.key([(no_band, "epoch", "loss")], {}) != key
    assert cache.key([(four_series(), "epoch", "loss")], {}) == key
