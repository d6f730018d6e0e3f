"""Documents 000/001 ("task": Objective · Code Used · Results per batch size · Short
Analysis · Key Takeaway) and document 002 ("results": one row per batch size with loss,
accuracy, val_loss and val_accuracy). Findings follow the Objective in both."""
from __future__ import annotations

import re

import numpy as np

from contract.layout import (
    DIVERGED,
    EPOCH_ACCURACY,
    EPOCH_LOSS,
    EPOCH_METRICS,
    TEXT_LIMITS,
    TRAIN,
    VALIDATION,
    clip,
)
from report import analysis, gradient, stats
from report.build import Builder, fmt_factor
from report.document import Document, Section
from report.tables import Cell, Table, cell_record, comparison_record

COLUMNS = (("loss", TRAIN, EPOCH_LOSS), ("accuracy", TRAIN, EPOCH_ACCURACY),
           ("val_loss", VALIDATION, EPOCH_LOSS), ("val_accuracy", VALIDATION, EPOCH_ACCURACY))


def _opening(b: Builder) -> Section:
    exp = b.logs.experiment.get("experiment", {})
    sec = b.doc.section("Objective")
    b.doc.text(sec, clip(exp.get("objective") or "", TEXT_LIMITS["objective"])
               or "Study how the settings varied in this grid change training.")
    b.introduction(sec)
    findings = b.findings_section()
    sec = b.doc.section("Code Used")
    b.code_used(sec)
    b.architecture(sec)
    return findings


def _keys(b: Builder) -> list[dict]:
    """Every combination of the varying factors except batch size (batch norm included:
    these formats have no with/without layout, so a cell must not mix the two)."""
    return b.section_keys(exclude={"batch_size"})


def _titles(b: Builder) -> dict[str, str]:
    return {b.slug(k): b.section_title(k) for k in _keys(b) if k}


def _cells(b: Builder) -> list[dict]:
    return [{**k, "batch_size": bs} if bs is not None else dict(k) for k in _keys(b) for bs in b.batch_sizes]


def _title(where: dict) -> str:
    t = ", ".join(fmt_factor(k, v) if k != "batch_size" else f"batch size {v}" for k, v in where.items())
    return t[:1].upper() + t[1:] if t else "All runs"


def _slopes(b: Builder, key_cells: list[dict]) -> dict:
    """Slopes against log2(batch size) of each COLUMNS metric, per combination of the other
    factors, Holm-adjusted as one family."""
    out = {}
    if len(b.batch_sizes) > 1:
        for key in _keys(b):
            for col, split, tag in COLUMNS:
                out[b.slug(key), col] = b.slope(key, split, tag, what=b.what(split, tag), label="batch size")
    stats.holm([c for c in out.values() if c is not None])
    return out


def task(b: Builder) -> Document:
    findings = _opening(b)
    sec = b.doc.section("Results")
    cells = _cells(b)
    for where in cells:
        _epoch_table(b, b.doc.section(_title(where), level=2), where)
    sub = b.doc.section("All batch sizes", level=2)
    overlay = [s for w in cells for s in b.curves(w, VALIDATION, EPOCH_LOSS, "batch_size", [None],
                                                   lambda _, w=w: _title(w).lower(), x_offset=1)]
    b.figure(sub, "Validation loss by batch size", [(overlay, "epoch", "validation loss")])
    gradient.add_section(b, b.target_loss, level=2)
    sec = b.doc.section("Short Analysis")
    slopes = _slopes(b, cells)
    table = _summary_table(b, sec, cells, slopes)
    bullets = []
    for (slug, col), c in slopes.items():
        if col in ("val_loss", "val_accuracy"):
            b.finding(c, table, f"Batch size (slope), {col.replace('_', ' ')}", _titles(b).get(slug, ""))
            bullets.append(analysis.slope_sentence(c))
    b.doc.bullets(sec, bullets)
    sec = b.doc.section("Key Takeaway")
    b.doc.text(sec, _takeaway(b))
    b.data_problems()
    b.provenance()
    b.fill_findings(findings)
    return b.doc


def results(b: Builder) -> Document:
    findings = _opening(b)
    sec = b.doc.section("Results")
    cells = _cells(b)
    slopes = _slopes(b, cells)
    rows, data = [], []
    for where in cells:
        cs = {col: b.cell(where, split, tag) for col, split, tag in COLUMNS}
        rows.append([_title(where)] + [cs[col].text() for col, _, _ in COLUMNS])
        for col, c in cs.items():
            data.append(cell_record({**where, "metric": col}, c))
    for key in _keys(b):
        row = [c for c in (slopes.get((b.slug(key), col)) for col, _, _ in COLUMNS)]
        rows.append([f"Slope per doubling [95% CI] p_Holm{', ' + b.section_title(key) if key else ''}"]
                    + [analysis.diff_cell(c) for c in row])
        data += [comparison_record({**key, "metric": col}, c) for (col, _, _), c in zip(COLUMNS, row) if c]
    table = Table("results", f"Results by batch size ({b.summary_text}; mean ± 95% CI half-width over seeds; "
                             "slope: least-squares fit against log2 batch size over every run)",
                  ["Setting"] + [col for col, _, _ in COLUMNS], rows, data)
    b.doc.table(sec, table)
    for split, tag, ylabel in ((VALIDATION, EPOCH_LOSS, "validation loss"),
                               (VALIDATION, EPOCH_ACCURACY, "validation accuracy")):
        series = [s for w in cells for s in b.curves(w, split, tag, "batch_size", [None],
                                                       lambda _, w=w: _title(w).lower(), x_offset=1)]
        b.figure(sec, f"{ylabel[:1].upper() + ylabel[1:]} by batch size", [(series, "epoch", ylabel)])
    gradient.add_section(b, b.target_loss, level=2)
    sec = b.doc.section("Short Analysis")
    bullets = []
    for (slug, col), c in slopes.items():
        b.finding(c, table, f"Batch size (slope), {col.replace('_', ' ')}", _titles(b).get(slug, ""))
        bullets.append(analysis.slope_sentence(c))
    b.doc.bullets(sec, bullets)
    b.data_problems()
    b.provenance()
    b.fill_findings(findings)
    return b.doc


