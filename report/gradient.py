"""The report's "Gradient noise" section: the noise scale B_simple the trainer measured
(tags `gradient/*` in each run's train/ folder) per batch size and batch norm, with a
verdict where its interval is clear of the batch size by a factor 2, and the critical
batch size read off the training curves (report/critical.py holds the arithmetic)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from contract.layout import (
    NOISE_EPOCH_B_HIGH,
    NOISE_EPOCH_B_LOW,
    NOISE_EPOCH_B_SIMPLE,
    NOISE_PREFIX,
    TRAIN,
    noise_tag,
)
from report import critical as crit
from report.critical import (  # noqa: F401  (the curve arithmetic, importable from here as before)
    WINDOW_EXAMPLES,
    default_target,
    final_windowed_loss,
    step_losses,
    steps_to_target,
    windowed_loss,
)
from report.noise_figures import _bn, _short, b_simple_figure, num, pareto_figure
from report.stats import Estimate, estimate
from report.tables import Cell, Table

# -- numbers as shown ----------------------------------------------------------------------

def fmt(c: Cell | Estimate | None) -> str:
    """Mean ± the half-width of its 95% t-interval (no ± for one value)."""
    if c is None or c.n == 0:
        return "—"
    return num(c.mean) + (f" ± {num(c.half)}" if c.n > 1 else "")


def bracket(x: float, ci: crit.Interval, *, beyond: int | None = None) -> str:
    """'212 [170, 260]': the value to 3 significant digits, its interval's bounds to 2;
    infinite values as '∞' or, with `beyond`, '> 1024'."""
    def one(v, digits=3):
        if beyond is not None and v == math.inf:
            return f"> {beyond}"
        return num(float(f"{v:.{digits}g}")) if math.isfinite(v) else num(v)

    if math.isnan(x):
        return "—"
    return one(x) + (f" [{one(ci.low, 2)}, {one(ci.high, 2)}]" if ci.defined else "")


def _grouped(rows: list[list[str]]) -> list[list[str]]:
    """The first column (the setting) shown on the first row of each run of equal values only."""
    prev = None
    for row in rows:
        prev, row[0] = row[0], ("" if row[0] == prev else row[0])
    return rows


# -- logged values ---------------------------------------------------------------------------

def _epoch_tag(scalars: pd.DataFrame, runs: list[str], tag: str) -> pd.DataFrame:
    return scalars[(scalars["run"].isin(runs)) & (scalars["split"] == TRAIN) & (scalars["tag"] == noise_tag(tag))]


def final_values(scalars: pd.DataFrame, runs: list[str], tag: str) -> dict[str, float]:
    """run → the last finite value of an epoch-indexed gradient tag."""
    df = _epoch_tag(scalars, runs, tag)
    df = df[np.isfinite(df["value"].to_numpy(dtype=float))].sort_values("step")
    return {run: float(g["value"].iloc[-1]) for run, g in df.groupby("run")}


def final_b_simple(scalars: pd.DataFrame, runs: list[str]) -> dict[str, tuple[float, float, float]]:
    """run → (B_simple, low, high): the last finite epoch-end B_simple and the 95%
    interval the trainer logged at the same epoch (NaN where it logged none)."""
    values = _epoch_tag(scalars, runs, NOISE_EPOCH_B_SIMPLE)
    values = values[np.isfinite(values["value"].to_numpy(dtype=float))].sort_values("step")
    bounds = {tag: {(r, s): v for r, s, v in zip(df["run"], df["step"], df["value"].astype(float))}
              for tag in (NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH) for df in [_epoch_tag(scalars, runs, tag)]}
    out = {}
    for run, g in values.groupby("run"):
        step, value = g["step"].iloc[-1], float(g["value"].iloc[-1])
        out[run] = (value, bounds[NOISE_EPOCH_B_LOW].get((run, step), math.nan),
                    bounds[NOISE_EPOCH_B_HIGH].get((run, step), math.nan))
    return out


def verdict_interval(finals: dict[str, tuple[float, float, float]]) -> tuple[Estimate, crit.Interval]:
    """The over-seed estimate of B_simple, and the interval a verdict reads: the 95%
    t-interval over seeds, or with one seed the run's logged interval (if any)."""
    e = estimate([v for v, _, _ in finals.values()])
    if e.n >= 2:
        return e, crit.Interval(e.low, e.high)
    if e.n == 1:
        _, low, high = next(iter(finals.values()))
        return e, crit.Interval(low, high)
    return e, crit.Interval()


