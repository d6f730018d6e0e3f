"""Benchmark: the documents' plain `model.fit` loop against our trainer, same grid, same machine.

    python -m bench.grid_speed                                  # the lab grid (long: both sides train every run)
    python -m bench.grid_speed --quick                          # the lab grid on 6,000 images for 2 epochs
    python -m bench.grid_speed --experiment batch-noise-cnn --dataset fashion_mnist
    python -m bench.grid_speed --precision bfloat16,float32     # ours in each precision, plain once (float32)

The documents' way: one process, default threads, runs one after another, each a plain
`keras.Model` compiled with defaults and fitted with `keras.callbacks.TensorBoard`; a
fractional validation set is `fit(validation_split=…)` on the whole training set, as the
documents write it (so Keras validates at the run's batch size), and document 000's CNN
is its own `keras.Sequential` on 28×28×1 images. Ours: `python -m trainer` as `make
train` runs it (the fused engine for MLPs with integer labels, the compiled engine for
the rest; exact per-step losses, gradient-noise measurement on as in the experiment file;
`--workers` as given, default 1). Both start as fresh processes, so both pay TensorFlow's
start-up. The last line is `speedup: <ratio>x` (with several --precision values, the first's).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from contract.layout import COMPLETE, RUN_MANIFEST
from contract.stderr import quietly

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"limit": 6000, "epochs": 2}
PRECISIONS = ("float32", "bfloat16")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.grid_speed", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="lab")
    p.add_argument("--dataset", help="override [data] dataset on both sides (mnist, fashion_mnist)")
    p.add_argument("--quick", action="store_true", help=f"reduced variant: {QUICK}")
    p.add_argument("--epochs", type=int, help="override the epochs of every run, both sides")
    p.add_argument("--limit", type=int, help="only the first N training and test images, both sides")
    p.add_argument("--workers", type=int, default=1, help="our side's --workers (default 1, as make train)")
    p.add_argument("--data", help="as for the trainer: a .npz or IDX folder")
    p.add_argument("--precision", type=precisions, metavar="P[,P]",
                   help="our side's [execution] precision, or a list (float32,bfloat16: ours trained in each, the "
                        "plain side once; the last line is the first's speedup); default: the experiment file's. "
                        "The plain side is float32")
    p.add_argument("--baseline-into", help=argparse.SUPPRESS)  # internal: run the plain side here
    return p.parse_args(argv)


def precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: valid values: {', '.join(PRECISIONS)} (or both, comma-separated)")
    return list(dict.fromkeys(values))


def overrides(args) -> dict:
    """--quick, --epochs and --limit as load_experiment's keywords (the last two win)."""
    extra = dict(QUICK) if args.quick else {}
    extra.update({k: v for k, v in (("epochs", args.epochs), ("limit", args.limit)) if v is not None})
    return extra


def load(args, path: str | None = None):
    from trainer.spec import load_experiment

    return load_experiment(path or args.experiment, data_path=args.data, dataset=args.dataset, **overrides(args))


def document_cnn(spec):
    """Document 000's model, as its code builds it (`build_model()` there)."""
    import keras
    from keras import layers

    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, 3, activation=spec.activation),
        layers.MaxPooling2D(),
        layers.Flatten(),
        *[layers.Dense(units, activation=spec.activation) for units in spec.hidden],
        layers.Dense(10, activation="softmax"),
    ])
    return model


def plain_fit(model, x, y, **kwargs):
    """`model.fit(x, y, **kwargs)` with a new data order each epoch, as in the documents,
    which seed nothing. The caller's global seed was for the initial weights: under it
    Keras 3 (3.15) repeats epoch 1's order in every epoch (each epoch's iterator restarts
    the seeded shuffle op), a loop the documents do not run."""
    import tensorflow as tf

    tf.random.set_seed(None)
    return model.fit(x, y, **kwargs)


