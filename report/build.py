"""Logs → the report's context: numbered sections, figures, tables and computed sentences.

Python decides every number and sentence here; the templates only lay them out.
Figures and tables are numbered in the order they are added, so the HTML and the
PDF (rendered from the same HTML) carry the same numbers.
"""
from __future__ import annotations

import math
import re
from datetime import date

import numpy as np

from contract.layout import (COMPLETE, DATE_LIMIT, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, EPOCH_METRICS,
                             SOURCE_TEXT_LIMIT, STEP_LOSS, TEXT_LIMITS, TRAIN, VALIDATION, clip)
from report import analysis, gradient
from report.document import Document, Section
from report.figures import FigureCache, curve, line_figure, panels_figure
from report.load import Logs
from report.tables import Table, cell, cell_record, describe_summary, factors, run_values

PRETTY_INIT = {
    "glorot_normal": "Xavier (Glorot) normal", "glorot_uniform": "Xavier (Glorot) uniform",
    "he_normal": "He normal", "he_uniform": "He uniform", "random_uniform": "Random uniform",
    "random_normal": "Random normal", "lecun_normal": "LeCun normal", "lecun_uniform": "LeCun uniform",
    "truncated_normal": "Truncated normal", "orthogonal": "Orthogonal",
}
BN_LABEL = {False: "Without batch norm", True: "With batch norm"}
SECTION_AXES_EXCLUDED = {"batch_size", "batch_norm"}


def _fmt_factor(key: str, value) -> str:
    if key == "initializer":
        return PRETTY_INIT.get(value, str(value))
    if key == "batch_norm":
        return BN_LABEL[bool(value)].lower()
    if isinstance(value, tuple):
        return "×".join(map(str, value))
    return f"{key.replace('_', ' ')} {value}"


