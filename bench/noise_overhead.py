"""Benchmark: what measuring the gradient noise scale costs in training time.

    python -m bench.noise_overhead               # the lab grid, every run twice (long)
    python -m bench.noise_overhead --quick       # the lab grid on 6,000 images for 2 epochs

Each pack of the grid (the runs the fused engine trains together; one run with the Keras
engine) is trained twice in this one process, once with [gradient_noise] off and once
with the experiment's settings (alternating which goes first, so both sides see the same
machine state), as the trainer trains it. Before that, the first pack of each batch size
is trained once untimed on each side, so that XLA's compilation of each batch size and
side (1–3 s, paid once per process) is not counted.
Prints per batch size the wall and CPU seconds (process time, all threads: less
sensitive than wall time to other work on the machine) and the measurement counts; the
last two lines are `gradient noise overhead (CPU time): <percent>%` and
`gradient noise overhead: <percent>%` (wall time).
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
    p.add_argument("--every-examples", type=int, help="override [gradient_noise] every_examples")
    p.add_argument("--batches", type=int, help="override [gradient_noise] batches")
    p.add_argument("--small-batch", type=int, help="override [gradient_noise] small_batch")
    p.add_argument("--estimator", choices=("auto", "per_example", "probe"), help="override [gradient_noise] estimator")
    p.add_argument("--no-warm-up", action="store_true", help="count each batch size's compilation too")
    p.add_argument("--repeat", type=int, default=1, help="train every pack this many times on each side "
                   "(the timings of this 2-core machine vary by ±5-10%% from one invocation to the next)")
    p.add_argument("--data", help="as for the trainer: a .npz or IDX folder")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from trainer import data as datasets
    from trainer.executors import train_runs
    from trainer.spec import load_experiment

    tf.get_logger().setLevel("ERROR")
    exp = load_experiment(args.experiment, data_path=args.data, **(QUICK if args.quick else {}))
    changes = {k: v for k, v in (("every_examples", args.every_examples), ("batches", args.batches),
                                 ("small_batch", args.small_batch), ("estimator", args.estimator)) if v is not None}
    on = dataclasses.replace(exp.gradient_noise, **changes)
    sides = {"off": dataclasses.replace(exp, gradient_noise=dataclasses.replace(on, enabled=False)),
             "on": dataclasses.replace(exp, gradient_noise=dataclasses.replace(on, enabled=True))}
    from trainer.noise_checks import estimator_problem

    if problem := estimator_problem(sides["on"]):
        print(f"error: [gradient_noise] estimator: {problem}", file=sys.stderr)
        return 2
    data = datasets.load(exp.dataset, validation=exp.validation, limit=exp.limit, path=exp.data_path)
    wall = {side: defaultdict(float) for side in sides}
    cpu = {side: defaultdict(float) for side in sides}
    measurements: dict[int, int] = defaultdict(int)
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        packs = exp.packs(list(range(len(exp.runs))))
        if not args.no_warm_up:
            first = {}
            for pack in packs:
                first.setdefault(exp.runs[pack[0]].batch_size, pack)
            t0 = time.perf_counter()
            for pack in first.values():  # both sides: with and without the estimator, programs differ
                specs = [exp.runs[i] for i in pack]
                for side in sides:
                    train_runs(sides[side], specs, data, [Path(tmp) / "warm-up" / side / exp.run_name(s) for s in specs])
            print(f"warm-up: one pack per batch size and side, {time.perf_counter() - t0:.1f}s (not counted)",
                  file=sys.stderr, flush=True)
        rounds = [defaultdict(float) for _ in range(args.repeat)]  # per repeat: side → wall seconds
        for r in range(args.repeat):
            for k, pack in enumerate(packs):
                specs = [exp.runs[i] for i in pack]
                order = ("off", "on") if (k + r) % 2 == 0 else ("on", "off")
                for side in order:
                    run_dirs = [Path(tmp) / f"{side}{r}" / exp.run_name(spec) for spec in specs]
                    t0, c0 = time.perf_counter(), time.process_time()
                    manifests = train_runs(sides[side], specs, data, run_dirs)
                    wall[side][specs[0].batch_size] += time.perf_counter() - t0
                    rounds[r][side] += time.perf_counter() - t0
                    cpu[side][specs[0].batch_size] += time.process_time() - c0
                    for manifest in manifests:
                        assert manifest["status"] == COMPLETE, manifest.get("error")
                        if side == "on" and r == 0:
                            measurements[specs[0].batch_size] += manifest["gradient_noise"]["measurements"]
                print(f"round {r + 1}/{args.repeat}: pack {k + 1}/{len(packs)} ({len(pack)} runs, batch "
                      f"{specs[0].batch_size}) done", file=sys.stderr, flush=True)
    print(f"{exp.name}{' (quick)' if args.quick else ''}: {len(exp.runs)} runs × 2 × {args.repeat} on {len(data.x_train)} "
          f"train images; [gradient_noise] every_examples={on.every_examples} small_batch={on.small_batch} "
          f"batches={on.batches} (B_big={on.big_batch}) estimator={on.estimator}")
    print(f"{'batch':>6} {'off s':>8} {'on s':>8} {'overhead':>9} {'off CPU s':>10} {'on CPU s':>9} "
          f"{'overhead':>9} {'measurements':>13}")
    for bs in sorted(wall["off"]):
        print(f"{bs:>6} {wall['off'][bs]:8.1f} {wall['on'][bs]:8.1f} {(wall['on'][bs] / wall['off'][bs] - 1) * 100:8.1f}% "
              f"{cpu['off'][bs]:10.1f} {cpu['on'][bs]:9.1f} {(cpu['on'][bs] / cpu['off'][bs] - 1) * 100:8.1f}% "
              f"{measurements[bs]:>13}")
    total = {side: sum(wall[side].values()) for side in sides}
    total_cpu = {side: sum(cpu[side].values()) for side in sides}
    print(f"total: off {total['off']:.1f}s, on {total['on']:.1f}s (CPU: off {total_cpu['off']:.1f}s, "
          f"on {total_cpu['on']:.1f}s)")
    if args.repeat > 1:
        each = ", ".join(f"{(r['on'] / r['off'] - 1) * 100:.1f}%" for r in rounds)
        print(f"overhead (wall) of each of the {args.repeat} rounds: {each}")
    print(f"gradient noise overhead (CPU time): {(total_cpu['on'] / total_cpu['off'] - 1) * 100:.1f}%")
    print(f"gradient noise overhead: {(total['on'] / total['off'] - 1) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