# -- the section -------------------------------------------------------------------------------

def add_section(builder, target_loss: float | None = None, *, level: int = 1) -> None:
    """Append the "Gradient noise" section to `builder.doc` (a subsection at `level` 2)."""
    doc, logs = builder.doc, builder.logs
    sec = doc.section("Gradient noise", level=level)
    has = logs.scalars["tag"].astype(str).str.startswith(NOISE_PREFIX)
    measured = {run: m.get("gradient_noise") for run, m in logs.manifests.items()
                if isinstance(m.get("gradient_noise"), dict) and m["gradient_noise"].get("measurements")}
    if not has.any() or not measured:
        doc.text(sec, f"These runs were trained without measuring the gradient noise scale (no `{NOISE_PREFIX}` "
                      "scalars in their logs). Train them again with `[gradient_noise] enabled = true` "
                      "(the default) to fill this section.")
        return
    settings = next(iter(measured.values()))
    keys = builder.section_keys()
    logged = bool(_epoch_tag(logs.scalars, list(logs.runs["run"]), NOISE_EPOCH_B_LOW).shape[0])
    doc.text(sec, (
        _method(settings, measured, logs.manifests) + " B_simple = tr(Σ)/|G|² is the ratio "
        f"of their bias-corrected moving averages (β = {settings['beta']}): the batch size at which the "
        f"gradient noise of a step equals the gradient itself. {len(measured)} of {len(logs.runs)} runs "
        f"carry these measurements ({sum(m['measurements'] for m in measured.values())} in all); the tables "
        f"use each run's last epoch-end value" + (", with the 95% interval the trainer logged for it" if logged
                                                 else "") + "."))
    summary = _summary_table(builder, sec, keys, logged)
    for key in keys:
        b_simple_figure(builder, sec, key)
    _critical_part(builder, sec, keys, target_loss, summary)


def _method(settings: dict, measured: dict, manifests: dict) -> str:
    """How the runs' |G|² and tr(Σ) were measured: per-example norms, the probe, or each
    for some of the runs (the trainer's default: per example without batch norm)."""
    by_way: dict[str, list[dict]] = {}
    normed = set()
    crossed: dict[bool, set] = {True: set(), False: set()}  # probe runs' batch sizes, with the step's gradient or not
    for run, m in measured.items():
        way = m.get("estimator", "probe")
        by_way.setdefault(way, []).append(m)
        spec = manifests[run].get("spec") or {}
        if way == "probe" and spec.get("batch_norm"):
            normed.add(run)
        if way == "probe" and "with_step_gradient" in m and spec.get("batch_size"):
            crossed[m["with_step_gradient"] > 0].add(spec["batch_size"])
    both = len(by_way) > 1
    texts = []
    if "per_example" in by_way:
        texts.append(
            (f"For the {len(by_way['per_example'])} runs measured per example: in " if both else "In ")
            + "training steps the trainer took the exact norm of each example's gradient and of the step's batch "
            "gradient (on one step in ⌊256/B⌋ and on at most 256 of its examples), and estimated |G|² and tr(Σ) from "
            "E|G_B|² = |G|² + tr(Σ)/B at B = 1 and the batch size (McCandlish et al. 2018, App. A.1); "
            f"{_schedule(settings)} it averaged the estimates of the steps since the last measurement into one.")
    if "probe" in by_way:
        probe = by_way["probe"][0]
        reason = (" (with batch norm an example's gradient depends on its whole batch, so there are no "
                  "per-example gradients to take)" if both and len(normed) == len(by_way["probe"]) else "")
        texts.append(
            (f"For the {len(by_way['probe'])} runs measured with the probe{reason}: with " if both else "With ")
            + f"the weights held fixed, {_schedule(probe)} the trainer took the gradients of "
            f"{probe['batches']} disjoint batches of {probe['small_batch']} training examples and their mean (a "
            f"batch of {probe['big_batch']}" + (f"; rows drawn with probe_seed = {probe['probe_seed']}"
                                                 if probe.get("probe_seed") else "")
            + "), and estimated |G|² and tr(Σ) from E|G_B|² = |G|² + tr(Σ)/B (McCandlish et al. 2018, App. A.1)"
            + (_step_gradient(crossed) if crossed[True] else "") + ".")
    return " ".join(texts)


