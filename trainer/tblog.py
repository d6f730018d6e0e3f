"""TensorBoard writing: the HParams config and per-run hparams, epoch scalars, divergence."""
from __future__ import annotations

import math
from pathlib import Path

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer import faults, interrupt
from trainer.spec import RUN_FIELDS, Experiment, RunSpec

# Metrics the HParams dashboard shows for each run: (group = run subfolder, tag).
HPARAM_METRICS = (
    ("validation", "epoch_loss", "validation loss"),
    ("validation", "epoch_accuracy", "validation accuracy"),
    ("train", "epoch_loss", "train loss"),
    ("train", "epoch_accuracy", "train accuracy"),
)


def _event_files(folder: Path) -> set[Path]:
    return set(folder.glob("events.out.tfevents.*"))


def write_hparams_config(exp_dir: Path, experiment: Experiment) -> None:
    """The experiment-level HParams config: every run field with the values of this grid.

    A fresh config replaces the previous one, so a changed grid never leaves two
    conflicting configs at the root.
    """
    old = _event_files(exp_dir)
    values: dict[str, list] = {name: [] for name in RUN_FIELDS}
    for spec in experiment.runs:
        for name, value in spec.hparams().items():
            if value not in values[name]:
                values[name].append(value)
    hparams = [hp.HParam(name, hp.Discrete(vals)) for name, vals in values.items()]
    metrics = [hp.Metric(tag, group=group, display_name=label) for group, tag, label in HPARAM_METRICS]
    writer = tf.summary.create_file_writer(str(exp_dir))
    with writer.as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()
    for path in old:
        path.unlink(missing_ok=True)


def write_run_hparams(run_dir: Path, spec: RunSpec, trial_id: str) -> None:
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        hp.hparams(spec.hparams(), trial_id=trial_id)
    writer.close()


# What the HParams dashboard's "session status" shows for each run status.
_SESSION_STATUS = {"complete": "STATUS_SUCCESS", "diverged": "STATUS_FAILURE",
                   "failed": "STATUS_FAILURE", "interrupted": "STATUS_UNKNOWN"}


def write_run_status(run_dir: Path, status: str, detail: str = "") -> None:
    """Mark the run's end in TensorBoard: the HParams session status, and a `run_status`
    text summary (Text dashboard) that says e.g. "diverged: non-finite loss"."""
    import time

    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hp_summary

    pb = hp_summary.session_end_pb(api_pb2.Status.Value(_SESSION_STATUS[status]), int(time.time()))
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
        tf.summary.text("run_status", f"{status}: {detail}" if detail else status, step=0)
    writer.close()


def write_scalars(writer, values: dict, step: int) -> None:
    """Each finite value; None (e.g. no B_simple yet) and non-finite values are left out."""
    with writer.as_default():
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                tf.summary.scalar(tag, value, step=step)


class EpochScalars(keras.callbacks.Callback):
    """Writes `epoch_*` scalars to train/ and validation/ (step = epoch index, from 0).

    Written here rather than with `keras.callbacks.TensorBoard` so that one writer per
    split is shared with the in-graph step losses: each split folder then holds exactly
    one event file per run, and a restarted run removes it whole. It also stops the run
    on the first non-finite loss and remembers that it diverged.
    """

    def __init__(self, train_writer, validation_writer):
        super().__init__()
        self.writers = {"train": train_writer, "validation": validation_writer}
        self.diverged = False
        self.diverged_at: int | None = None
        self.epochs_done = 0
        self.last: dict[str, float] = {}

    def _check(self, logs) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and not self.diverged:
            self.diverged = True
            self.diverged_at = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        faults.point("step")
        interrupt.check()
        self._check(logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for split, writer in self.writers.items():
            with writer.as_default():
                for key, value in logs.items():
                    is_val = key.startswith("val_")
                    if is_val == (split == "validation"):
                        tf.summary.scalar(f"epoch_{key.removeprefix('val_')}", value, step=epoch)
            faults.point("flush")
            writer.flush()
        self.epochs_done = epoch + 1
        self.last = logs
        self._check(logs)
        interrupt.check()
