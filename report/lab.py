"""Document 004's format: Introduction, Findings, Architecture and Framework, one section
per initializer (a subsection per batch size, then a batch-size comparison), a paired
comparison of the initializers, gradient noise, provenance.

Each section's comparisons are tested first, Holm-adjusted as one family, then laid out;
the Findings section (second) is filled last, once every table has its number.
"""
from __future__ import annotations

from itertools import combinations

from contract.layout import (
    COMPLETE,
    EPOCH_ACCURACY,
    EPOCH_LOSS,
    STEP_LOSS,
    TRAIN,
    VALIDATION,
)
from report import analysis, gradient, stats
from report.build import BN_LABEL, PRETTY_INIT, Builder
from report.document import Document
from report.tables import Table, cell_record, comparison_record

METRICS = ((TRAIN, EPOCH_LOSS, "Train Loss", "train loss"), (VALIDATION, EPOCH_LOSS, "Val loss", "val loss"),
           (VALIDATION, EPOCH_ACCURACY, "Validation Accuracy", "validation accuracy"))
BN = "batch_norm"
PAIRED_FIGURE = (4.2, 2.1)  # inches; drawn beside its table


def lab(b: Builder) -> Document:
    b.introduction()
    findings = b.findings_section()
    b.architecture()
    for key in b.section_keys():
        _section(b, key)
    if "initializer" in b.factors:
        _initializers(b)
    gradient.add_section(b, b.target_loss)
    b.data_problems()
    b.provenance()
    b.fill_findings(findings)
    return b.doc


def _bn_label(bn) -> str:
    return "All runs" if bn is None else BN_LABEL[bn]


def _where_text(b: Builder, key: dict) -> str:
    """', He normal': the section's setting, short."""
    return ", " + ", ".join(PRETTY_INIT.get(v, str(v)) if k == "initializer" else f"{k} {v}"
                            for k, v in key.items()) if key else ""


def _section(b: Builder, key: dict) -> None:
    both = b.bn_values == [False, True]
    per_bs, slopes = {}, {}
    for bs in b.batch_sizes:
        where = dict(key) if bs is None else {**key, "batch_size": bs}
        for split, tag, _, _ in METRICS:
            per_bs[bs, split, tag] = (b.paired(where, BN, False, True, split, tag, what=b.what(split, tag),
                                               label=f"batch norm at batch size {bs}") if both else None)
    if len(b.batch_sizes) > 1:
        for split, tag, _, _ in METRICS:
            for bn in b.bn_values:
                w = dict(key) if bn is None else {**key, BN: bn}
                slopes[split, tag, bn] = b.slope(w, split, tag, what=b.what(split, tag), label="batch size")
    stats.holm([c for c in [*per_bs.values(), *slopes.values()] if c is not None])
    b.doc.section(b.section_title(key))
    for bs in b.batch_sizes:
        _batch_size(b, key, bs, per_bs)
    if len(b.batch_sizes) > 1:
        _comparison(b, key, per_bs, slopes)


def _batch_size(b: Builder, key: dict, bs, per_bs: dict) -> None:
    where = dict(key) if bs is None else {**key, "batch_size": bs}
    sec = b.doc.section("All runs" if bs is None else f"Batch Size {bs}", level=2)
    label = "All runs" if bs is None else f"Batch size {bs}"
    stem = f"{b.slug(key)}_bs{bs}"
    bullets = []
    for split, tag, title, fig in METRICS[:2]:
        if split == TRAIN:
            panels = [(b.curves(where, TRAIN, STEP_LOSS, BN, b.bn_values, _bn_label), "step",
                       "train loss (per step)")]
            b.figure(sec, f"{label} train loss", panels, smoothed=True, size=PAIRED_FIGURE)
        else:
            panels = [(b.curves(where, VALIDATION, EPOCH_LOSS, BN, b.bn_values, _bn_label, x_offset=1), "epoch",
                       "validation loss")]
            b.figure(sec, f"{label} val loss", panels, size=PAIRED_FIGURE)
        diff = per_bs.get((bs, split, tag))
        table = b.bn_table(where, split, tag, title, f"{fig.replace(' ', '_')}_{stem}", diff)
        b.doc.table(sec, table)
        b.doc.side_by_side(sec)
        b.finding(diff, table, f"Batch norm, {b.short(split, tag)}{_where_text(b, key)}", f"batch {bs}")
        bullets.append(analysis.paired_sentence(diff, treatment="with batch norm", control="without it"))
    b.doc.bullets(sec, bullets)


