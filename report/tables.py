"""Per-run summary values and their aggregation over seeds: the numbers in every table."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from contract.layout import COMPLETE, DIVERGED, EPOCH_METRICS
from report.load import Logs
from report.stats import Estimate, estimate

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
class Cell(Estimate):
    """One grid cell's value over finished, non-diverged seeds: mean, sample std, n and the
    95% t-interval of the mean (from Estimate); `values` maps run → value."""

    diverged: int = 0
    values: dict = field(default_factory=dict)

    @property
    def missing(self) -> bool:
        return self.n == 0

    def text(self, digits: int = 4) -> str:
        """'0.3706 ± 0.0123 (n=3)': the mean ± the half-width of its 95% t-interval."""
        if self.n == 0:
            return DIVERGED if self.diverged else MISSING
        s = f"{self.mean:.{digits}f}"
        if self.n > 1:
            s += f" ± {self.half:.{digits}f} (n={self.n})"
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
    rows = values[(values["run"].isin(ok)) & (values["split"] == split) & (values["tag"] == tag)]
    by_run = {r: float(x) for r, x in zip(rows["run"], rows["value"]) if math.isfinite(x)}
    if not by_run:
        return Cell(diverged=diverged)
    e = estimate(by_run.values())
    return Cell(mean=e.mean, std=e.std, n=e.n, diverged=diverged, values=by_run)


@dataclass
class Table:
    key: str                      # CSV file stem
    caption: str
    columns: list[str]
    rows: list[list[str]]         # formatted cells, as shown
    data: list[dict]              # raw numbers for the CSV
    number: int = 0
    compact: bool = False         # long reference tables: smaller type

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.data)


def cell_record(prefix: dict, c: Cell) -> dict:
    """A CSV row: mean, std, n and the 95% interval (empty where n < 2), runs diverged."""
    two = c.n >= 2
    return {**prefix, "mean": None if c.missing else c.mean, "std": c.std if two else None, "n": c.n,
            "ci_low": c.low if two else None, "ci_high": c.high if two else None, DIVERGED: c.diverged}


def comparison_record(prefix: dict, c) -> dict:
    """A CSV row of a tested difference (report.stats.Comparison)."""
    return {**prefix, "difference": c.diff, "ci_low": c.low if c.tested else None,
            "ci_high": c.high if c.tested else None, "n": c.n, "p": c.p if c.tested else None,
            "p_holm": c.p_adj if c.tested else None, "family": c.family, "kind": c.kind}
