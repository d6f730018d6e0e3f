"""The report's "Gradient noise" section: the noise scale the trainer measured (tags
`gradient/*` in each run's train/ folder), per batch size and batch norm, and how many
steps and examples each setting took to reach a target training loss."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from contract.layout import (
    DIVERGED,
    NOISE_B_SIMPLE,
    NOISE_EPOCH_AT_BATCH,
    NOISE_EPOCH_B_SIMPLE,
    NOISE_EPOCH_COSINE,
    NOISE_PREFIX,
    STEP_LOSS,
    TRAIN,
    noise_tag,
)
from report.figures import curve, panels_figure
from report.tables import Cell, Table, cell_record

# A run has reached a loss when the mean of its step losses over the last ≈ this many
# examples is at or below it: one noisy small-batch step does not count as reaching it.
WINDOW_EXAMPLES = 2048


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


def fmt(c: Cell | None, digits: int = 3) -> str:
    """Mean ± the half-width of its 95% t-interval, to `digits` significant digits."""
    if c is None or c.missing:
        return "—"
    s = f"{c.mean:.{digits}g}"
    return s + (f" ± {c.half:.{digits}g}" if c.n > 1 else "")


def _moments(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def final_values(scalars: pd.DataFrame, runs: list[str], tag: str) -> dict[str, float]:
    """run → the last finite value of an epoch-indexed gradient tag."""
    df = scalars[(scalars["run"].isin(runs)) & (scalars["split"] == TRAIN) & (scalars["tag"] == noise_tag(tag))]
    df = df[np.isfinite(df["value"].to_numpy(dtype=float))].sort_values("step")
    return {run: float(g["value"].iloc[-1]) for run, g in df.groupby("run")}


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
    tags = (NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_AT_BATCH, NOISE_EPOCH_COSINE)
    for key in builder.section_keys():
        title = builder.section_title(key) if key else ""
        rows, data = [], []
        for bs in builder.batch_sizes:
            for bn in builder.bn_values:
                where = {**key, **({"batch_size": bs} if bs is not None else {}),
                         **({"batch_norm": bn} if bn is not None else {})}
                runs = builder.runs_where(where)
                runs_by_key.append((key, bs, bn, runs))
                finals = {t: final_values(logs.scalars, runs, t) for t in tags}
                if not any(finals.values()):
                    continue
                cells = [Cell(*_moments(list(finals[t].values())), n=len(finals[t])) for t in tags]
                label = "—" if bn is None else ("on" if bn else "off")
                rows.append([str(bs), label] + [fmt(c) for c in cells] + [f"{len(finals[tags[0]])} of {len(runs)}"])
                data.append({"batch_size": bs, "batch_norm": bn, "runs": len(runs), **{
                    f"{t.removeprefix('epoch_')}_{k}": v for t, c in zip(tags, cells)
                    for k, v in cell_record({}, c).items() if k != DIVERGED}})
        if rows:
            doc.table(sec, Table(
                f"gradient_noise_{builder.slug(key)}",
                f"Gradient noise at the end of training{', ' + title if title else ''} (last epoch's value per "
                "run; mean ± 95% CI half-width over seeds)",
                ["Batch", "BN", "B_simple", "tr(Σ)/B", "Cosine", "Runs with a value"], rows, data,
                compact=True))
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
                                                "(mean ± 95% CI half-width over the seeds that reached it)",
                             ["Setting", "Batch", "BN", "Steps", "Examples", "Runs reaching it"], rows, data,
                             compact=True))