class Builder:
    def __init__(self, logs: Logs, *, summary: str = "final", smoothing: float = 0.0,
                 figure_cache: FigureCache | None = None, target_loss: float | None = None):
        self.logs = logs
        self.target_loss = target_loss
        self.figure_cache = figure_cache
        self.summary = summary
        self.summary_text = describe_summary(summary)
        self.values = run_values(logs, summary)
        self.doc = Document(smoothing)
        self.factors = factors(logs)
        # Axis values come from the runs read and from the grid as planned, so a cell with
        # no logs at all still shows up as "—" rather than vanishing.
        planned = logs.experiment.get("specs") or []
        self.batch_sizes = self._axis("batch_size", planned)
        self.bn_values = self._axis("batch_norm", planned)
        self.dataset = self._dataset()

    # -- helpers ------------------------------------------------------------------------

    def _axis(self, name: str, planned: list[dict]) -> list:
        if name not in self.logs.runs:
            return [None]
        values = set(self.logs.runs[name].tolist())
        values |= {s[name] for s in planned if isinstance(s, dict) and name in s}
        return sorted(bool(v) for v in values) if name == "batch_norm" else sorted(values)

    def _dataset(self) -> dict:
        d = self.logs.experiment.get("dataset")
        if d:
            return d
        first = next(iter(self.logs.manifests.values()), {})
        return first.get("dataset", {})

    def runs_where(self, where: dict) -> list[str]:
        df = self.logs.runs
        mask = df["status"] == COMPLETE
        for k, v in where.items():
            mask &= df[k] == v
        return df[mask]["run"].tolist()

    def section_keys(self) -> list[dict]:
        """One dict per combination of the varying factors other than batch size and BN."""
        keys = [f for f in self.factors if f not in SECTION_AXES_EXCLUDED]
        if not keys:
            return [{}]
        combos = self.logs.runs[keys].drop_duplicates().sort_values(keys)
        return [dict(zip(keys, row)) for row in combos.itertuples(index=False)]

    def section_title(self, key: dict) -> str:
        if not key:
            init = self.logs.runs["initializer"].iloc[0] if "initializer" in self.logs.runs else None
            return f"{PRETTY_INIT.get(init, init)} weight initialization" if init else "Results"
        parts = [_fmt_factor(k, v) for k, v in key.items()]
        if "initializer" in key:
            parts[0] += " weight initialization"
        return ", ".join(parts)

    def slug(self, key: dict) -> str:
        """A file-name-safe stem for a section's CSVs."""
        values = [str(v) for v in key.values()]
        if not values and "initializer" in self.logs.runs:
            values = [str(self.logs.runs["initializer"].iloc[0])]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(values)) or "all"

    def steps_per_epoch(self, run: str) -> int:
        m = self.logs.manifests.get(run, {})
        bs = m.get("spec", {}).get("batch_size") or 1
        n = (m.get("dataset") or self.dataset).get("train_examples") or 1
        return math.ceil(n / bs)

    def bn_rows(self, where: dict, split: str, tag: str, what: str, key: str) -> Table:
        rows, data = [], []
        for bn in self.bn_values:
            w = dict(where) if bn is None else {**where, "batch_norm": bn}
            c = cell(self.logs, self.values, w, split, tag)
            label = "All runs" if bn is None else BN_LABEL[bn]
            rows.append([label, c.text()])
            data.append(cell_record({"setting": label}, c))
        return Table(key, f"{what} ({self.summary_text})", ["Loss", "Loss Value"], rows, data)

    # -- shared sections -----------------------------------------------------------------

    def introduction(self, sec: Section | None = None) -> None:
        d, logs = self.dataset, self.logs
        sec = sec or self.doc.section("Introduction")
        name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}.get(d.get("name"), d.get("name", "?"))
        self.doc.text(sec, (
            f"The runs used {name} ({d.get('image_shape', ['?', '?'])[0]}×{d.get('image_shape', ['?', '?'])[-1]} "
            f"grayscale images, {d.get('classes', '?')} classes) from {d.get('source', 'an unrecorded source')}: "
            f"{d.get('train_examples', '?')} training images and {d.get('validation_examples', '?')} validation "
            f"images ({d.get('validation', 'validation split not recorded')})."))
        statuses = logs.runs["status"].value_counts().to_dict()
        status_text = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        self.doc.text(sec, (
            f"This report reads {len(logs.runs)} runs ({status_text}) and {logs.points_read} scalar points "
            f"from {logs.logdir.name}/; every point is kept. Table values are the {self.summary_text} "
            "of each run; with repeated seeds they show mean ± sample standard deviation and n."))

    def architecture(self, sec: Section | None = None) -> None:
        sec = sec or self.doc.section("Architecture and Framework")
        first = next(iter(self.logs.manifests.values()), {})
        spec = first.get("spec", {})
        varying = ", ".join(f.replace("_", " ") for f in self.factors) or "nothing"
        hidden = spec.get("hidden") or []
        arch = {"mlp": f"A feed-forward network (hidden layers {', '.join(map(str, hidden)) or 'none'})",
                "cnn": "A small convolutional network (Conv2D 32×3, max-pooling, dense layers)",
                "linear": "A linear classifier with a one-unit bottleneck"}.get(spec.get("architecture"), "A network")
        self.doc.text(sec, (
            f"{arch} with {spec.get('activation', '?')} activations and a softmax output, trained with "
            f"{spec.get('optimizer', '?')} at learning rate {spec.get('learning_rate', '?')} on "
            f"{str(spec.get('loss', '?')).replace('_', ' ')} for {spec.get('epochs', '?')} epochs. "
            f"Across runs, these settings vary: {varying}. Batch norm, where used, follows each hidden layer."))
        versions = first.get("versions", {})
        hw = first.get("hardware", {})
        gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
        self.doc.text(sec, (
            f"Framework: TensorFlow {versions.get('tensorflow', '?')} with Keras {versions.get('keras', '?')}, "
            f"Python {versions.get('python', '?')}. Hardware: {hw.get('cpu', '?')} "
            f"({hw.get('cpu_count', '?')} CPU threads), {gpus}."))
        model = first.get("model")
        if model:
            rows = [[l["name"], l["type"], l["output_shape"], f"{l['params']:,}"] for l in model["layers"]]
            rows.append(["Total", "", "", f"{model['total_params']:,}"])
            self.doc.table(sec, Table("model_summary", "Model summary (first run of the grid)",
                                      ["Layer", "Type", "Output shape", "Parameters"], rows,
                                      [dict(zip(["layer", "type", "output_shape", "params"],
                                                [l["name"], l["type"], l["output_shape"], l["params"]]))
                                       for l in model["layers"]]))

    def data_problems(self) -> None:
        problems = list(self.logs.problems)
        diverged = self.logs.runs[self.logs.runs["status"] == DIVERGED]["run"].tolist()
        problems += [f"{r}: diverged (non-finite loss); shown as diverged, left out of means" for r in diverged]
        if not problems:
            return
        sec = self.doc.section("Data problems")
        self.doc.text(sec, "These runs or grid cells are missing, damaged or diverged; tables show “—” "
                           "for missing cells and the figures leave them out.")
        self.doc.bullets(sec, problems)

    def provenance(self) -> None:
        sec = self.doc.section("Appendix: provenance")
        logs = self.logs
        versions = {}
        for m in logs.manifests.values():
            for k, v in (m.get("versions") or {}).items():
                versions.setdefault(k, set()).add(v)
        self.doc.text(sec, "Library versions: " + "; ".join(
            f"{k} {', '.join(sorted(v))}" for k, v in sorted(versions.items())) + ".")
        hw = {(m.get("hardware") or {}).get("cpu", "?") for m in logs.manifests.values()}
        self.doc.text(sec, f"Hardware: {'; '.join(sorted(hw))}. Log folder SHA-256: {logs.digest}.")
        rows, data = [], []
        for r in logs.runs.sort_values("run").itertuples(index=False):
            m = logs.manifests.get(r.run, {})
            rows.append([r.run, str(getattr(r, "seed", "")), r.status, str(m.get("steps", "")),
                         f"{m.get('wall_seconds') or 0:.1f}"])
            data.append({"run": r.run, "seed": getattr(r, "seed", None), "status": r.status,
                         "steps": m.get("steps"), "wall_seconds": m.get("wall_seconds")})
        self.doc.table(sec, Table("runs", "Runs read", ["Run", "Seed", "Status", "Steps", "Wall s"], rows, data))

    # -- lab format (document 004) -------------------------------------------------------

    def lab(self) -> Document:
        self.introduction()
        self.architecture()
        for key in self.section_keys():
            self.doc.section(self.section_title(key))
            for bs in self.batch_sizes:
                self.lab_batch_size(key, bs)
            if len(self.batch_sizes) > 1:
                self.lab_comparison(key)
        gradient.add_section(self, self.target_loss)
        self.data_problems()
        self.provenance()
        return self.doc

    def _bn_curves(self, where: dict, split: str, tag: str, x_scale: float = 1.0, x_offset: float = 0.0):
        series = []
        for bn in self.bn_values:
            w = where if bn is None else {**where, "batch_norm": bn}
            s = curve(self.logs.scalars, self.runs_where(w), split, tag,
                      label="All runs" if bn is None else BN_LABEL[bn], x_scale=x_scale, x_offset=x_offset)
            if s:
                series.append(s)
        return series

    def lab_batch_size(self, key: dict, bs) -> None:
        where = dict(key) if bs is None else {**key, "batch_size": bs}
        title = "All runs" if bs is None else f"Batch Size {bs}"
        sec = self.doc.section(title, level=2)
        tag_base = self.slug(key) + f"_bs{bs}"
        label = f"Batch size {bs}" if bs is not None else "All runs"
        smoothing = self.doc.smoothing
        series = self._bn_curves(where, TRAIN, STEP_LOSS)
        self.doc.figure(sec, f"{label} train loss", line_figure(
            series, xlabel="step", ylabel="train loss (per step)", smoothing=smoothing, cache=self.figure_cache),
            smoothed=True)
        self.doc.table(sec, self.bn_rows(where, TRAIN, EPOCH_LOSS, "Train Loss", f"train_loss_{tag_base}"))
        series = self._bn_curves(where, VALIDATION, EPOCH_LOSS, x_offset=1)
        self.doc.figure(sec, f"{label} val loss", line_figure(series, xlabel="epoch", ylabel="validation loss",
                                                                        cache=self.figure_cache))
        self.doc.table(sec, self.bn_rows(where, VALIDATION, EPOCH_LOSS, "Val loss", f"val_loss_{tag_base}"))
        bullets = []
        if len(self.bn_values) == 2:
            for split, what in ((TRAIN, f"{self.summary_text} train loss"),
                                (VALIDATION, f"{self.summary_text} validation loss")):
                off = cell(self.logs, self.values, {**where, "batch_norm": False}, split, EPOCH_LOSS)
                on = cell(self.logs, self.values, {**where, "batch_norm": True}, split, EPOCH_LOSS)
                bullets.append(analysis.compare_bn(off, on, what))
        rough = []
        for bn in self.bn_values:
            w = where if bn is None else {**where, "batch_norm": bn}
            vals = [analysis.roughness(self.logs.scalars, r, self.steps_per_epoch(r)) for r in self.runs_where(w)]
            vals = [v for v in vals if np.isfinite(v)]
            if vals:
                rough.append(f"{'all runs' if bn is None else BN_LABEL[bn].lower()} "
                             f"{np.mean(vals):.4f}")
        if rough:
            bullets.append("Roughness of the per-step train loss in the last epoch (std of step-to-step "
                           "changes): " + "; ".join(rough) + ".")
        self.doc.bullets(sec, bullets)

    def lab_comparison(self, key: dict) -> None:
        sec = self.doc.section("Batch Size Comparison", level=2)
        tag_base = self.slug(key)
        for split, tag, what, fig_label in ((TRAIN, EPOCH_LOSS, "Train Loss", "train loss"),
                                            (VALIDATION, EPOCH_LOSS, "Val loss", "val loss"),
                                            (VALIDATION, EPOCH_ACCURACY, "Validation Accuracy", None)):
            if fig_label:
                series = []
                for bs in self.batch_sizes:
                    w = {**key, "batch_size": bs}
                    if len(self.bn_values) == 2:
                        w["batch_norm"] = False
                    s = curve(self.logs.scalars, self.runs_where(w), split, tag, label=f"batch {bs}", x_offset=1)
                    if s:
                        series.append(s)
                bn_note = " (without batch norm)" if len(self.bn_values) == 2 else ""
                self.doc.figure(sec, f"Batch size comparison, {fig_label}{bn_note}",
                                line_figure(series, xlabel="epoch", ylabel=fig_label, cache=self.figure_cache))
            rows, data = [], []
            cols = ["Batch size"] + [("Loss Value" if tag.endswith("loss") else "Accuracy") if bn is None
                                     else BN_LABEL[bn] for bn in self.bn_values]
            for bs in self.batch_sizes:
                cells = [cell(self.logs, self.values, {**key, "batch_size": bs} if bn is None else
                              {**key, "batch_size": bs, "batch_norm": bn}, split, tag) for bn in self.bn_values]
                rows.append([str(bs)] + [c.text() for c in cells])
                for bn, c in zip(self.bn_values, cells):
                    data.append(cell_record({"batch_size": bs, "batch_norm": bn}, c))
            self.doc.table(sec, Table(f"{what.lower().replace(' ', '_')}_by_batch_size_{tag_base}",
                                      f"{what} ({self.summary_text})", cols, rows, data))
        bullets = []
        for split, tag, what in ((TRAIN, EPOCH_LOSS, "train loss"),
                                 (VALIDATION, EPOCH_LOSS, "validation loss"),
                                 (VALIDATION, EPOCH_ACCURACY, "validation accuracy")):
            for bn in self.bn_values:
                w = dict(key) if bn is None else {**key, "batch_norm": bn}
                cells = [(bs, cell(self.logs, self.values, {**w, "batch_size": bs}, split, tag))
                         for bs in self.batch_sizes]
                label = f"{self.summary_text} {what}" + ("" if bn is None else f" {BN_LABEL[bn].lower()}")
                bullets.append(analysis.trend(cells, label))
            if len(self.bn_values) == 2 and tag == EPOCH_LOSS:
                pairs = [(bs, cell(self.logs, self.values, {**key, "batch_size": bs, "batch_norm": False}, split, tag),
                          cell(self.logs, self.values, {**key, "batch_size": bs, "batch_norm": True}, split, tag))
                         for bs in self.batch_sizes]
                bullets.append(analysis.count_bn_wins(pairs, f"{self.summary_text} {what}", "batch sizes"))
        steps = {}
        for bs in self.batch_sizes:
            runs = self.logs.runs[(self.logs.runs["batch_size"] == bs) & (self.logs.runs["status"] == COMPLETE)]
            if not runs.empty:
                steps[bs] = float(runs["steps"].median())
        epochs = self.logs.runs["epochs"].iloc[0] if "epochs" in self.logs.runs and "epochs" not in self.factors else None
        bullets.append(analysis.steps_context(steps, epochs))
        self.doc.bullets(sec, bullets)

    # -- task format (documents 000/001) -------------------------------------------------

    def task(self) -> Document:
        exp = self.logs.experiment.get("experiment", {})
        sec = self.doc.section("Objective")
        self.doc.text(sec, clip(exp.get("objective") or "", TEXT_LIMITS["objective"]) or "Study how the settings varied in this grid change training.")
        self.introduction(sec)
        sec = self.doc.section("Code Used")
        source = self.logs.experiment.get("source_text")
        if source:
            self.doc.text(sec, "The experiment file that produced these runs:")
            sec.blocks.append({"kind": "code", "text": clip(source, SOURCE_TEXT_LIMIT)})
        self.architecture(sec)
        sec = self.doc.section("Results")
        keys = [{**k, "batch_size": bs} if bs is not None else dict(k)
                for k in self.section_keys() for bs in self.batch_sizes]
        rough_cells, final_cells = [], []
        for where in keys:
            title = ", ".join(_fmt_factor(k, v) if k != "batch_size" else f"batch size {v}" for k, v in where.items())
            sub = self.doc.section(title[:1].upper() + title[1:] or "All runs", level=2)
            self.task_epoch_table(sub, where, title)
            runs = self.runs_where(where)
            vals = [analysis.roughness(self.logs.scalars, r, self.steps_per_epoch(r)) for r in runs]
            vals = [v for v in vals if np.isfinite(v)]
            if vals:
                rough_cells.append((where.get("batch_size"), float(np.mean(vals))))
            final_cells.append((where.get("batch_size"),
                                cell(self.logs, self.values, where, VALIDATION, EPOCH_LOSS)))
        overlay = [s for s in (curve(self.logs.scalars, self.runs_where(w), VALIDATION, EPOCH_LOSS,
                                     label=f"batch {w.get('batch_size')}", x_offset=1) for w in keys) if s]
        self.doc.figure(sec, "Validation loss by batch size", line_figure(overlay, xlabel="epoch",
                                                                           ylabel="validation loss",
                                                                           cache=self.figure_cache))
        sec = self.doc.section("Short Analysis")
        bullets = []
        if len(rough_cells) > 1:
            rough_sorted = sorted(rough_cells, key=lambda kv: kv[0] or 0)
            bullets.append("Roughness of the per-step train loss in the last epoch (std of step-to-step "
                           "changes): " + "; ".join(f"batch {k}: {v:.4f}" for k, v in rough_sorted) + ".")
        if len(final_cells) > 1 and all(k is not None for k, _ in final_cells):
            bullets.append(analysis.trend(sorted(final_cells, key=lambda kv: kv[0]),
                                          f"{self.summary_text} validation loss"))
        self.doc.bullets(sec, bullets)
        sec = self.doc.section("Key Takeaway")
        finished = [(k, c) for k, c in final_cells if not c.missing]
        if finished:
            best = min(finished, key=lambda kv: kv[1].mean)
            caveat = ("" if best[1].n > 1 else
                      " This rests on one seed per setting; rerun with repeats to see whether it holds.")
            self.doc.text(sec, f"In this grid the lowest {self.summary_text} validation loss came at batch size "
                               f"{best[0]} ({best[1].mean:.4f}).{caveat}")
        else:
            self.doc.text(sec, "No run finished, so there is nothing to conclude.")
        gradient.add_section(self, self.target_loss)
        self.data_problems()
        self.provenance()
        return self.doc

    def task_epoch_table(self, sec: Section, where: dict, title: str) -> None:
        runs = self.runs_where(where)
        df = self.logs.scalars[(self.logs.scalars["run"].isin(runs)) &
                               (self.logs.scalars["tag"].isin(list(EPOCH_METRICS)))]
        if df.empty:
            self.doc.text(sec, "No finished run in this cell.")
            return
        df = df.assign(col=np.where(df["split"] == VALIDATION, "val_", "") + df["tag"].str.removeprefix("epoch_"))
        wide = df.pivot_table(index="step", columns="col", values="value", aggfunc="mean")
        cols = [c for c in ("loss", "accuracy", "val_loss", "val_accuracy") if c in wide]
        rows = [[str(int(step) + 1)] + [f"{wide.at[step, c]:.4f}" for c in cols] for step in wide.index]
        data = [{"epoch": int(step) + 1, **{c: float(wide.at[step, c]) for c in cols}} for step in wide.index]
        n = len(runs)
        note = f" (mean of {n} seeds)" if n > 1 else ""
        key = "epochs_" + re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(f"{k}{v}" for k, v in where.items()))
        self.doc.table(sec, Table(key, f"Per-epoch results, {title}{note}", ["Epoch"] + cols, rows, data))
        panels = []
        for tag, ylabel in ((EPOCH_LOSS, "loss"), (EPOCH_ACCURACY, "accuracy")):
            series = [s for s in (curve(self.logs.scalars, runs, split, tag, label=split, x_offset=1)
                                  for split in (TRAIN, VALIDATION)) if s]
            panels.append((series, "epoch", ylabel))
        self.doc.figure(sec, f"{title[:1].upper() + title[1:]}: loss (left) and accuracy (right), "
                             "train vs validation", panels_figure(panels, cache=self.figure_cache))


