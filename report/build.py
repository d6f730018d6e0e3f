"""Logs → the report's context: numbered sections, figures, tables and computed sentences.

Python decides every number and sentence here; the templates only lay them out.
Figures and tables are numbered in the order they are added, so the HTML and the
PDF (rendered from the same HTML) carry the same numbers. The formats themselves are
in report/lab.py (document 004) and report/task.py (documents 000–002).
"""
from __future__ import annotations

import math
import re
from datetime import date
from pathlib import Path

import tomllib

from contract.layout import (
    COMPLETE,
    DATE_LIMIT,
    DIVERGED,
    EPOCH_LOSS,
    SOURCE_TEXT_LIMIT,
    TEXT_LIMITS,
    TRAIN,
    clip,
    control_characters,
)
from report import analysis, stats
from report.document import Document, Section
from report.figures import FigureCache, curve, off_scale_note
from report.load import Logs
from report.stats import Comparison
from report.tables import (
    Cell,
    Table,
    cell,
    cell_record,
    describe_summary,
    factors,
    run_values,
)

PRETTY_INIT = {
    "glorot_normal": "Xavier (Glorot) normal", "glorot_uniform": "Xavier (Glorot) uniform",
    "he_normal": "He normal", "he_uniform": "He uniform", "random_uniform": "Random uniform",
    "random_normal": "Random normal", "lecun_normal": "LeCun normal", "lecun_uniform": "LeCun uniform",
    "truncated_normal": "Truncated normal", "orthogonal": "Orthogonal",
}
BN_LABEL = {False: "Without batch norm", True: "With batch norm"}
SECTION_AXES_EXCLUDED = {"batch_size", "batch_norm"}
BAND = "band: 95% t-interval of the mean over seeds"


