"""The report's "Gradient noise" section: the noise scale the trainer measured (tags
`gradient/*` in each run's train/ folder), per batch size and batch norm, and how many
steps and examples each setting took to reach a target training loss."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from contract.layout import (NOISE_B_SIMPLE, NOISE_EPOCH_AT_BATCH, NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_COSINE,
                             NOISE_PREFIX, STEP_LOSS, TRAIN, noise_tag)
from report.figures import curve, panels_figure
from report.tables import Cell, Table

# A run has reached a loss when the mean of its step losses over the last ≈ this many
# examples is at or below it: one noisy small-batch step does not count as reaching it.
WINDOW_EXAMPLES = 2048


def values_at_epochs(scalars: pd.DataFrame, runs: list[str], tag: str) -> dict[int, Cell]:
    """Per epoch: mean ± std over `runs` of an epoch-indexed gradient tag."""
    df = scalars[(scalars["run"].isin(runs)) & (scalars["split"] == TRAIN) & (scalars["tag"] == noise_tag(tag))]
    out = {}
    for epoch, g in df.groupby("step"):
        v = g["value"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if len(v):
            out[int(epoch)] = Cell(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                                   n=len(v))
    return out


def windowed_loss(steps: np.ndarray, losses: np.ndarray, batch_size: int) -> np.ndarray:
    """Trailing mean over ⌈WINDOW_EXAMPLES / batch⌉ steps (fewer at the very start)."""
    window = max(1, math.ceil(WINDOW_EXAMPLES / batch_size))
    c = np.cumsum(np.insert(losses.astype(float), 0, 0.0))
    idx = np.arange(1, len(losses) + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


def step_losses(scalars: pd.DataFrame, run: str) -> tuple[np.ndarray, np.ndarray]:
    df = scalars[(scalars["run"] == run) & (scalars["split"] == TRAIN) & (scalars["tag"] == STEP_LOSS)]
    df = df.sort_values("step")
    return df["step"].to_numpy(dtype=int), df["value"].to_numpy(dtype=float)


def steps_to_target(scalars: pd.DataFrame, run: str, batch_size: int, target: float) -> int | None:
    steps, losses = step_losses(scalars, run)
    if not len(steps):
        return None
    reached = np.flatnonzero(windowed_loss(steps, losses, batch_size) <= target)
    return int(steps[reached[0]]) if len(reached) else None


def final_windowed_loss(scalars: pd.DataFrame, run: str, batch_size: int) -> float | None:
    steps, losses = step_losses(scalars, run)
    return float(windowed_loss(steps, losses, batch_size)[-1]) if len(steps) else None


def default_target(scalars: pd.DataFrame, runs: dict[str, int]) -> float | None:
    """The highest final (windowed) training loss among the runs, rounded up to 3
    significant digits: a level every run reached, so the table compares how fast."""
    finals = [v for run, bs in runs.items() if (v := final_windowed_loss(scalars, run, bs)) is not None
              and math.isfinite(v)]
    if not finals:
        return None
    top = max(finals)
    if top <= 0:
        return top
    scale = 10 ** (math.floor(math.log10(top)) - 2)
    return math.ceil(top / scale) * scale


def placement_sentence(run_label: str, batch_size: int, b_simple: float | None, n_measurements: int) -> str:
    """Where a run's batch size sits against its own measured noise scale."""
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return (f"{run_label}: no noise scale could be formed (the averaged |G|² estimate was not positive "
                f"over its {n_measurements} measurements), so its batch of {batch_size} cannot be placed.")
    ratio = batch_size / b_simple
    scale = f"B_simple ≈ {b_simple:.3g} at the end of training"
    if 0.5 <= ratio <= 2:
        return (f"{run_label}: batch {batch_size}, {scale}; the batch is within a factor of 2 of the "
                f"noise scale, the region where, by the noise-scale criterion, steps are neither "
                f"mostly noise nor wasteful of examples.")
    if ratio < 1:
        return (f"{run_label}: batch {batch_size}, {scale}, {1 / ratio:.3g}× the batch; below the noise "
                f"scale, each step's gradient is dominated by noise (tr(Σ)/B exceeds |G|²), so a larger "
                f"batch would have made each step more useful.")
    return (f"{run_label}: batch {batch_size}, {scale}, {ratio:.3g}× smaller than the batch; above the "
            f"noise scale, extra examples per step mostly average away noise that was already small, "
            f"so each example buys less progress (diminishing returns).")