def _step_gradient(crossed: dict[bool, set]) -> str:
    """The method's clause on the step's own gradient, naming the batch sizes it served."""
    def sizes(values):
        values = [f"{b:,}" for b in sorted(values)]
        return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]
    plural = len(crossed[True]) > 1
    text = (f". At batch size{'s' if plural else ''} {sizes(crossed[True])} the probe ran inside the training "
            "step (before its update), and the dot product of the step's own batch gradient, from other examples "
            "at the same weights, with their mean is a second estimate of |G|², averaged in with the weight "
            "2B/((k − 1)·B_small + 2B) for a step of B examples and k small batches of B_small")
    if crossed[False] - crossed[True]:
        text += f"; at {sizes(crossed[False] - crossed[True])} the probe ran after the update and used its batches alone"
    return text


def _schedule(settings: dict) -> str:
    """'every 12800 examples and at each epoch end' (or, in older logs, every N steps)."""
    if settings.get("every_examples"):
        return f"every {settings['every_examples']:,} examples of an epoch and at each epoch end"
    if settings.get("every"):
        return f"every {settings['every']} steps and at each epoch end"
    return "at each epoch end"


def _cells(builder, keys: list[dict]):
    for key in keys:
        for bs in builder.batch_sizes:
            for bn in builder.bn_values:
                where = {**key, **({"batch_size": bs} if bs is not None else {}),
                         **({"batch_norm": bn} if bn is not None else {})}
                yield key, bs, bn, builder.runs_where(where)