def build(logs: Logs, *, template: str, summary: str = "final", smoothing: float = 0.0,
          figure_cache: FigureCache | None = None, target_loss: float | None = None) -> dict:
    builder = Builder(logs, summary=summary, smoothing=smoothing, figure_cache=figure_cache,
                      target_loss=target_loss)
    doc = builder.lab() if template == "lab" else builder.task()
    if figure_cache is not None:
        figure_cache.prune()
    exp = logs.experiment.get("experiment", {})
    return {
        "title": clip(exp.get("title") or logs.logdir.name, TEXT_LIMITS["title"]),
        "author": clip(exp.get("author", ""), TEXT_LIMITS["author"]), "id": clip(exp.get("id", ""), TEXT_LIMITS["id"]),
        "date": clip(exp.get("date") or date.today().isoformat(), DATE_LIMIT),
        "template": template, "sections": doc.sections, "tables": doc.tables, "draft": draft_line(logs),
        "n_figures": doc.figures, "runs_read": len(logs.runs), "points_read": logs.points_read,
    }


def draft_line(logs: Logs) -> str:
    """"DRAFT: 3 of 30 runs of the grid are not finished (2 running, 1 missing)", or ""."""
    if not logs.unfinished:
        return ""
    planned = len(logs.experiment.get("runs") or []) or len(logs.runs) + len(logs.unfinished)
    counts: dict[str, int] = {}
    for status in logs.unfinished.values():
        counts[status] = counts.get(status, 0) + 1
    detail = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return (f"DRAFT: {len(logs.unfinished)} of {planned} runs of the grid are not finished ({detail}); "
            "the numbers below leave them out")