def fmt(c: Cell | None, digits: int = 3) -> str:
    if c is None or c.missing:
        return "—"
    s = f"{c.mean:.{digits}g}"
    return s + (f" ± {c.std:.{digits}g}" if c.n > 1 else "")


def add_section(builder, target_loss: float | None = None) -> None:
    """Append the "Gradient noise" section to `builder.doc` (both templates)."""
    doc, logs = builder.doc, builder.logs
    sec = doc.section("Gradient noise")
    has = logs.scalars["tag"].astype(str).str.startswith(NOISE_PREFIX)
    measured = {run: m.get("gradient_noise") for run, m in logs.manifests.items()
                if isinstance(m.get("gradient_noise"), dict) and m["gradient_noise"].get("measurements")}
    if not has.any() or not measured:
        doc.text(sec, f"These runs were trained without measuring the gradient noise scale (no `{NOISE_PREFIX}` "
                      "scalars in their logs). Train them again with `[gradient_noise] enabled = true` "
                      "(the default) to fill this section.")
        return
    settings = next(iter(measured.values()))
    doc.text(sec, (
        f"With the weights held fixed, every {settings['every']} steps and at each epoch end the trainer took "
        f"the gradients of {settings['batches']} disjoint batches of {settings['small_batch']} training "
        f"examples and their mean (a batch of {settings['big_batch']}), and estimated |G|² and tr(Σ) from "
        f"E|G_B|² = |G|² + tr(Σ)/B (McCandlish et al. 2018, App. A.1). B_simple = tr(Σ)/|G|² is the ratio "
        f"of their bias-corrected moving averages (β = {settings['beta']}); tr(Σ)/B is the gradient noise at "
        f"the run's own batch size B; the cosine compares one training-size mini-batch gradient with the "
        f"large-batch gradient. {len(measured)} of {len(logs.runs)} runs carry these measurements "
        f"({sum(m['measurements'] for m in measured.values())} in all)."))
    runs_by_key = []
    for key in builder.section_keys():
        title = builder.section_title(key) if key else ""
        for bs in builder.batch_sizes:
            rows, data = [], []
            for bn in builder.bn_values:
                where = {**key, **({"batch_size": bs} if bs is not None else {}),
                         **({"batch_norm": bn} if bn is not None else {})}
                runs = builder.runs_where(where)
                runs_by_key.append((key, bs, bn, runs))
                cols = {t: values_at_epochs(logs.scalars, runs, t)
                        for t in (NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_AT_BATCH, NOISE_EPOCH_COSINE)}
                epochs = sorted(set().union(*[c.keys() for c in cols.values()]))
                label = "—" if bn is None else ("on" if bn else "off")
                for e in epochs:
                    cells = [cols[t].get(e) for t in cols]
                    rows.append([str(e + 1), label] + [fmt(c) for c in cells])
                    data.append({"epoch": e + 1, "batch_norm": bn, "runs": len(runs), **{
                        f"{t.removeprefix('epoch_')}_{s}": (None if c is None or c.missing else
                                                          (c.mean if s == "mean" else (None if c.n < 2 else c.std)))
                        for t, c in zip(cols, cells) for s in ("mean", "std")}})
            if not rows:
                continue
            where_text = ", ".join(p for p in (title, f"batch size {bs}" if bs is not None else "") if p)
            doc.table(sec, Table(
                f"gradient_noise_{builder.slug(key)}_bs{bs}",
                f"Gradient noise at the end of each epoch, {where_text} (mean ± std over seeds)",
                ["Epoch", "BN", "B_simple", "tr(Σ)/B", "Cosine"], rows, data))
        # B_simple over training, x in examples so that batch sizes share an axis.
        panels = []
        for bn in builder.bn_values:
            series = []
            for k, bs, b, runs in runs_by_key:
                if k == key and b == bn and bs is not None:
                    s = curve(logs.scalars, runs, TRAIN, noise_tag(NOISE_B_SIMPLE), label=f"batch {bs}", x_scale=bs)
                    if s:
                        series.append(s)
            if series:
                panels.append((series, "examples seen" + ("" if bn is None else f" (BN {'on' if bn else 'off'})"),
                               "B_simple"))
        if panels:
            doc.figure(sec, f"Gradient noise scale B_simple over training{', ' + title if title else ''} "
                            "(mean over seeds)", panels_figure(panels, cache=builder.figure_cache))
    # One sentence per run.
    sentences = []
    order = [c for c in ("initializer", "batch_size", "batch_norm", "seed", "run") if c in logs.runs]
    for run in logs.runs.sort_values(order)["run"]:
        m = logs.manifests.get(run, {})
        bs = (m.get("spec") or {}).get("batch_size")
        g = m.get("gradient_noise") or {}
        if bs is None or not g.get("measurements"):
            continue
        df = logs.scalars[(logs.scalars["run"] == run) & (logs.scalars["tag"] == noise_tag(NOISE_EPOCH_B_SIMPLE))]
        b = float(df.sort_values("step")["value"].iloc[-1]) if len(df) else None
        sentences.append(placement_sentence(run, int(bs), b, int(g["measurements"])))
    if sentences:
        doc.text(sec, "Each run's batch size against its own measured noise scale:")
        doc.bullets(sec, sentences)
    target_table(builder, sec, runs_by_key, target_loss)