def _summary_table(builder, sec, keys: list[dict], logged: bool) -> dict:
    """The B_simple table, one row per setting × batch size × BN; returns the final
    values per (key slug, BN): run → (B_simple, low, high), for the B_crit table."""
    doc, logs = builder.doc, builder.logs
    rows, data, pooled = [], [], {}
    counts = {crit.NOISE_DOMINATED: 0, crit.DIMINISHING: 0, crit.NOT_RESOLVED: 0}
    for key, bs, bn, runs in _cells(builder, keys):
        finals = final_b_simple(logs.scalars, runs)
        pooled.setdefault((builder.slug(key), bn), {}).update(finals)
        if not runs:
            continue
        e, ci = verdict_interval(finals)
        verdict = crit.verdict(ci.low, ci.high, bs) if bs is not None and e.n else "—"
        if verdict in counts:
            counts[verdict] += 1
        row = ([_short(key)] if key else []) + [str(bs), _bn(bn), fmt(e) + (f" (n={e.n})" if e.n > 1 else "")]
        if logged:
            row.append("; ".join(f"[{num(lo)}, {num(hi)}]" for _, lo, hi in finals.values()
                                 if not (math.isnan(lo) and math.isnan(hi))) or "—")
        rows.append(row + [verdict])
        data.append({**key, "batch_size": bs, "batch_norm": bn, "runs": len(runs), "b_simple_mean": e.mean,
                     "b_simple_ci_low": ci.low if e.n > 1 else None, "b_simple_ci_high": ci.high if e.n > 1 else None,
                     "b_simple_n": e.n, "verdict": verdict,
                     **({"logged_intervals": "; ".join(f"{r}: [{lo}, {hi}]" for r, (_, lo, hi) in finals.items())}
                        if logged else {})})
    if not rows:
        return pooled
    cols = (["Setting"] if keys != [{}] else []) + ["Batch", "BN", "B_simple"] + (
        ["Logged 95% intervals"] if logged else []) + ["Verdict"]
    table = Table("gradient_noise", "Gradient noise scale B_simple at the end of training (last epoch-end value "
                  "per run; mean ± 95% CI half-width over seeds" + ("; each run's logged 95% interval" if logged
                                                                     else "") + ") and what it says at the batch "
                  "size", cols, rows, data, compact=True)
    doc.table(sec, table)
    judged = sum(counts.values())
    if builder.seeds > 1:
        source = "the 95% t-interval of B_simple over seeds" + (
            " (for a setting with one finished seed, the run's logged interval)" if logged else "")
    else:
        source = "the 95% interval of B_simple the trainer logged" if logged else ""
    text = (f"Verdict, from {source or 'an interval of B_simple'} against the batch size B: "
            f"“{crit.NOISE_DOMINATED}” when the whole interval lies above 2·B, so most of a step's gradient is "
            f"noise and a larger batch would still cut the steps almost in proportion; “{crit.DIMINISHING}” when "
            f"it lies below B/2, so the batch already averages most of the noise away and more examples per step "
            f"buy little; “{crit.NOT_RESOLVED}” otherwise, or without an interval.")
    if not source:
        text += (" With one seed per setting and no interval logged with B_simple, there is none, so no verdict "
                 "is resolved; train more seeds to get one.")
    elif judged:
        text += (f" In {doc.ref(table)}: {counts[crit.NOISE_DOMINATED]} of {judged} settings have "
                 f"{crit.NOISE_DOMINATED}, {counts[crit.DIMINISHING]} {crit.DIMINISHING}, and "
                 f"{counts[crit.NOT_RESOLVED]} are not resolved.")
    doc.text(sec, text)
    return pooled


# -- figures --------------------------------------------------------------------------------


def _targets(builder, target_loss: float | None) -> tuple[list[float], str]:
    logs = builder.logs
    if target_loss is not None:
        return [float(target_loss)], f"the training loss {target_loss:g}, given with --target-loss"
    finished = builder.runs_where({})
    batch = dict(zip(logs.runs["run"], logs.runs["batch_size"])) if "batch_size" in logs.runs else {}
    span = crit.loss_range(logs.scalars, {r: int(batch[r]) for r in finished if r in batch})
    if span is None:
        return [], ""
    lowest, first = span
    targets = crit.target_levels(lowest, ceiling=first)
    capped = first < lowest * crit.TARGET_SPAN
    if len(targets) == 1:
        how = (f"the training loss {targets[0]:g}: the highest final windowed training loss among the finished "
               f"runs, rounded up, so every run reaches it")
    else:
        how = (f"the training losses {', '.join(f'{t:g}' for t in targets)}: {len(targets)} levels evenly spaced "
               f"in log loss from the highest final windowed training loss among the finished runs ({targets[0]:g}, "
               f"rounded up, so every run reaches each level) up to "
               + (f"the lowest first-step loss among the runs ({first:.3g}), so that no run starts at or below a "
                  f"level" if capped else
                  f"{crit.TARGET_SPAN:g} times it"))
    return targets, how


