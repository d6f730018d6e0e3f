"""How repeatable the final B_simple is: the cross-run spread of the last epoch's
`gradient/epoch_b_simple` per (batch size, batch norm) cell of a trained grid.

    python -m bench.noise_cv --logdir logs/lab       # after `make train`

Prints one table, a row per (batch norm, batch size) cell: the mean, std (ddof 1) and
CV = std / mean over every run of the cell (for the lab grid 3 initializers × 3 seeds =
9) with its 95% interval (`cv_interval`) and how many runs logged a value; the CV over
the seeds of each initializer (3 for the lab grid), their mean and the largest; the
median relative width (high − low) / B_simple of the logged epoch-end interval; the
measurements per run (run.json). The last
line is `worst CV: <all runs> (all runs), <per initializer> (per initializer); RMS CV over
cells: <all runs>; runs without a value: <n>` (with 9 runs a cell's CV is itself
uncertain: a CV of 0.20 has the interval 0.13–0.39, so the RMS over cells is the steadier
summary).

    python -m bench.noise_cv --logdir logs/lab --against logs/lab-probe1

With --against, a second log folder of the same runs trained with another
`[gradient_noise] probe_seed` (the same training, other probe rows) splits each cell's
spread in two: the estimator's own error, from the two values of each run (RMS of
(log a − log b)/√2 over the cell's runs), and what is left, the runs' own differences
(`own`: 1 − error² / the cell's variance of log B_simple, at least 0); with `r` the
correlation of the runs' log values between the two folders (with 3 runs or more). Where the
probe took the step's own gradient, that gradient is the same in both folders (the same
training rows), so its share of the noise counts as the runs' own: the error printed is
then a lower bound on the estimator's. The last line is then
`estimator error (log): <per cell>; runs' own share: <per cell>`.
A script that reads logs, not a test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from contract.layout import (EVENT_FILE_GLOB, NOISE_EPOCH_B_HIGH, NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_SIMPLE,
                             RUN_MANIFEST, TRAIN, noise_tag)

TAGS = {noise_tag(t): t for t in (NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH)}


def last_epoch_values(train_dir: Path) -> dict[str, float]:
    """{tag name: value at the highest epoch index} for the epoch B_simple tags."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    best: dict[str, tuple[int, float]] = {}
    for path in sorted(train_dir.glob(EVENT_FILE_GLOB)):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.tag in TAGS:
                    value = float(tensor_util.make_ndarray(v.tensor))
                    if math.isfinite(value) and event.step >= best.get(TAGS[v.tag], (-1, 0.0))[0]:
                        best[TAGS[v.tag]] = (event.step, value)
    return {k: v for k, (_, v) in best.items()}


def cv(values: list[float]) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan), math.nan, math.nan
    mean, std = float(v.mean()), float(v.std(ddof=1))
    return mean, std, std / mean if mean else math.nan