def _epoch_table(b: Builder, sec: Section, where: dict) -> None:
    """Document 000's per-epoch lines as a table: mean ± 95% CI half-width over seeds."""
    runs = b.runs_where(where)
    df = b.logs.scalars[(b.logs.scalars["run"].isin(runs)) & (b.logs.scalars["tag"].isin(list(EPOCH_METRICS)))]
    if df.empty:
        b.doc.text(sec, "No finished run in this cell.")
        return
    df = df.assign(col=np.where(df["split"] == VALIDATION, "val_", "") + df["tag"].str.removeprefix("epoch_"))
    cols = [c for c, _, _ in COLUMNS if c in set(df["col"])]
    rows, data = [], []
    for step, g in df.groupby("step"):
        cells = {c: stats.estimate(g[g["col"] == c]["value"].tolist()) for c in cols}
        rows.append([str(int(step) + 1)] + [Cell(e.mean, e.std, e.n).text() for e in cells.values()])
        record = {"epoch": int(step) + 1}
        for c, e in cells.items():
            record.update({f"{c}_{k}": v for k, v in cell_record({}, Cell(e.mean, e.std, e.n)).items()
                           if k != DIVERGED})
        data.append(record)
    n = len(runs)
    note = f" (mean ± 95% CI half-width over {n} seeds)" if n > 1 else ""
    key = "epochs_" + re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(f"{k}{v}" for k, v in where.items()))
    b.doc.table(sec, Table(key, f"Per-epoch results, {_title(where).lower()}{note}", ["Epoch"] + cols, rows, data))
    panels = []
    for tag, ylabel in ((EPOCH_LOSS, "loss"), (EPOCH_ACCURACY, "accuracy")):
        panels.append((b.curves(where, TRAIN, tag, "split", [None], lambda _: "train", x_offset=1)
                       + b.curves(where, VALIDATION, tag, "split", [None], lambda _: "validation", x_offset=1),
                       "epoch", ylabel))
    b.figure(sec, f"{_title(where)}: loss (left) and accuracy (right), train vs validation", panels)


def _summary_table(b: Builder, sec: Section, cells: list[dict], slopes: dict) -> Table:
    rows, data = [], []
    for where in cells:
        val = b.cell(where, VALIDATION, EPOCH_LOSS)
        acc = b.cell(where, VALIDATION, EPOCH_ACCURACY)
        rough = b.roughness(where)
        rows.append([_title(where), val.text(), acc.text(), rough.text()])
        data.append({**where, **{f"val_loss_{k}": v for k, v in cell_record({}, val).items()},
                     **{f"val_accuracy_{k}": v for k, v in cell_record({}, acc).items()},
                     **{f"roughness_{k}": v for k, v in cell_record({}, rough).items()}})
    for key in _keys(b):
        row = [slopes.get((b.slug(key), col)) for col in ("val_loss", "val_accuracy")]
        rows.append([f"Slope per doubling [95% CI] p_Holm{', ' + b.section_title(key) if key else ''}"]
                    + [analysis.diff_cell(c) for c in row] + [""])
    table = Table("short_analysis", f"Validation loss and accuracy ({b.summary_text}) and the roughness of the "
                                    "per-step train loss in the last epoch (std of step-to-step changes); mean ± "
                                    "95% CI half-width over seeds; slope: least-squares fit against log2 batch size",
                  ["Setting", "Val loss", "Val accuracy", "Roughness"], rows, data)
    b.doc.table(sec, table)
    return table


def _takeaway(b: Builder) -> str:
    resolved = sorted((x for x in b.findings if x[0].resolved), key=lambda x: -x[0].relative)
    if resolved:
        c, subject = resolved[0]
        return f"The largest resolved effect in this grid: {analysis.finding(c, subject=subject)}"
    tested = [c for c, _ in b.findings if c.tested]
    if tested:
        return (f"None of the {len(tested)} tested effects was resolved, so these runs do not show that batch "
                "size changed the outcome; more seeds would narrow the intervals (Findings).")
    return f"Nothing can be concluded: no effect could be tested; {analysis.SEEDS_HINT}."
