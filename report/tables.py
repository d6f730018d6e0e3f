"""Per-run summary values and their aggregation over seeds: the numbers in every table."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from contract.layout import COMPLETE, DIVERGED, EPOCH_METRICS
from report.load import Logs

NON_FACTORS = {"run", "status", "steps", "wall_seconds", "seed"}
MISSING = "—"


def parse_summary(text: str) -> tuple[str, int]:
    """'final' | 'best' | 'last-K' → (kind, k)."""
    if text in ("final", "best"):
        return text, 1
    m = re.fullmatch(r"last-(\d+)", text)
    if m and int(m.group(1)) > 0:
        return "last", int(m.group(1))
    raise ValueError(f"--summary {text!r} is not valid; valid values: final, best, last-K (e.g. last-3)")


def describe_summary(text: str) -> str:
    kind, k = parse_summary(text)
    return {"final": "final epoch", "best": "best epoch (lowest loss, highest accuracy)",
            "last": f"mean of the last {k} epochs"}[kind]


def run_values(logs: Logs, summary: str = "final") -> pd.DataFrame:
    """One value per (run, split, tag) for the epoch tags, summarised as asked."""
    kind, k = parse_summary(summary)
    df = logs.scalars[logs.scalars["tag"].isin(EPOCH_METRICS)].sort_values("step")
    groups = df.groupby(["run", "split", "tag"], sort=True)
    if kind == "final":
        out = groups.tail(1)
    elif kind == "last":
        out = groups.tail(k).groupby(["run", "split", "tag"], as_index=False)["value"].mean()
    else:
        best = []
        for (run, split, tag), g in groups:
            finite = g[g["value"].map(math.isfinite)]
            if finite.empty:
                best.append((run, split, tag, float("nan")))
                continue
            value = finite["value"].min() if tag.endswith("loss") else finite["value"].max()
            best.append((run, split, tag, value))
        out = pd.DataFrame(best, columns=["run", "split", "tag", "value"])
    return out[["run", "split", "tag", "value"]].reset_index(drop=True)


def factors(logs: Logs) -> list[str]:
    """Spec fields that vary across the runs (seed excluded: it is the repeat)."""
    cols = [c for c in logs.runs.columns if c not in NON_FACTORS]
    return [c for c in cols if logs.runs[c].nunique(dropna=False) > 1]


@dataclass
class Cell:
    """One grid cell's value: mean, sample std and n over finished, non-diverged seeds."""

    mean: float = float("nan")
    std: float = float("nan")
    n: int = 0
    diverged: int = 0

    @property
    def missing(self) -> bool:
        return self.n == 0

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return DIVERGED if self.diverged else MISSING
        s = f"{self.mean:.{digits}f}"
        if self.n > 1:
            s += f" ± {self.std:.{digits}f} (n={self.n})"
        if self.diverged:
            s += f" [{self.diverged} diverged]"
        return s


def cell(logs: Logs, values: pd.DataFrame, where: dict, split: str, tag: str) -> Cell:
    runs = logs.runs
    mask = pd.Series(True, index=runs.index)
    for key, value in where.items():
        mask &= runs[key] == value
    chosen = runs[mask]
    diverged = int((chosen["status"] == DIVERGED).sum())
    ok = chosen[chosen["status"] == COMPLETE]["run"]
    v = values[(values["run"].isin(ok)) & (values["split"] == split) & (values["tag"] == tag)]["value"]
    v = [float(x) for x in v if math.isfinite(x)]
    if not v:
        return Cell(diverged=diverged)
    series = pd.Series(v)
    std = float(series.std(ddof=1)) if len(v) > 1 else float("nan")
    return Cell(mean=float(series.mean()), std=std, n=len(v), diverged=diverged)


@dataclass
class Table:
    key: str                      # CSV file stem
    caption: str
    columns: list[str]
    rows: list[list[str]]         # formatted cells, as shown
    data: list[dict]              # raw numbers for the CSV
    number: int = 0

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.data)


def cell_record(prefix: dict, c: Cell) -> dict:
    return {**prefix, "mean": None if c.missing else c.mean,
            "std": None if c.n < 2 else c.std, "n": c.n, DIVERGED: c.diverged}  # runs that diverged