def _critical_part(builder, sec, keys: list[dict], target_loss: float | None, pooled: dict) -> None:
    doc, logs = builder.doc, builder.logs
    if "batch_size" not in logs.runs:
        return
    targets, how = _targets(builder, target_loss)
    if not targets:
        return
    batch = dict(zip(logs.runs["run"], logs.runs["batch_size"].astype(int)))
    cells = [(key, bs, bn, runs) for key, bs, bn, runs in _cells(builder, keys) if runs and bs is not None]
    reach = crit.reach_table(logs.scalars, {r: batch[r] for _, _, _, runs in cells for r in runs}, targets)
    by = {(run, t): s for run, t, s in zip(reach["run"], reach["target"], reach["steps"])}
    doc.text(sec, (
        f"Critical batch size from the training curves, at {how}. A run has reached a loss when the mean of its "
        f"step losses over the last ⌈{WINDOW_EXAMPLES}/B⌉ steps (about {WINDOW_EXAMPLES:,} examples) is at or "
        f"below it; S is the step at which it first is, E = S·B the examples seen by then. (The trailing window "
        f"reaches a level about half a window after the curve does, so each E carries roughly "
        f"{WINDOW_EXAMPLES // 2:,} examples of lag, which E_min absorbs.) For each target and setting, "
        f"S = S_min + E_min/B (McCandlish et al. 2018, eq. 2.11; equivalently S/S_min − 1 = (E/E_min − 1)⁻¹) is "
        f"fitted to the batch sizes' mean steps by least squares on relative residuals, when at least "
        f"{crit.MIN_BATCHES} batch sizes reached the target; B_crit = E_min/S_min is the batch size at which "
        f"training takes twice the fewest possible steps and twice the fewest possible examples. Intervals of the "
        f"fit: 95% percentile bootstrap, {crit.RESAMPLES} resamples of the seeds within each batch size. The "
        f"model-free check (Zhang et al. 2025): the batch size at which the steps exceed perfect linear scaling "
        f"from the smallest batch B0, S(B0)·B0/B, by {crit.OVERHEAD:.0%}, interpolated in log2 B "
        f"(“> B_max” when no batch size of the grid does); if the fit holds it is 1.2·B0 + 0.2·B_crit."))
    # Steps to each target, per cell.
    rows, data, fits = [], [], {}
    per_fit: dict[tuple, dict[int, list[float]]] = {}
    for key, bs, bn, runs in cells:
        row = ([_short(key)] if key else []) + [str(bs), _bn(bn)]
        for t in targets:
            steps = [by[r, t] for r in runs]
            hit = [s for s in steps if math.isfinite(s)]
            per_fit.setdefault((builder.slug(key), bn, t), {})[bs] = hit
            s_est, e_est = estimate(hit), estimate([s * bs for s in hit])
            text = fmt(s_est) if hit else "not reached"
            if hit and len(hit) < len(steps):
                text += f" ({len(hit)} of {len(steps)})"
            row.append(text)
            data.append({**key, "batch_size": bs, "batch_norm": bn, "target_loss": t, "runs": len(steps),
                         "runs_reached": len(hit), "steps_mean": s_est.mean if hit else None,
                         "steps_ci_low": s_est.low if s_est.n > 1 else None,
                         "steps_ci_high": s_est.high if s_est.n > 1 else None,
                         "examples_mean": e_est.mean if hit else None,
                         "examples_ci_low": e_est.low if e_est.n > 1 else None,
                         "examples_ci_high": e_est.high if e_est.n > 1 else None})
        rows.append(row)
    cols = (["Setting"] if keys != [{}] else []) + ["Batch", "BN"] + [f"S to {t:g}" for t in targets]
    doc.table(sec, Table("steps_to_target", "Steps S to each target training loss (mean ± 95% CI half-width over "
                         "the seeds that reached it; the CSV also gives the examples E = S·B)", cols, rows, data,
                         compact=True))
    for k, per_batch in per_fit.items():
        fits[k] = crit.critical(per_batch, k[2])
    pareto_figure(builder, sec, keys, fits, targets)
    _critical_table(builder, sec, keys, targets, fits, pooled)