def _comparison(b: Builder, key: dict, per_bs: dict, slopes: dict) -> None:
    sec = b.doc.section("Batch Size Comparison", level=2)
    both = b.bn_values == [False, True]
    bullets = []
    for split, tag, title, fig in METRICS:
        if tag == EPOCH_LOSS:
            panels = []
            for bn in b.bn_values:
                w = dict(key) if bn is None else {**key, BN: bn}
                series = b.curves(w, split, tag, "batch_size", b.batch_sizes, lambda bs: f"batch {bs}", x_offset=1)
                panels.append((series, "epoch", fig if bn is None else f"{fig}, {BN_LABEL[bn].lower()}"))
            b.figure(sec, f"Batch size comparison, {fig}" + (" (left: without batch norm, right: with)"
                                                              if both else ""), panels)
        cols = ["Batch size"] + [("Loss Value" if tag == EPOCH_LOSS else "Accuracy") if bn is None
                                 else BN_LABEL[bn] for bn in b.bn_values] + (["With − without (paired) [95% CI] p_Holm"] if both else [])
        rows, data = [], []
        for bs in b.batch_sizes:
            cells = [b.cell({**key, "batch_size": bs} if bn is None else {**key, "batch_size": bs, BN: bn}, split, tag)
                     for bn in b.bn_values]
            diff = per_bs.get((bs, split, tag))
            rows.append([str(bs)] + [c.text() for c in cells] + ([analysis.diff_cell(diff)] if both else []))
            data += [cell_record({"batch_size": bs, BN: bn}, c) for bn, c in zip(b.bn_values, cells)]
            if diff is not None:
                data.append(comparison_record({"batch_size": bs, BN: "with - without"}, diff))
        row_slopes = [slopes.get((split, tag, bn)) for bn in b.bn_values]
        rows.append(["Slope per doubling [95% CI] p_Holm"] + [analysis.diff_cell(c) for c in row_slopes] + ([""] if both else []))
        data += [comparison_record({"batch_size": "slope per doubling", BN: bn}, c)
                 for bn, c in zip(b.bn_values, row_slopes) if c is not None]
        name = "Batch Size · Validation Accuracy" if tag == EPOCH_ACCURACY else title
        table = Table(f"{fig.replace(' ', '_')}_by_batch_size_{b.slug(key)}",
                      f"{name} ({b.summary_text}; mean ± 95% CI half-width over seeds; slope: least-squares "
                      "fit against log2 batch size over every run)", cols, rows, data)
        b.doc.table(sec, table)
        if tag == EPOCH_ACCURACY:
            for bs in b.batch_sizes:
                b.finding(per_bs.get((bs, split, tag)), table,
                          f"Batch norm, {b.short(split, tag)}{_where_text(b, key)}", f"batch {bs}")
        for bn, c in zip(b.bn_values, row_slopes):
            setting = "" if bn is None else f", {BN_LABEL[bn].lower()}"
            b.finding(c, table, f"Batch size (slope), {b.short(split, tag)}",
                      f"{setting.removeprefix(', ')}{_where_text(b, key)}".removeprefix(", "))
        if both:
            bullets.append(analysis.tally([(bs, per_bs.get((bs, split, tag))) for bs in b.batch_sizes],
                                          what=b.what(split, tag), treatment="batch norm", label="batch sizes"))
        for bn, c in zip(b.bn_values, row_slopes):
            sentence = analysis.slope_sentence(c)
            if sentence and bn is not None:
                sentence = f"{BN_LABEL[bn]}: {sentence[0].lower()}{sentence[1:]}"
            bullets.append(sentence)
    rows, data = [], []
    for bs in b.batch_sizes:
        cells = [b.roughness({**key, "batch_size": bs} if bn is None else {**key, "batch_size": bs, BN: bn})
                 for bn in b.bn_values]
        rows.append([str(bs)] + [c.text() for c in cells])
        data += [cell_record({"batch_size": bs, BN: bn}, c) for bn, c in zip(b.bn_values, cells)]
    b.doc.table(sec, Table(f"roughness_by_batch_size_{b.slug(key)}", "Roughness of the per-step train loss in "
                           "the last epoch (std of step-to-step changes; mean ± 95% CI half-width over seeds)",
                           ["Batch size"] + [_bn_label(bn) for bn in b.bn_values], rows, data))
    steps = {}
    runs = b.logs.runs
    for bs in b.batch_sizes:
        chosen = runs[(runs["batch_size"] == bs) & (runs["status"] == COMPLETE)]
        if not chosen.empty and chosen["steps"].notna().any():  # logs written by others may not say
            steps[bs] = float(chosen["steps"].median())
    epochs = runs["epochs"].iloc[0] if "epochs" in runs and "epochs" not in b.factors else None
    bullets.append(analysis.steps_context(steps, epochs))
    b.doc.bullets(sec, bullets)