def baseline(args) -> None:
    """The documents' loop; writes {run: {val_loss, val_accuracy, seconds}} as JSON."""
    import keras
    import numpy as np

    from trainer import data as datasets
    from trainer.models import build_model, make_optimizer

    exp = load(args)
    data = datasets.load(exp.dataset, validation=exp.validation, limit=exp.limit, path=exp.data_path)
    if exp.validation == "test":
        x, y, validation = data.x_train, data.y_train, {"validation_data": (data.x_val, data.y_val)}
    else:  # the whole training set and validation_split, as the documents call fit
        x, y = np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val])
        validation = {"validation_split": exp.validation}
    out, logroot = {}, Path(args.baseline_into)
    for spec in exp.runs:
        name = exp.run_name(spec)
        t0 = time.perf_counter()
        keras.utils.set_random_seed(spec.seed)
        if spec.architecture == "cnn" and not spec.batch_norm:
            model, xs = document_cnn(spec), x.reshape(-1, 28, 28, 1)
        else:
            graph = build_model(spec, input_shape=data.x_train.shape[1:], classes=10)
            model, xs = keras.Model(graph.inputs, graph.outputs), x  # a plain model: no in-graph step losses
        labels = keras.utils.to_categorical(y, 10) if spec.loss == "categorical_crossentropy" else y
        val = validation
        if "validation_data" in val and spec.loss == "categorical_crossentropy":
            val = {"validation_data": (data.x_val, keras.utils.to_categorical(data.y_val, 10))}
        model.compile(optimizer=make_optimizer(spec), loss=spec.loss, metrics=["accuracy"])
        history = plain_fit(model, xs, labels, batch_size=spec.batch_size, epochs=spec.epochs, verbose=0, **val,
                            callbacks=[keras.callbacks.TensorBoard(log_dir=str(logroot / "tb" / name))])
        out[name] = {"val_loss": history.history["val_loss"][-1],
                     "val_accuracy": history.history["val_accuracy"][-1],
                     "seconds": time.perf_counter() - t0, "spec": spec.to_dict()}
        print(f"plain {len(out)}/{len(exp.runs)} {name}: {out[name]['seconds']:.1f}s", flush=True)
    (logroot / "results.json").write_text(json.dumps(out))


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children: a side's CPU time,
    less sensitive than its wall time to other work on a shared machine (not immune:
    waiting for a core costs no CPU, but caches shared with others do)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def matmul_gflops(dtype: str = "float32") -> float:
    """This machine's 1024² matmul throughput through TensorFlow (oneDNN, no XLA), default threads."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((1024, 1024)), dtype)
    b = tf.cast(tf.random.normal((1024, 1024)), dtype)
    tf.linalg.matmul(a, b).numpy()
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    return 2 * 1024**3 * reps / (time.perf_counter() - t0) / 1e9


def grid_flops(exp, train_examples: int, val_examples: int) -> float:
    """Dense and Conv2D multiply-adds ×2 per example. A training example costs the forward
    pass and, for each weight layer, its weight gradient (one more pass) and, except for
    the first weight layer (whose input needs no gradient), its input gradient (another):
    3 passes, 2 for the first. A validation example costs one forward pass."""
    import keras

    from trainer.models import build_model

    total = 0.0
    for spec in exp.runs:
        model = build_model(spec, input_shape=(28, 28), classes=10)
        forward = train = 0
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dense):
                flops = 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
            elif isinstance(layer, keras.layers.Conv2D):
                kh, kw, cin, cout = layer.kernel.shape
                oh, ow = layer.output.shape[1:3]
                flops = 2 * kh * kw * cin * cout * oh * ow
            else:
                continue
            train += flops * (2 if forward == 0 else 3)
            forward += flops
        total += spec.epochs * (train * train_examples + forward * val_examples)
    return total


def experiment_file(args, exp, folder: Path, precision: str | None) -> str:
    """The experiment file our side trains: the preset, or for a `precision` a copy (same
    name, so the same log folder) whose [execution] precision is set."""
    if not precision:
        return args.experiment
    text = Path(exp.source).read_text(encoding="utf-8")
    text = re.sub(r"(?m)^\s*precision\s*=.*$", "", text)
    line = f'precision = "{precision}"'
    if re.search(r"(?m)^\[execution\]\s*$", text):
        text = re.sub(r"(?m)^\[execution\]\s*$", f"[execution]\n{line}", text, count=1)
    else:
        text += f"\n[execution]\n{line}\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{exp.name}.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def seed_spread(results: dict[str, dict], key) -> float | None:
    """The mean over settings of the sd over seeds of `key`; None with one seed per setting."""
    groups = defaultdict(list)
    for r in results.values():
        spec = {k: v for k, v in r["spec"].items() if k != "seed"}
        groups[json.dumps(spec, sort_keys=True)].append(key(r))
    sds = [statistics.stdev(v) for v in groups.values() if len(v) > 1]
    return statistics.mean(sds) if sds else None


def main(argv=None) -> int:
    # TensorFlow's start-up lines, this process's and both sides' (they inherit descriptor 2),
    # kept off the terminal; anything else either side prints on stderr is shown.
    try:
        return quietly(lambda: _main(argv))
    except subprocess.CalledProcessError as exc:  # its own message (e.g. no dataset) is already printed
        side = "our" if exc.cmd[2] == "trainer" else "the plain"
        print(f"error: {side} side stopped (exit {exc.returncode}); nothing was measured", file=sys.stderr)
        return exc.returncode or 1


def _main(argv) -> int:
    args = parse_args(argv)
    if args.baseline_into:
        baseline(args)
        return 0
    exp = load(args)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    common = (["--data", args.data] if args.data else []) + (["--dataset", args.dataset] if args.dataset else [])
    common += [item for key, value in overrides(args).items() for item in (f"--{key}", str(value))]
    sides = args.precision or [None]  # None: the experiment file's precision
    seconds, cpu, ours = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        files = {side: experiment_file(args, exp, tmp / f"exp-{side}", side) for side in sides}
        labels = {side: side or load(args, files[side]).precision for side in sides}
        print(f"grid: {args.experiment}{' ' + str(overrides(args)) if overrides(args) else ''}, "
              f"{len(exp.runs)} runs on {exp.dataset}; ours with --workers {args.workers}, "
              f"{' then '.join(labels.values())}; plain float32", flush=True)
        for side in sides:
            ours_cmd = [sys.executable, "-m", "trainer", "--experiment", files[side], "--logdir",
                        str(tmp / f"ours-{side}"), "--workers", str(args.workers), *common]
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run(ours_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds[labels[side]] = time.perf_counter() - t0
            cpu[labels[side]] = children_cpu() - c0
            print(f"ours ({labels[side]}):  {seconds[labels[side]]:.1f}s (CPU {cpu[labels[side]]:.1f}s)", flush=True)
            ours[labels[side]] = {p.parent.name: json.loads(p.read_text())
                                  for p in (tmp / f"ours-{side}" / exp.name).glob(f"*/{RUN_MANIFEST}")}
        plain_cmd = [sys.executable, "-m", "bench.grid_speed", "--experiment", args.experiment,
                     "--baseline-into", str(tmp / "plain"), *common]
        t0, c0 = time.perf_counter(), children_cpu()
        subprocess.run(plain_cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        plain_s = time.perf_counter() - t0
        cpu["plain"] = children_cpu() - c0
        print(f"plain: {plain_s:.1f}s (CPU {cpu['plain']:.1f}s)", flush=True)
        plain = json.loads((tmp / "plain" / "results.json").read_text())
    report(exp, plain, ours, plain_s, seconds, cpu)
    return 0


def report(exp, plain: dict, ours: dict[str, dict], plain_s: float, seconds: dict[str, float],
           cpu: dict[str, float]) -> None:
    """The per-run table, the accuracy comparisons, the compute floor and the speedups;
    the last line is the speedup of the first of `ours`."""
    names = sorted(plain)
    print(f"\n{'run':<48} {'plain val_acc':>13} " + " ".join(f"{'ours ' + k:>16}" for k in ours))
    for name in names:
        print(f"{name:<48} {plain[name]['val_accuracy']:>13.4f} "
              + " ".join(f"{ours[k][name]['final']['val_accuracy']:>16.4f}" for k in ours))
    spread = seed_spread(plain, lambda r: r["val_accuracy"])
    if spread is not None:
        print(f"val_accuracy seed spread (sd over the seeds of a setting, mean over settings): plain {spread:.4f}, "
              + ", ".join(f"ours {k} {seed_spread(m, lambda r: r['final']['val_accuracy']):.4f}"
                          for k, m in ours.items()))
    pairs = [(k, "plain", lambda n, k=k: ours[k][n]["final"]["val_accuracy"] - plain[n]["val_accuracy"]) for k in ours]
    keys = list(ours)
    pairs += [(b, a, lambda n, a=a, b=b: ours[b][n]["final"]["val_accuracy"] - ours[a][n]["final"]["val_accuracy"])
              for i, a in enumerate(keys) for b in keys[i + 1:]]
    for left, right, diff in pairs:
        diffs = [diff(n) for n in names]
        print(f"val_accuracy, ours {left} − {right if right == 'plain' else 'ours ' + right} over {len(diffs)} runs: "
              f"mean {statistics.mean(diffs):+.4f}, median |diff| {statistics.median(abs(d) for d in diffs):.4f}, "
              f"max |diff| {max(map(abs, diffs)):.4f}")
    print("(different shuffles, step grouping or precision: the same distribution is expected, not the same bits)")
    first = next(iter(ours.values()))
    dataset = next(iter(first.values()))["dataset"]
    for k, runs in ours.items():
        print(f"ours {k}: engines {', '.join(sorted({m.get('engine', '?') for m in runs.values()}))}; "
              f"precision {', '.join(sorted({m.get('precision', 'float32') for m in runs.values()}))}; "
              f"all runs complete with per-step losses: "
              f"{all(m['steps'] > 0 and m['status'] == COMPLETE for m in runs.values())}")
    hardware = next(iter(first.values())).get("hardware") or {}
    print(f"machine: {hardware.get('cpu', '?')}, {hardware.get('cpu_count', '?')} CPU threads")
    flops = grid_flops(exp, dataset["train_examples"], dataset["validation_examples"])
    gflops = matmul_gflops()
    floor = f"compute floor: {flops / 1e12:.2f} TFLOP ÷ {gflops:.1f} GFLOP/s (1024² float32 matmul) " \
            f"= {flops / gflops / 1e9:.1f}s"
    if "bfloat16" in ours:
        bf = matmul_gflops("bfloat16")
        floor += f"; ÷ {bf:.1f} GFLOP/s (bfloat16) = {flops / bf / 1e9:.1f}s"
    print(floor)
    for k, s in seconds.items():
        print(f"plain total {plain_s:.1f}s, ours {k} total {s:.1f}s: {plain_s / s:.2f}x "
              f"(CPU time: plain {cpu['plain']:.1f}s, ours {cpu[k]:.1f}s: {cpu['plain'] / cpu[k]:.2f}x)")
    print(f"speedup: {plain_s / next(iter(seconds.values())):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