def fmt_factor(key: str, value) -> str:
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
        # run → the key that pairs it with its counterpart in a comparison of one factor:
        # every other varying factor and the seed (which fixes initial weights and data order).
        self._rows = {r["run"]: r for r in logs.runs.to_dict("records")}
        self.findings: list[tuple[Comparison, str]] = []
        self.seeds = int(logs.runs["seed"].nunique()) if "seed" in logs.runs else 1

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

    def cell(self, where: dict, split: str, tag: str) -> Cell:
        return cell(self.logs, self.values, where, split, tag)

    def pair_key(self, run: str, factor: str) -> tuple:
        row = self._rows[run]
        return tuple(row.get(f) for f in [*self.factors, "seed"] if f != factor)

    def paired(self, where: dict, factor: str, a, b, split: str, tag: str, *, what: str,
               label: str) -> Comparison | None:
        """b − a over runs that match in every other factor and the seed."""
        ca, cb = self.cell({**where, factor: a}, split, tag), self.cell({**where, factor: b}, split, tag)
        return stats.paired({self.pair_key(r, factor): x for r, x in ca.values.items()},
                            {self.pair_key(r, factor): x for r, x in cb.values.items()}, what=what, label=label)

    def slope(self, where: dict, split: str, tag: str, *, what: str, label: str) -> Comparison | None:
        """The value's slope against log2(batch size) over every finished run matching `where`."""
        c = self.cell(where, split, tag)
        points = [(self._rows[r]["batch_size"], x) for r, x in c.values.items()]
        return stats.slope(points, what=what, label=label)

    def short(self, split: str, tag: str) -> str:
        """'val loss': a metric's name for a row label (the caption gives the summary)."""
        return f"{'train' if split == TRAIN else 'val'} {'loss' if tag == EPOCH_LOSS else 'accuracy'}"

    def what(self, split: str, tag: str) -> str:
        metric = "loss" if tag == EPOCH_LOSS else "accuracy"
        return f"{self.summary_text} {'train' if split == TRAIN else 'validation'} {metric}"

    def finding(self, c: Comparison | None, table: Table, group: str, item: str) -> None:
        """Register a tested comparison for the Findings section: `group` names the kind of
        effect ("Batch norm, val loss, He normal"), `item` the setting ("batch 256")."""
        if c is not None:
            c.where = self.doc.ref(table)
            c.extra.update(group=group, item=item)
            self.findings.append((c, f"{group}, {item}" if item else group))

    def section_keys(self, exclude=SECTION_AXES_EXCLUDED) -> list[dict]:
        """One dict per combination of the varying factors other than `exclude` (batch size
        and BN: the axes the lab format lays out inside a section)."""
        keys = [f for f in self.factors if f not in exclude]
        if not keys:
            return [{}]
        combos = self.logs.runs[keys].drop_duplicates().sort_values(keys)
        return [dict(zip(keys, row)) for row in combos.itertuples(index=False)]

    def section_title(self, key: dict) -> str:
        if not key:
            return "Results"
        parts = [fmt_factor(k, v) for k, v in key.items()]
        if "initializer" in key:
            parts[0] += " weight initialization"
        return ", ".join(parts)

    def slug(self, key: dict) -> str:
        """A file-name-safe stem for a section's CSVs."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(v) for v in key.values())) or "all"

    def steps_per_epoch(self, run: str) -> int:
        m = self.logs.manifests.get(run, {})
        bs = m.get("spec", {}).get("batch_size") or 1
        n = (m.get("dataset") or self.dataset).get("train_examples") or 1
        return math.ceil(n / bs)

    def roughness(self, where: dict) -> Cell:
        """Last-epoch roughness of the per-step train loss over the finished runs of a cell."""
        vals = {r: analysis.roughness(self.logs.scalars, r, self.steps_per_epoch(r)) for r in self.runs_where(where)}
        vals = {r: x for r, x in vals.items() if math.isfinite(x)}
        e = stats.estimate(vals.values())
        return Cell(mean=e.mean, std=e.std, n=e.n, values=vals)

    def figure(self, sec: Section, caption: str, panels: list, *, smoothed: bool = False,
               size: tuple[float, float] | None = None) -> None:
        """A figure of one or more panels (series, xlabel, ylabel); the caption says what
        the band is, the smoothing, and what lies off-scale."""
        smoothing = self.doc.smoothing if smoothed else 0.0
        if any(s.n > 1 for series, _, _ in panels for s in series):
            caption += f"; {BAND}"
        note = off_scale_note(panels, smoothing)
        if note:
            caption += f"; {note}"
        from report.figures import panels_figure

        svg = panels_figure(panels, smoothing=smoothing, cache=self.figure_cache,
                            size=size or ((6.0, 2.3) if len(panels) == 1 else (7.0, 2.2)))
        self.doc.figure(sec, caption, svg, smoothed=smoothed)

    def curves(self, where: dict, split: str, tag: str, by: str, values: list, label, x_offset: float = 0.0,
               x_scale: float = 1.0) -> list:
        series = []
        for value in values:
            w = where if value is None else {**where, by: value}
            s = curve(self.logs.scalars, self.runs_where(w), split, tag, label=label(value), x_offset=x_offset,
                      x_scale=x_scale)
            if s:
                series.append(s)
        return series

    # -- shared sections -----------------------------------------------------------------

    def introduction(self, sec: Section | None = None) -> None:
        d, logs = self.dataset, self.logs
        sec = sec or self.doc.section("Introduction")
        name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}.get(d.get("name"), d.get("name", "?"))
        shape = d.get("image_shape", ["?", "?"])
        self.doc.text(sec, (
            f"The runs used {name} ({shape[0]}×{shape[-1]} grayscale images, {d.get('classes', '?')} classes) "
            f"from {d.get('source', 'an unrecorded source')}: {d.get('train_examples', '?')} training images and "
            f"{d.get('validation_examples', '?')} validation images "
            f"({d.get('validation', 'validation split not recorded')})."))
        statuses = logs.runs["status"].value_counts().to_dict()
        status_text = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        self.doc.text(sec, (
            f"This report reads {len(logs.runs)} runs ({status_text}) and {logs.points_read} scalar points "
            f"from {logs.logdir.name}/; every point is kept. Table values are the {self.summary_text} of each "
            f"run; over repeated seeds they show the mean ± the half-width of its 95% t-interval, with n. "
            f"Comparisons that share seed and data order (batch norm on/off, initializers) are paired by "
            f"seed and tested with a paired t-test; trends over batch size are least-squares slopes against "
            f"log2(batch size). Within a section the comparisons' error rate is held at 5% by Holm's "
            f"adjustment, and a direction is stated only when the adjusted p-value is below 0.05."))

    def findings_section(self) -> Section:
        """Created early (right after the introduction) and filled by `fill_findings` once
        every comparison of the report has been tested and numbered."""
        return self.doc.section("Findings")

    def fill_findings(self, sec: Section) -> None:
        tested = [(c, s) for c, s in self.findings if c.tested]
        if not tested:
            why = ("every setting has one seed, so no difference between settings can be tested"
                   if self.seeds < 2 else "no comparison had enough finished runs to be tested")
            self.doc.text(sec, f"Nothing can be resolved from these logs: {why}. To resolve effects, "
                               f"{analysis.SEEDS_HINT}.")
            return
        resolved = sorted((x for x in tested if x[0].resolved), key=lambda x: -x[0].relative)
        unresolved = [x for x in tested if not x[0].resolved]
        if resolved:
            c, subject = resolved[0]
            self.doc.text(sec, f"{len(resolved)} of {len(tested)} tested effects were resolved (Holm-adjusted "
                               f"p < 0.05 within their section). The largest, relative to its baseline mean: "
                               f"{analysis.finding(c, subject=subject)}")
            self.doc.table(sec, self._findings_table("resolved", "Resolved effects, largest first (relative to "
                                                                 "the baseline mean)", resolved))
        else:
            self.doc.text(sec, f"None of the {len(tested)} tested effects was resolved (Holm-adjusted p < 0.05 "
                               "within its section).")
        if unresolved:
            groups: dict[str, list[Comparison]] = {}
            for c, _ in unresolved:
                groups.setdefault(c.extra["group"], []).append(c)
            self.doc.text(sec, f"Not resolved ({len(unresolved)}): the interval of the difference includes zero, "
                               "or the Holm adjustment over its section leaves p ≥ 0.05; each interval is in the "
                               "table named:")
            self.doc.bullets(sec, [f"{group}: " + "; ".join(f"{c.extra['item']} ({c.where})" if c.extra["item"]
                                                           else c.where for c in cs) for group, cs in groups.items()])
        untested = len(self.findings) - len(tested)
        if untested:
            self.doc.text(sec, f"{untested} further comparison(s) had a single pair or identical differences and "
                               f"could not be tested.")

    def _findings_table(self, key: str, caption: str, found: list[tuple[Comparison, str]]) -> Table:
        rows = [[s, analysis.signed(c.diff), f"{analysis.signed(c.low)} to {analysis.signed(c.high)}",
                 analysis.p_text(c.p_adj), str(c.n), c.where] for c, s in found]
        data = [{"comparison": s, "where": c.where, **_cmp_csv(c)} for c, s in found]
        return Table(key, f"{caption}: batch norm with − without, initializer B − A, or the slope per doubling of "
                          f"the batch size, of the {self.summary_text} value, with its 95% CI and Holm-adjusted p; "
                          "n pairs or runs", ["Effect", "Difference", "95% CI", "p_Holm", "n", "Shown in"], rows, data,
                     compact=True)

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
            f"Across runs, these settings vary: {varying}; {self.seeds} seed(s) per setting. Batch norm, "
            "where used, follows each hidden layer."))
        versions = first.get("versions", {})
        hw = first.get("hardware", {})
        gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
        self.doc.text(sec, (
            f"Framework: TensorFlow {versions.get('tensorflow', '?')} with Keras {versions.get('keras', '?')}, "
            f"Python {versions.get('python', '?')}. Hardware: {hw.get('cpu', '?')}, "
            f"{hw.get('cpu_count', '?')} CPU threads, {gpus}."))
        model = first.get("model")
        if model:
            rows = [[l["name"], l["type"], l["output_shape"], f"{l['params']:,}"] for l in model["layers"]]
            rows.append(["Total", "", "", f"{model['total_params']:,}"])
            self.doc.table(sec, Table("model_summary", "Model summary (first run of the grid)",
                                      ["Layer", "Type", "Output shape", "Parameters"], rows,
                                      [dict(zip(["layer", "type", "output_shape", "params"],
                                                [l["name"], l["type"], l["output_shape"], l["params"]]))
                                       for l in model["layers"]]))

    def code_used(self, sec: Section) -> None:
        source = self.logs.experiment.get("source_text")
        if not source:
            return
        overrides = self.logs.experiment.get("overrides") or {}
        note = (" (with the command line's " + ", ".join(f"{k} = {v}" for k, v in overrides.items())
                + " applied, as marked)") if overrides else ""
        self.doc.text(sec, f"The experiment file as it ran{note}:")
        sec.blocks.append({"kind": "code", "text": clip(source, SOURCE_TEXT_LIMIT)})

    def data_problems(self) -> None:
        problems = list(self.logs.problems)
        diverged = self.logs.runs[self.logs.runs["status"] == DIVERGED]["run"].tolist()
        problems += [f"{r}: diverged (non-finite loss); shown as diverged, left out of means" for r in diverged]
        if not problems:
            return
        sec = self.doc.section("Data problems")
        self.doc.text(sec, "These runs or grid cells are missing, damaged, diverged or read with assumptions "
                           "(logs written by others); tables show “—” for missing cells and the figures leave "
                           "them out.")
        self.doc.bullets(sec, problems)

    def provenance(self) -> None:
        sec = self.doc.section("Appendix: provenance")
        logs = self.logs
        versions: dict[str, set] = {}
        for m in logs.manifests.values():
            for k, v in (m.get("versions") or {}).items():
                versions.setdefault(k, set()).add(str(v))
        self.doc.text(sec, "Library versions: " + ("; ".join(
            f"{k} {', '.join(sorted(v))}" for k, v in sorted(versions.items())) or "not recorded") + ".")
        hw = _recorded({run: m.get("hardware") or {} for run, m in logs.manifests.items()}, "cpu")
        self.doc.text(sec, f"Hardware: {'; '.join(hw)}. Log folder SHA-256: {logs.digest}.")
        precisions = _recorded(logs.manifests, "precision")
        mixed = " (mixed: bfloat16 matmuls and activations, float32 weights and loss)" if "bfloat16" in precisions else ""
        self.doc.text(sec, f"Training engine: {', '.join(_recorded(logs.manifests, 'engine'))}. "
                           f"Arithmetic precision: {', '.join(precisions)}{mixed}.")
        order = [c for c in [*self.factors, "seed", "run"] if c in logs.runs]
        packed = False
        rows, data = [], []
        for r in logs.runs.sort_values(order).itertuples(index=False):
            m = logs.manifests.get(r.run, {})
            pack = m.get("pack") if isinstance(m.get("pack"), dict) else {}
            size = pack.get("size") or 1
            packed |= size > 1
            rows.append([r.run, str(getattr(r, "seed", "")), r.status, str(m.get("steps", "")),
                         "—" if m.get("wall_seconds") is None else f"{m['wall_seconds']:.1f}", str(size)])
            data.append({"run": r.run, "seed": getattr(r, "seed", None), "status": r.status,
                         "steps": m.get("steps"), "wall_seconds": m.get("wall_seconds"), "pack_size": size,
                         "pack": pack.get("id")})
        caption = "Runs read, in grid order"
        if packed:
            caption += ("; runs trained together in one pack (same data order, one fused step) share the "
                        "pack's wall time, so Wall s is the pack's, not the run's")
        self.doc.table(sec, Table("runs", caption, ["Run", "Seed", "Status", "Steps", "Wall s", "Pack"], rows, data,
                                  compact=True))

    def bn_table(self, where: dict, split: str, tag: str, title: str, key: str,
                 diff: Comparison | None) -> Table:
        """Document 004's "Loss · Loss Value" table (rows without/with batch norm), plus the
        paired difference."""
        rows, data = [], []
        for bn in self.bn_values:
            w = dict(where) if bn is None else {**where, "batch_norm": bn}
            c = self.cell(w, split, tag)
            label = "All runs" if bn is None else BN_LABEL[bn]
            rows.append([label, c.text()])
            data.append(cell_record({"setting": label}, c))
        if diff is not None:
            rows.append(["With − without (paired) [95% CI] p_Holm", analysis.diff_cell(diff)])
            data.append({"setting": "with - without", **_cmp_csv(diff)})
        return Table(key, f"{title} ({self.summary_text}; mean ± 95% CI half-width over seeds)", ["Loss", "Loss Value"],
                     rows, data)


def _cmp_csv(c: Comparison) -> dict:
    from report.tables import comparison_record

    return comparison_record({}, c)


def build(logs: Logs, *, template: str, summary: str = "final", smoothing: float = 0.0,
          figure_cache: FigureCache | None = None, target_loss: float | None = None,
          title_block: dict | None = None) -> dict:
    """The context the templates render. `title_block` (author, id, date) overrides the
    experiment file's, for settings given at report time."""
    from report.lab import lab
    from report.task import results, task

    builder = Builder(logs, summary=summary, smoothing=smoothing, figure_cache=figure_cache,
                      target_loss=target_loss)
    doc = {"lab": lab, "task": task, "results": results}[template](builder)
    doc.finish()
    if figure_cache is not None:
        figure_cache.prune()
    exp = {**logs.experiment.get("experiment", {}), **title_from_file(logs.experiment),
           **{k: v for k, v in (title_block or {}).items() if v}}
    return {
        "title": clip(exp.get("title") or logs.logdir.name, TEXT_LIMITS["title"]),
        "author": clip(exp.get("author", ""), TEXT_LIMITS["author"]), "id": clip(exp.get("id", ""), TEXT_LIMITS["id"]),
        "date": clip(exp.get("date") or date.today().isoformat(), DATE_LIMIT),
        "template": template, "sections": doc.sections, "tables": doc.tables, "draft": draft_line(logs),
        "n_figures": doc.figures, "runs_read": len(logs.runs), "points_read": logs.points_read,
    }


TITLE_FIELDS = ("title", "author", "id", "date")


def title_from_file(experiment: dict) -> dict:
    """The title block as the experiment file says it now: an author or ID added to the
    TOML after training shows without retraining (the rest of the file is not reread)."""
    source = (experiment.get("experiment") or {}).get("source")
    try:
        doc = tomllib.loads(Path(source).read_text(encoding="utf-8")) if source else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    meta = doc.get("experiment") if isinstance(doc.get("experiment"), dict) else {}
    return {k: meta[k] for k in TITLE_FIELDS if isinstance(meta.get(k), str) and meta[k]
            and not control_characters(meta[k])}


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


def _recorded(manifests: dict, key: str) -> list[str]:
    """The distinct values of run.json's `key` over the runs ("not recorded" for runs
    without it: logs written before it was, or by others)."""
    return sorted({str(m.get(key) or "not recorded") for m in manifests.values()}) or ["not recorded"]
