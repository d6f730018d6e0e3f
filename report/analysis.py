"""Sentences computed from tested comparisons (report.stats), each saying only what its
interval shows: a direction when the section's Holm-adjusted p-value is below 0.05, else
"not resolved" with the interval; with one seed, that nothing can be tested.

The numbers a sentence prints are formatted by the same functions as the table cell it
points to (`diff_cell`), so the two always agree digit for digit.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from contract import noise
from contract.layout import STEP_LOSS
from report.stats import Comparison

SEEDS_HINT = "add seeds (e.g. seed = [0, 1, 2] in the experiment's [grid]) and train again to test it"


def v(x: float) -> str:
    return f"{x:.4f}"


def signed(x: float) -> str:
    return f"{x:+.4f}".replace("-", "−")


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def p_is(p: float) -> str:
    """'= 0.018' or '< 0.001', to follow 'p'."""
    text = p_text(p)
    return text if text.startswith("<") else f"= {text}"


def interval(c: Comparison) -> str:
    return f"95% CI {signed(c.low)} to {signed(c.high)}"


def diff_cell(c: Comparison | None) -> str:
    """The table cell of a comparison: signed value, interval, Holm-adjusted p."""
    if c is None:
        return "—"
    # Short enough to stay on one line in a four-column table: rows and captions say what
    # the difference is (with − without, per doubling) and that p is Holm-adjusted.
    if not c.tested:
        return f"{signed(c.diff)} (n={c.n}, no interval)"
    return f"{signed(c.diff)} [{signed(c.low)}, {signed(c.high)}] p={p_text(c.p_adj)}"


def _units(c: Comparison) -> str:
    return f"{c.n} paired seeds" if c.kind == "paired" else f"{c.n} runs, least-squares fit against log2 batch size"


def _evidence(c: Comparison) -> str:
    return f"{interval(c)}, {_units(c)}; Holm-adjusted p {p_is(c.p_adj)} over {c.family} comparisons"


def paired_sentence(c: Comparison | None, *, treatment: str, control: str) -> str | None:
    """'With batch norm the final epoch train loss was lower than without it by …'"""
    if c is None:
        return None
    if not c.tested:
        if c.n < 2:
            return (f"{c.what[:1].upper() + c.what[1:]}, {treatment} − {control}: {signed(c.diff)} from one seed, "
                    f"so no interval can be formed; {SEEDS_HINT}.")
        return (f"{c.what[:1].upper() + c.what[1:]}, {treatment} − {control}: {signed(c.diff)} in each of "
                f"{c.n} pairs, so no t-interval can be formed.")
    if c.resolved:
        higher_is_better = "accuracy" in c.what
        word = "higher" if c.diff > 0 else "lower"
        good = (c.diff > 0) == higher_is_better
        return (f"{treatment[:1].upper() + treatment[1:]}, the {c.what} was {word} than {control}"
                f"{'' if good else ' (worse)'}: {signed(c.diff)} ({_evidence(c)}).")
    return (f"The {c.what} difference, {treatment} − {control}, was not resolved: {signed(c.diff)} "
            f"({_evidence(c)}).")


def slope_sentence(c: Comparison | None, *, axis: str = "batch size") -> str | None:
    if c is None:
        return None
    if not c.tested:
        return (f"The {c.what} changed by {signed(c.diff)} per doubling of the {axis}, fitted over {c.n} runs with "
                f"one seed per {axis}, so no interval can be formed; {SEEDS_HINT}.")
    if c.resolved:
        word = "rose" if c.diff > 0 else "fell"
        return (f"The {c.what} {word} with {axis}: {signed(c.diff)} per doubling ({_evidence(c)}).")
    return (f"No trend of the {c.what} with {axis} was resolved: {signed(c.diff)} per doubling "
            f"({_evidence(c)}).")


def tally(comparisons: list[tuple[object, Comparison | None]], *, what: str, treatment: str,
          label: str) -> str | None:
    """'Batch norm resolvably lowered the … at 2 of 5 batch sizes (512, 1024), raised it at none, …'

    Counts only resolved differences, each in its own direction, so the count can never
    include a setting where the treatment did the opposite.
    """
    usable = [(k, c) for k, c in comparisons if c is not None and c.tested]
    if len(usable) < 2:
        return None
    lower = [k for k, c in usable if c.resolved and c.diff < 0]
    higher = [k for k, c in usable if c.resolved and c.diff > 0]
    rest = len(usable) - len(lower) - len(higher)

    def keys(ks):
        return f" ({', '.join(map(str, ks))})" if ks else ""

    return (f"Across {len(usable)} {label}, {treatment} lowered the {what} at {len(lower)}{keys(lower)} and "
            f"raised it at {len(higher)}{keys(higher)}, resolved after the Holm adjustment; at the other "
            f"{rest} the difference was not resolved.")


def steps_context(steps_by_key: dict[int, float], epochs: int | None, axis: str = "batch size") -> str | None:
    if len(steps_by_key) < 2:
        return None
    keys = sorted(steps_by_key)
    first, last = keys[0], keys[-1]
    per = f"in {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "in the same epochs"
    return (f"{per[0].upper() + per[1:]}, {axis} {first} took {int(steps_by_key[first])} optimizer "
            f"steps and {axis} {last} took {int(steps_by_key[last])}: the comparison is at equal "
            "examples seen, not equal updates.")


def roughness(scalars: pd.DataFrame, run: str, steps_per_epoch: int) -> float:
    """Std of step-to-step differences of the training loss over the last epoch."""
    s = scalars[(scalars["run"] == run) & (scalars["tag"] == STEP_LOSS)].sort_values("step")["value"]
    s = s.to_numpy()[-steps_per_epoch:]
    return noise.roughness(s[np.isfinite(s)])


def finding(c: Comparison, *, subject: str) -> str:
    """One line of the Findings section: the effect, its interval, where it is shown."""
    unit = " per doubling of the batch size" if c.kind == "slope" else ""
    return (f"{subject}: {signed(c.diff)}{unit} ({interval(c)}, {_units(c)}; Holm-adjusted p "
            f"{p_is(c.p_adj)}), {c.where}.")


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
