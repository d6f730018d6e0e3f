"""How repeatable the final B_simple is: the cross-run spread of the last epoch's
`gradient/epoch_b_simple` per (batch size, batch norm) cell of a trained grid.

    python -m bench.noise_cv --logdir logs/lab       # after `make train`

Prints one table, a row per (batch norm, batch size) cell: the mean, std (ddof 1) and
CV = std / mean over every run of the cell (for the lab grid 3 initializers × 3 seeds =
9) and how many runs logged a value; the CV over the seeds of each initializer (3 for
the lab grid), their mean and the largest; the median relative width (high − low) /
B_simple of the logged epoch-end interval; the measurements per run (run.json). The last
line is `worst CV: <all runs> (all runs), <per initializer> (per initializer); RMS CV over
cells: <all runs>; runs without a value: <n>` (with 9 runs a cell's CV is itself
uncertain by about ±25%, so the RMS over cells is the steadier summary).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.noise_cv", description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, default=Path("logs/lab"), help="one experiment's log folder")
    args = p.parse_args(argv)
    cells: dict[tuple[int, bool], list[dict]] = defaultdict(list)
    for manifest_path in sorted(args.logdir.glob(f"*/{RUN_MANIFEST}")):
        m = json.loads(manifest_path.read_text())
        spec = m["spec"]
        values = last_epoch_values(manifest_path.parent / TRAIN)
        cells[(spec["batch_size"], spec["batch_norm"])].append({
            "init": spec["initializer"], "seed": spec["seed"], "status": m["status"],
            "measurements": (m.get("gradient_noise") or {}).get("measurements"), **values})
    if not cells:
        print(f"no runs under {args.logdir}", file=sys.stderr)
        return 2
    settings = json.loads(next(args.logdir.glob(f"*/{RUN_MANIFEST}")).read_text()).get("gradient_noise", {})
    shown = {k: settings[k] for k in ("every", "every_examples", "batches", "small_batch", "beta", "measurements_per_epoch")
             if k in settings} or {k: v for k, v in settings.items() if k not in ("tags", "measurements")}
    print(f"{args.logdir}: {sum(map(len, cells.values()))} runs; [gradient_noise] {shown}")
    print(f"{'BN':>3} {'batch':>6} | {'mean':>8} {'std':>8} {'CV':>6} {'runs':>6} | "
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
        print(f"{'on' if bn else 'off':>3} {bs:>6} | {mean:8.1f} {std:8.1f} {c:6.2f} {len(have):>2} of {len(runs):<2}| "
              f"{(np.mean(init_cvs) if init_cvs else math.nan):12.2f} {(max(init_cvs) if init_cvs else math.nan):6.2f} | "
              f"{(np.median(widths) if widths else math.nan):10.2f} {(np.mean(meas) if meas else math.nan):9.1f}")
    print(f"worst CV: {worst_all:.2f} (all runs), {worst_init:.2f} (per initializer); "
          f"RMS CV over cells: {math.sqrt(np.mean(squares)):.2f}; runs without a value: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