def cv_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The CV's interval for log-normal values (B_simple is a positive ratio, its spread
    multiplicative): the χ² interval of the variance of log values, n − 1 degrees of
    freedom, through CV = √(exp σ² − 1). It takes the runs as independent; runs that share
    a seed are not quite, so the true interval is, if anything, wider."""
    from scipy import stats

    logs = np.log(np.asarray([v for v in values if v > 0], float))
    n = len(logs)
    if n < 2:
        return math.nan, math.nan
    ss = float(np.var(logs, ddof=1)) * (n - 1)
    tail = (1 - level) / 2
    low, high = ss / stats.chi2.ppf(1 - tail, n - 1), ss / stats.chi2.ppf(tail, n - 1)
    return math.sqrt(math.expm1(low)), math.sqrt(math.expm1(high))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.noise_cv", description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, default=Path("logs/lab"), help="one experiment's log folder")
    p.add_argument("--against", type=Path, help="the same runs trained with another [gradient_noise] probe_seed")
    args = p.parse_args(argv)
    cells = read_cells(args.logdir)
    if not cells:
        print(f"no runs under {args.logdir}", file=sys.stderr)
        return 2
    other = read_cells(args.against) if args.against else None
    if other is not None:
        problem = compare_problem(cells, other)
        if problem:
            print(f"--against {args.against}: {problem}", file=sys.stderr)
            return 2
    settings = json.loads(next(args.logdir.glob(f"*/{RUN_MANIFEST}")).read_text()).get("gradient_noise", {})
    shown = {k: settings[k] for k in ("every", "every_examples", "batches", "small_batch", "beta", "measurements_per_epoch")
             if k in settings} or {k: v for k, v in settings.items() if k not in ("tags", "measurements")}
    print(f"{args.logdir}: {sum(map(len, cells.values()))} runs; [gradient_noise] {shown}")
    print(f"{'BN':>3} {'batch':>6} | {'mean':>8} {'std':>8} {'CV':>6} {'95% CI':>11} {'runs':>6} | "
          f"{'CV/init mean':>12} {'max':>6} | {'rel. width':>10} {'meas./run':>9}")
    worst_all = worst_init = 0.0
    squares = []
    missing = 0
    for (bs, bn) in sorted(cells, key=lambda c: (c[1], c[0])):
        runs = cells[(bs, bn)]
        have = [r[NOISE_EPOCH_B_SIMPLE] for r in runs if NOISE_EPOCH_B_SIMPLE in r]
        missing += len(runs) - len(have)
        mean, std, c = cv(have)
        per_init = defaultdict(list)
        for r in runs:
            if NOISE_EPOCH_B_SIMPLE in r:
                per_init[r["init"]].append(r[NOISE_EPOCH_B_SIMPLE])
        init_cvs = [cv(v)[2] for v in per_init.values() if len(v) > 1]
        widths = [(r[NOISE_EPOCH_B_HIGH] - r[NOISE_EPOCH_B_LOW]) / r[NOISE_EPOCH_B_SIMPLE] for r in runs
                  if NOISE_EPOCH_B_LOW in r and NOISE_EPOCH_B_HIGH in r and r.get(NOISE_EPOCH_B_SIMPLE)]
        meas = [r["measurements"] for r in runs if r["measurements"] is not None]
        worst_all = max(worst_all, c if math.isfinite(c) else math.inf)
        squares.append(c * c)
        if init_cvs:
            worst_init = max(worst_init, max(init_cvs))
        print(f"{'on' if bn else 'off':>3} {bs:>6} | {mean:8.1f} {std:8.1f} {c:6.2f} {'%.2f–%.2f' % cv_interval(have):>11} {len(have):>2} of {len(runs):<2}| "
              f"{(np.mean(init_cvs) if init_cvs else math.nan):12.2f} {(max(init_cvs) if init_cvs else math.nan):6.2f} | "
              f"{(np.median(widths) if widths else math.nan):10.2f} {(np.mean(meas) if meas else math.nan):9.1f}")
    print(f"worst CV: {worst_all:.2f} (all runs), {worst_init:.2f} (per initializer); "
          f"RMS CV over cells: {math.sqrt(np.mean(squares)):.2f}; runs without a value: {missing}")
    if other is not None:
        print_split(cells, other)
    return 0


def read_cells(logdir: Path) -> dict[tuple[int, bool], list[dict]]:
    """{(batch size, batch norm): one dict per run: its folder name, spec values, config,
    status, measurement count and last epoch-end B_simple tags}."""
    cells: dict[tuple[int, bool], list[dict]] = defaultdict(list)
    for manifest_path in sorted(logdir.glob(f"*/{RUN_MANIFEST}")):
        m = json.loads(manifest_path.read_text())
        spec = m["spec"]
        values = last_epoch_values(manifest_path.parent / TRAIN)
        cells[(spec["batch_size"], spec["batch_norm"])].append({
            "run": manifest_path.parent.name, "config": m.get("config", {}),
            "init": spec["initializer"], "seed": spec["seed"], "status": m["status"],
            "measurements": (m.get("gradient_noise") or {}).get("measurements"), **values})
    return cells


def _without_probe_seed(config: dict) -> dict:
    return {**config, "gradient_noise": {k: v for k, v in (config.get("gradient_noise") or {}).items()
                                         if k != "probe_seed"}}


def compare_problem(a: dict, b: dict) -> str | None:
    """Why two folders are not the same runs with other probe rows (None: they are)."""
    runs_a = {r["run"]: r for rs in a.values() for r in rs}
    runs_b = {r["run"]: r for rs in b.values() for r in rs}
    if set(runs_a) != set(runs_b):
        return f"not the same runs ({len(set(runs_a) ^ set(runs_b))} in only one of the folders)"
    differ = 0
    for name, ra in runs_a.items():
        ca, cb = ra["config"], runs_b[name]["config"]
        if _without_probe_seed(ca) != _without_probe_seed(cb):
            return f"run {name} was trained differently (its run.json config differs beyond probe_seed)"
        differ += (ca.get("gradient_noise") or {}).get("probe_seed") != (cb.get("gradient_noise") or {}).get("probe_seed")
    if not differ:  # runs measured per example draw no probe rows: they have none in either
        return "every run has the same probe_seed in both: train one with another [gradient_noise] probe_seed"
    return None


def print_split(a: dict, b: dict) -> None:
    """Per cell: the estimator's own error (log), the correlation of the two folders'
    values, and the runs' own share of the cell's spread (module docstring)."""
    print(f"{'BN':>3} {'batch':>6} | {'sd log':>7} {'error':>6} {'r':>6} {'own':>5} {'pairs':>5}")
    errors, owns = [], []
    for (bs, bn) in sorted(a, key=lambda c: (c[1], c[0])):
        other = {r["run"]: r.get(NOISE_EPOCH_B_SIMPLE) for r in b[(bs, bn)]}
        pairs = [(r[NOISE_EPOCH_B_SIMPLE], other[r["run"]]) for r in a[(bs, bn)]
                 if r.get(NOISE_EPOCH_B_SIMPLE, 0) > 0 and (other.get(r["run"]) or 0) > 0]
        if len(pairs) < 2:
            print(f"{'on' if bn else 'off':>3} {bs:>6} | fewer than 2 runs with a value in both folders")
            continue
        x, y = np.log(np.asarray(pairs)).T
        error = math.sqrt(float(np.mean((x - y) ** 2)) / 2)
        spread = float(np.var(x, ddof=1) + np.var(y, ddof=1)) / 2
        own = max(0.0, 1 - error * error / spread) if spread > 0 else math.nan
        r = float(np.corrcoef(x, y)[0, 1]) if len(pairs) > 2 and np.std(x) > 0 and np.std(y) > 0 else math.nan
        errors.append(f"{error:.2f}")
        owns.append(f"{own:.2f}")
        print(f"{'on' if bn else 'off':>3} {bs:>6} | {math.sqrt(spread):7.2f} {error:6.2f} {r:6.2f} {own:5.2f} {len(pairs):>5}")
    print(f"estimator error (log): {' '.join(errors)}; runs' own share: {' '.join(owns)}")


if __name__ == "__main__":
    sys.exit(main())
