"""`python -m trainer`: experiment file → a grid of Keras runs logged to TensorBoard."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from contract.stderr import quietly
from trainer import interrupt
from trainer.executors import EXECUTORS
from trainer.noise_checks import check_noise_fits_limit
from trainer.spec import DATASETS, ExperimentError, list_presets, load_experiment

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__.split(":", 1)[1].strip(),
        epilog=f"presets: {', '.join(list_presets())}")
    parser.add_argument("--experiment", "-e", default="lab", help="preset name or path to a .toml file")
    parser.add_argument("--dataset", choices=DATASETS, help="override [data] dataset")
    parser.add_argument("--epochs", type=int, help="override the epochs of every run")
    parser.add_argument("--limit", type=int, help="use only the first N training and test images")
    parser.add_argument("--data", dest="data_path", help="a keras .npz or a folder of the four IDX .gz files")
    parser.add_argument("--logdir", default="logs", type=Path, help="log root (default: logs)")
    parser.add_argument("--verbose", "-v", type=int, default=0, choices=(0, 1, 2),
                        help="Keras fit verbosity: 1 progress bar, 2 one line per epoch; "
                             "1 or 2 also shows TensorFlow's start-up lines")
    parser.add_argument("--confirm-large", action="store_true", help="allow grids over the run limit")
    parser.add_argument("--no-download", action="store_true", help="never let keras download a dataset")
    parser.add_argument("--no-gradient-noise", action="store_true",
                        help="train without the gradient-noise probe, whatever [gradient_noise] enabled says "
                             "(recorded in each run's config: switching it retrains the runs)")
    run = parser.add_argument_group("where runs execute")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: this machine (default); ray: one Ray task per run")
    run.add_argument("--workers", type=_positive_int, default=1,
                     help="local executor: train this many runs at once in separate processes, "
                          "the CPU threads split between them (default 1: in this process)")
    run.add_argument("--shard", type=_shard, metavar="I/N",
                     help="train only the I-th of N disjoint slices of the grid (I from 0), "
                          "e.g. one Slurm array task each")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="ray executor: a running cluster ('auto', or ray://host:10001); "
                          "default: start a Ray instance on this machine")
    run.add_argument("--cpus-per-run", type=_positive_float, default=1.0,
                     help="ray executor: CPUs each run declares (and TF threads it uses; default 1)")
    run.add_argument("--gpus-per-run", type=_non_negative_float, default=0.0,
                     help="ray executor: GPUs each run declares (default 0)")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _shard(text: str) -> tuple[int, int]:
    from trainer.grid import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tensorflow():
    """TensorFlow, imported and done looking for devices (what prints its start-up lines)."""
    import tensorflow as tf

    tf.config.list_physical_devices("GPU")
    return tf


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        experiment = load_experiment(
            args.experiment, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
            data_path=args.data_path, confirm_large=args.confirm_large,
            gradient_noise=False if args.no_gradient_noise else None)
        check_noise_fits_limit(experiment)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer import data as datasets

    datasets.prefetch(experiment.dataset, validation=experiment.validation, limit=experiment.limit,
                      path=experiment.data_path)
    # Imported late: TensorFlow takes seconds to load, and a typo should fail fast.
    tf = quietly(_tensorflow, verbose=args.verbose > 0)
    from trainer.data import DatasetUnavailable
    from trainer.executors import ExecutorUnavailable
    from trainer.grid import LogDirError, run_grid

    # Each run builds a new model, so retracing is expected; the warning would only alarm.
    tf.get_logger().setLevel("ERROR")
    # TensorFlow's modules are ≈340,000 long-lived objects that every full garbage
    # collection would walk again (≈0.08 s each, several per grid): keep them out of it.
    gc.freeze()

    # A batch scheduler stops jobs with SIGTERM: treat it like Ctrl-C, so the current run
    # is marked interrupted (and its lock released) instead of left "running".
    previous = interrupt.install()
    try:
        code = run_grid(experiment, logdir=args.logdir, verbose=args.verbose,
                        allow_download=not args.no_download, executor=args.executor,
                        workers=args.workers, threads=max(1, (os.cpu_count() or 1) // args.workers),
                        shard=args.shard, ray_address=args.ray_address,
                        cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
        interrupt.check()  # a signal that landed after the last run's training still counts
        return code
    except (DatasetUnavailable, LogDirError, ExecutorUnavailable, ExperimentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the current run is marked interrupted and restarts on the next "
              "`make train`", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        interrupt.restore(previous)