def target_table(builder, sec, runs_by_key, target_loss: float | None) -> None:
    doc, logs = builder.doc, builder.logs
    batch = {run: int((logs.manifests.get(run, {}).get("spec") or {}).get("batch_size") or 1)
             for run in logs.runs["run"]}
    finished = set(builder.runs_where({}))
    complete = {r: b for r, b in batch.items() if r in finished}
    target = target_loss if target_loss is not None else default_target(logs.scalars, complete)
    if target is None:
        return
    how = ("given with --target-loss" if target_loss is not None else
           "the highest final training loss among the runs, so every run reaches it")
    doc.text(sec, (f"Steps and examples to reach a training loss of {target:g} ({how}); a run has reached it "
                   f"when the mean of its step losses over the last ⌈{WINDOW_EXAMPLES}/B⌉ steps "
                   f"(about {WINDOW_EXAMPLES} examples) is at or below it."))
    rows, data = [], []
    for key, bs, bn, runs in runs_by_key:
        if not runs or bs is None:
            continue
        steps = [steps_to_target(logs.scalars, r, batch[r], target) for r in runs]
        hit = [s for s in steps if s is not None]
        label = builder.section_title(key) if key else ""
        bn_text = "—" if bn is None else ("on" if bn else "off")
        if hit:
            s_cell = Cell(mean=float(np.mean(hit)), std=float(np.std(hit, ddof=1)) if len(hit) > 1 else math.nan,
                          n=len(hit))
            step_text = fmt(s_cell, 4)
            ex_text = f"{s_cell.mean * bs:,.0f}"
        else:
            step_text = ex_text = "not reached"
        missed = len(steps) - len(hit)
        reached = f"{len(hit)} of {len(steps)}" + (" (the rest never did)" if missed and hit else "")
        rows.append([label or "All", str(bs), bn_text, step_text, ex_text, reached])
        data.append({"setting": label, "batch_size": bs, "batch_norm": bn, "target_loss": target,
                     "steps_mean": float(np.mean(hit)) if hit else None,
                     "examples_mean": float(np.mean(hit)) * bs if hit else None,
                     "runs_reached": len(hit), "runs": len(steps)})
    if rows:
        doc.table(sec, Table("steps_to_target", f"Steps and examples to a training loss of {target:g} "
                                                "(mean ± std over the seeds that reached it)",
                             ["Setting", "Batch", "BN", "Steps", "Examples", "Runs reaching it"], rows, data))