def _critical_table(builder, sec, keys, targets, fits: dict, pooled: dict) -> None:
    doc = builder.doc
    rows, data, compared = [], [], {"above": 0, "below": 0, "overlap": 0}
    short = []
    for key in keys:
        for bn in builder.bn_values:
            finals = pooled.get((builder.slug(key), bn), {})
            b_simple = estimate([v for v, _, _ in finals.values()])
            for t in targets:
                c = fits.get((builder.slug(key), bn, t))
                if c is None:
                    continue
                if not c.fitted:
                    short.append(len(c.batch))
                    continue
                top = max(c.batch)
                rows.append(([_short(key)] if key else []) + [_bn(bn), f"{t:g}", bracket(c.s_min, c.s_min_ci),
                             bracket(c.e_min, c.e_min_ci), bracket(c.b_crit, c.b_crit_ci),
                             bracket(c.zhang, c.zhang_ci, beyond=top), fmt(b_simple)])
                data.append({**key, "batch_norm": bn, "target_loss": t, "batch_sizes": len(c.batch),
                             "s_min": c.s_min, "s_min_low": c.s_min_ci.low, "s_min_high": c.s_min_ci.high,
                             "e_min": c.e_min, "e_min_low": c.e_min_ci.low, "e_min_high": c.e_min_ci.high,
                             "b_crit": c.b_crit, "b_crit_low": c.b_crit_ci.low, "b_crit_high": c.b_crit_ci.high,
                             "zhang_batch": c.zhang, "zhang_low": c.zhang_ci.low, "zhang_high": c.zhang_ci.high,
                             "resamples": c.resamples, "b_simple_mean": b_simple.mean, "b_simple_n": b_simple.n,
                             "b_simple_ci_low": b_simple.low if b_simple.n > 1 else None,
                             "b_simple_ci_high": b_simple.high if b_simple.n > 1 else None})
                if c.b_crit_ci.defined and b_simple.n > 1:
                    side = ("above" if b_simple.low > c.b_crit_ci.high else
                            "below" if b_simple.high < c.b_crit_ci.low else "overlap")
                    compared[side] += 1
    if short and not rows:
        doc.text(sec, f"No critical batch size: the fit needs at least {crit.MIN_BATCHES} batch sizes whose runs "
                      f"reached the target, and these logs have {max(short)}.")
        return
    if not rows:
        return
    rows = _grouped(rows) if keys != [{}] else rows  # 8 columns: the setting only where it changes
    cols = (["Setting"] if keys != [{}] else []) + ["BN", "Target", "S_min", "E_min", "B_crit",
                                                     f"{crit.OVERHEAD:.0%} batch (Zhang)", "B_simple (final)"]
    table = Table("critical_batch", f"The fit S = S_min + E_min/B per target loss and setting, B_crit = E_min/S_min "
                  f"and the batch size at which steps exceed linear scaling by {crit.OVERHEAD:.0%} (value [95% "
                  f"bootstrap interval over seeds]; “> B”: beyond the largest batch), beside the final B_simple of "
                  f"the setting's runs at every batch size (mean ± 95% CI half-width over those runs; n in the CSV)", cols, rows, data,
                  compact=True)
    doc.table(sec, table)
    if len(targets) > 1:
        low_t, high_t = min(targets), max(targets)
        trend = {"above": 0, "below": 0, "overlap": 0}
        for key in keys:
            for bn in builder.bn_values:
                a, b = fits.get((builder.slug(key), bn, low_t)), fits.get((builder.slug(key), bn, high_t))
                if a and b and a.fitted and b.fitted and a.b_crit_ci.defined and b.b_crit_ci.defined:
                    trend["above" if a.b_crit_ci.low > b.b_crit_ci.high else
                          "below" if a.b_crit_ci.high < b.b_crit_ci.low else "overlap"] += 1
        m = sum(trend.values())
        if m:
            doc.text(sec, (f"B_crit at the lowest target ({low_t:g}) lies above its value at the highest "
                           f"({high_t:g}) in {trend['above']} of {m} settings, below it in {trend['below']}, and "
                           f"the two bootstrap intervals overlap in {trend['overlap']}."))
    n = sum(compared.values())
    if n:
        doc.text(sec, (f"In {doc.ref(table)}, the interval of the final B_simple lies above B_crit's bootstrap "
                       f"interval in {compared['above']} of {n} rows, below it in {compared['below']}, and overlaps "
                       f"it in {compared['overlap']}. The final B_simple is measured at the end of training, at "
                       f"lower losses than the targets; McCandlish et al. find the noise scale grows as the loss "
                       f"falls."))
