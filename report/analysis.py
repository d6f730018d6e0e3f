"""Sentences computed from comparisons in the data, each qualified by what the data can show."""
from __future__ import annotations

import numpy as np
import pandas as pd

from contract import noise
from contract.layout import STEP_LOSS
from report.tables import Cell


def _v(x: float) -> str:
    return f"{x:.4f}"


def spread_caveat(a: Cell, b: Cell) -> str:
    """Why a difference between two cells may or may not mean anything."""
    if a.n < 2 or b.n < 2:
        return " (one seed per setting: the spread between seeds is unknown, so this may be noise)"
    spread = max(a.std, b.std)
    if abs(a.mean - b.mean) <= spread:
        return f" (smaller than the seed spread, std up to {_v(spread)}: not a reliable difference)"
    return f" (larger than the seed spread, std up to {_v(spread)}, over n={min(a.n, b.n)} seeds)"


def compare_bn(off: Cell, on: Cell, what: str) -> str:
    if off.missing or on.missing:
        gone = "without" if off.missing else "with"
        return f"No finished run {gone} batch norm, so the {what} cannot be compared."
    if on.mean == off.mean:
        return f"The {what} was the same with and without batch norm ({_v(on.mean)})."
    word = "lower" if on.mean < off.mean else "higher"
    return (f"With batch norm the {what} was {word} than without it "
            f"({_v(on.mean)} vs {_v(off.mean)}){spread_caveat(off, on)}.")


def count_bn_wins(pairs: list[tuple[object, Cell, Cell]], what: str, label: str) -> str | None:
    """'Batch norm lowered the final validation loss at 3 of 5 batch sizes.'"""
    usable = [(k, off, on) for k, off, on in pairs if not off.missing and not on.missing]
    if len(usable) < 2:
        return None
    lower = [k for k, off, on in usable if on.mean < off.mean]
    reliable = [k for k, off, on in usable if off.n > 1 and on.n > 1
                and abs(on.mean - off.mean) > max(off.std, on.std)]
    s = f"Batch norm lowered the {what} at {len(lower)} of {len(usable)} {label}"
    if lower and len(lower) < len(usable):
        s += f" ({', '.join(map(str, lower))})"
    if all(off.n < 2 or on.n < 2 for _, off, on in usable):
        s += "; each setting has one seed, so none of these differences is shown to exceed seed noise"
    else:
        s += f"; {len(reliable)} of these differences exceed the seed spread"
    return s + "."


def trend(cells: list[tuple[int, Cell]], what: str, axis: str = "batch size") -> str | None:
    """Describe how a value moves along an ordered axis, without claiming more than the data shows."""
    pts = [(k, c) for k, c in cells if not c.missing]
    if len(pts) < 2:
        return None
    keys = [k for k, _ in pts]
    vals = [c.mean for _, c in pts]
    diffs = np.diff(vals)
    lo, hi = pts[int(np.argmin(vals))], pts[int(np.argmax(vals))]
    caveat = "" if all(c.n > 1 for _, c in pts) else " Each point is a single seed."
    if len(pts) == 2:
        word = "lower" if vals[1] < vals[0] else "higher" if vals[1] > vals[0] else "the same"
        return (f"The {what} was {word} at {axis} {keys[1]} ({_v(vals[1])}) than at "
                f"{keys[0]} ({_v(vals[0])}).{caveat}")
    if (diffs < 0).all():
        return (f"The {what} decreased at every step from {axis} {keys[0]} ({_v(vals[0])}) "
                f"to {keys[-1]} ({_v(vals[-1])}).{caveat}")
    if (diffs > 0).all():
        return (f"The {what} increased at every step from {axis} {keys[0]} ({_v(vals[0])}) "
                f"to {keys[-1]} ({_v(vals[-1])}).{caveat}")
    return (f"The {what} did not change monotonically with {axis}: lowest at {lo[0]} "
            f"({_v(lo[1].mean)}), highest at {hi[0]} ({_v(hi[1].mean)}).{caveat}")


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
