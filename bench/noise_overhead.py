"""Benchmark: what measuring the gradient noise scale costs in training time.

    python -m bench.noise_overhead               # the lab grid, every run twice (long)
    python -m bench.noise_overhead --quick       # the lab grid on 6,000 images for 2 epochs

Each pack of the grid (the runs the fused engine trains together; one run with the Keras
engine) is trained twice in this one process, once with [gradient_noise] off and once
with the experiment's settings (alternating, so both sides see the same machine state),
as the trainer trains it. Prints the per-batch-size times and
measurement counts; the last line is `gradient noise overhead: <percent>%`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from contract.layout import COMPLETE

QUICK = {"limit": 6000, "epochs": 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.noise_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="lab")
    p.add_argument("--quick", action="store_true", help=f"reduced variant: {QUICK}")
    p.add_argument("--every", type=int, help="override [gradient_noise] every (K steps)")
    p.add_argument("--data", help="as for the trainer: a .npz or IDX folder")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from trainer import data as datasets
    from trainer.executors import train_runs
    from trainer.spec import load_experiment

    tf.get_logger().setLevel("ERROR")
    exp = load_experiment(args.experiment, data_path=args.data, **(QUICK if args.quick else {}))
    on = exp.gradient_noise if args.every is None else dataclasses.replace(exp.gradient_noise, every=args.every)
    sides = {"off": dataclasses.replace(exp, gradient_noise=dataclasses.replace(on, enabled=False)),
             "on": dataclasses.replace(exp, gradient_noise=dataclasses.replace(on, enabled=True))}
    data = datasets.load(exp.dataset, validation=exp.validation, limit=exp.limit, path=exp.data_path)
    seconds = {side: defaultdict(float) for side in sides}
    measurements: dict[int, int] = defaultdict(int)
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        packs = exp.packs(list(range(len(exp.runs))))
        for k, pack in enumerate(packs):
            specs = [exp.runs[i] for i in pack]
            order = ("off", "on") if k % 2 == 0 else ("on", "off")
            for side in order:
                run_dirs = [Path(tmp) / side / exp.run_name(spec) for spec in specs]
                t0 = time.perf_counter()
                manifests = train_runs(sides[side], specs, data, run_dirs)
                seconds[side][specs[0].batch_size] += time.perf_counter() - t0
                for manifest in manifests:
                    assert manifest["status"] == COMPLETE, manifest.get("error")
                    if side == "on":
                        measurements[specs[0].batch_size] += manifest["gradient_noise"]["measurements"]
            print(f"pack {k + 1}/{len(packs)} ({len(pack)} runs, batch {specs[0].batch_size}) done",
                  file=sys.stderr, flush=True)
    print(f"{exp.name}{' (quick)' if args.quick else ''}: {len(exp.runs)} runs × 2 on {len(data.x_train)} "
          f"train images; [gradient_noise] every={on.every} small_batch={on.small_batch} "
          f"batches={on.batches} (B_big={on.big_batch})")
    print(f"{'batch':>6} {'off s':>8} {'on s':>8} {'overhead':>9} {'measurements':>13}")
    for bs in sorted(seconds["off"]):
        off, with_noise = seconds["off"][bs], seconds["on"][bs]
        print(f"{bs:>6} {off:8.1f} {with_noise:8.1f} {(with_noise / off - 1) * 100:8.1f}% {measurements[bs]:>13}")
    total_off, total_on = sum(seconds["off"].values()), sum(seconds["on"].values())
    print(f"total: off {total_off:.1f}s, on {total_on:.1f}s")
    print(f"gradient noise overhead: {(total_on / total_off - 1) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