def _initializers(b: Builder) -> None:
    inits = sorted(b.logs.runs["initializer"].unique())
    pairs = list(combinations(inits, 2))
    found = {(x, y, split, tag): b.paired({}, "initializer", x, y, split, tag, what=b.what(split, tag),
                                          label=f"{y} − {x}")
             for x, y in pairs for split, tag, _, _ in METRICS}
    stats.holm([c for c in found.values() if c is not None])
    sec = b.doc.section("Initializer Comparison")
    others = [f.replace("_", " ") for f in b.factors if f != "initializer"] + ["seed"]
    b.doc.text(sec, f"Each initializer against each other, paired run by run: two runs form a pair when they "
                    f"share {', '.join(others)}, so the difference averages over the grid's other settings.")
    rows, data = [], []
    for x, y in pairs:
        label = f"{PRETTY_INIT.get(y, y)} − {PRETTY_INIT.get(x, x)}"
        cells = [found[x, y, split, tag] for split, tag, _, _ in METRICS]
        rows.append([label] + [analysis.diff_cell(c) for c in cells])
        data += [comparison_record({"comparison": label, "metric": b.what(split, tag)}, c)
                 for (split, tag, _, _), c in zip(METRICS, cells) if c is not None]
    table = Table("initializers_paired", f"Initializers compared ({b.summary_text}; paired difference "
                                         "[95% CI], Holm-adjusted p)",
                  ["Comparison"] + [b.what(split, tag).removeprefix(b.summary_text + " ").capitalize()
                                    for split, tag, _, _ in METRICS], rows, data)
    b.doc.table(sec, table)
    bullets, unresolved = [], 0
    for x, y in pairs:
        for split, tag, _, _ in METRICS:
            c = found[x, y, split, tag]
            b.finding(c, table, f"Initializers, {b.short(split, tag)}",
                      f"{PRETTY_INIT.get(y, y)} − {PRETTY_INIT.get(x, x)}")
            if c is not None and c.tested and not c.resolved:
                unresolved += 1  # one line for all of these below: their intervals are in the table
                continue
            bullets.append(analysis.paired_sentence(c, treatment=f"with {PRETTY_INIT.get(y, y)}",
                                                    control=f"with {PRETTY_INIT.get(x, x)}"))
    if unresolved:
        bullets.append(f"The other {unresolved} differences of {b.doc.ref(table)} were not resolved (Holm-adjusted "
                       "p ≥ 0.05); their intervals are in the table.")
    b.doc.bullets(sec, bullets)
