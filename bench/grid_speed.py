"""Benchmark: the documents' plain `model.fit` loop against our trainer, same grid, same machine.

    python -m bench.grid_speed                  # the lab grid (long: both sides train all 30 runs)
    python -m bench.grid_speed --quick          # the lab grid on 6,000 images for 2 epochs

The documents' way: one process, default threads, runs one after another, each a plain
`keras.Model` compiled with defaults and fitted with `keras.callbacks.TensorBoard`.
Ours: `python -m trainer` as `make train` runs it (the fused engine: the runs that share
a data order trained as one XLA program, exact per-step losses, gradient-noise
measurement on as in the experiment file; `--workers` as given, default 1). Both start as fresh
processes, so both pay TensorFlow's start-up. The last line is `speedup: <ratio>x`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contract.layout import COMPLETE, RUN_MANIFEST
from contract.stderr import quietly

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"limit": 6000, "epochs": 2}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.grid_speed", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="lab")
    p.add_argument("--quick", action="store_true", help=f"reduced variant: {QUICK}")
    p.add_argument("--workers", type=int, default=1, help="our side's --workers (default 1, as make train)")
    p.add_argument("--data", help="as for the trainer: a .npz or IDX folder")
    p.add_argument("--baseline-into", help=argparse.SUPPRESS)  # internal: run the plain side here
    return p.parse_args(argv)


def load(args):
    from trainer.spec import load_experiment

    extra = QUICK if args.quick else {}
    return load_experiment(args.experiment, data_path=args.data, **extra)


def baseline(args) -> None:
    """The documents' loop; writes {run: {val_loss, val_accuracy, seconds}} as JSON."""
    import keras

    from trainer import data as datasets
    from trainer.models import build_model, make_optimizer

    exp = load(args)
    data = datasets.load(exp.dataset, validation=exp.validation, limit=exp.limit, path=exp.data_path)
    out, logroot = {}, Path(args.baseline_into)
    for spec in exp.runs:
        name = exp.run_name(spec)
        t0 = time.perf_counter()
        keras.utils.set_random_seed(spec.seed)
        graph = build_model(spec, input_shape=data.x_train.shape[1:], classes=10)
        model = keras.Model(graph.inputs, graph.outputs)  # a plain model: no in-graph step losses
        model.compile(optimizer=make_optimizer(spec), loss=spec.loss, metrics=["accuracy"])
        history = model.fit(data.x_train, data.y_train, batch_size=spec.batch_size, epochs=spec.epochs,
                            validation_data=(data.x_val, data.y_val), verbose=0,
                            callbacks=[keras.callbacks.TensorBoard(log_dir=str(logroot / "tb" / name))])
        out[name] = {"val_loss": history.history["val_loss"][-1],
                     "val_accuracy": history.history["val_accuracy"][-1],
                     "seconds": time.perf_counter() - t0}
        print(f"plain {len(out)}/{len(exp.runs)} {name}: {out[name]['seconds']:.1f}s", flush=True)
    (logroot / "results.json").write_text(json.dumps(out))


def matmul_gflops() -> float:
    """This machine's float32 matmul throughput through TensorFlow, default threads."""
    import tensorflow as tf

    a = tf.random.normal((1024, 1024))
    b = tf.random.normal((1024, 1024))
    tf.linalg.matmul(a, b).numpy()
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    return 2 * 1024**3 * reps / (time.perf_counter() - t0) / 1e9


def grid_flops(exp, train_examples: int, val_examples: int) -> float:
    """Dense and Conv2D multiply-adds ×2 per example; a training example costs ≈ 3 forward
    passes (forward, and two matmuls back), a validation example one."""
    from trainer.models import build_model

    import keras

    total = 0.0
    for spec in exp.runs:
        model = build_model(spec, input_shape=(28, 28), classes=10)
        forward = 0
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dense):
                forward += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
            elif isinstance(layer, keras.layers.Conv2D):
                kh, kw, cin, cout = layer.kernel.shape
                oh, ow = layer.output.shape[1:3]
                forward += 2 * kh * kw * cin * cout * oh * ow
        total += spec.epochs * forward * (3 * train_examples + val_examples)
    return total


def main(argv=None) -> int:
    # TensorFlow's start-up lines, this process's and both sides' (they inherit descriptor 2),
    # kept off the terminal; anything else either side prints on stderr is shown.
    return quietly(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    if args.baseline_into:
        baseline(args)
        return 0
    exp = load(args)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    common = ["--data", args.data] if args.data else []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        print(f"grid: {args.experiment}{' (quick: ' + str(QUICK) + ')' if args.quick else ''}, "
              f"{len(exp.runs)} runs; ours with --workers {args.workers}", flush=True)
        ours_cmd = [sys.executable, "-m", "trainer", "--experiment", args.experiment, "--logdir",
                    str(tmp / "ours"), "--workers", str(args.workers), *common]
        if args.quick:
            ours_cmd += ["--limit", str(QUICK["limit"]), "--epochs", str(QUICK["epochs"])]
        t0 = time.perf_counter()
        subprocess.run(ours_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        ours_s = time.perf_counter() - t0
        print(f"ours:  {ours_s:.1f}s", flush=True)
        plain_cmd = [sys.executable, "-m", "bench.grid_speed", "--experiment", args.experiment,
                     "--baseline-into", str(tmp / "plain"), *(["--quick"] if args.quick else []), *common]
        t0 = time.perf_counter()
        subprocess.run(plain_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        plain_s = time.perf_counter() - t0
        print(f"plain: {plain_s:.1f}s", flush=True)

        plain = json.loads((tmp / "plain" / "results.json").read_text())
        ours = {p.parent.name: json.loads(p.read_text()) for p in (tmp / "ours" / exp.name).glob(f"*/{RUN_MANIFEST}")}
        dataset = next(iter(ours.values()))["dataset"]
        steps_checked = all(m["steps"] > 0 and m["status"] == COMPLETE for m in ours.values())
    print(f"\n{'run':<48} {'plain val_loss':>14} {'ours val_loss':>14} {'plain val_acc':>13} {'ours val_acc':>12}")
    diffs = []
    for name in sorted(plain):
        p, o = plain[name], ours[name]["final"]
        diffs.append(o["val_accuracy"] - p["val_accuracy"])
        print(f"{name:<48} {p['val_loss']:>14.4f} {o['val_loss']:>14.4f} "
              f"{p['val_accuracy']:>13.4f} {o['val_accuracy']:>12.4f}")
    print(f"val_accuracy, ours − plain over {len(diffs)} runs: mean {statistics.mean(diffs):+.4f}, "
          f"median |diff| {statistics.median(abs(d) for d in diffs):.4f}, max |diff| {max(map(abs, diffs)):.4f} "
          "(different shuffles and step grouping: same distribution, not the same bits)")
    flops = grid_flops(exp, dataset["train_examples"], dataset["validation_examples"])
    gflops = matmul_gflops()
    print(f"all runs complete with per-step losses: {steps_checked}")
    print(f"compute floor: {flops / 1e12:.2f} TFLOP ÷ {gflops:.1f} GFLOP/s (1024² float32 matmul) "
          f"= {flops / gflops / 1e9:.1f}s")
    print(f"plain total {plain_s:.1f}s, ours total {ours_s:.1f}s")
    print(f"speedup: {plain_s / ours_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
