"""`python -m trainer`: experiment file → a grid of Keras runs logged to TensorBoard."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

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
                        help="Keras fit verbosity: 1 progress bar, 2 one line per epoch")
    parser.add_argument("--confirm-large", action="store_true", help="allow grids over the run limit")
    parser.add_argument("--no-download", action="store_true", help="never let keras download a dataset")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        experiment = load_experiment(
            args.experiment, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
            data_path=args.data_path, confirm_large=args.confirm_large)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Imported late: TensorFlow takes seconds to load, and a typo should fail fast.
    from trainer.data import DatasetUnavailable
    from trainer.grid import LogDirError, run_grid

    import tensorflow as tf

    # Each run builds a new model, so retracing is expected; the warning would only alarm.
    tf.get_logger().setLevel("ERROR")

    # A batch scheduler stops jobs with SIGTERM: treat it like Ctrl-C, so the current run
    # is marked interrupted (and its lock released) instead of left "running".
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_grid(experiment, logdir=args.logdir, verbose=args.verbose,
                        allow_download=not args.no_download)
    except (DatasetUnavailable, LogDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the current run is marked interrupted and restarts on the next "
              "`make train`", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
