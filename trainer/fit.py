"""The Keras engine: one run trained with `model.fit`, logged in the layout the report reads."""
from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract.layout import COMPLETE, DIVERGED, FAILED, INTERRUPTED, SPLITS, TRAIN, VALIDATION
from contract.spec import RunSpec
from trainer import events, faults, interrupt
from trainer.data import Dataset, epoch_order
from trainer.manifest import begin_run, finish_run, one_line
from trainer.models import build_model, make_optimizer, summarize
from trainer.noise_probe import GradientNoise
from trainer.spec import Experiment


class EpochScalars(keras.callbacks.Callback):
    """Writes `epoch_*` scalars to train/ and validation/ (step = epoch index, from 0).

    Written here rather than with `keras.callbacks.TensorBoard` so that one writer per
    split is shared with the in-graph step losses: each split folder then holds exactly
    one event file per run, and a restarted run removes it whole. It also stops the run
    on the first non-finite loss and remembers that it diverged.
    """

    def __init__(self, writers: dict, spec: RunSpec):
        super().__init__()
        self.writers, self.spec = writers, spec
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
            # Keras' logs: "loss", "accuracy" for train/, "val_loss", "val_accuracy" for validation/.
            prefix = "val_" if split == VALIDATION else ""
            values = {f"epoch_{k.removeprefix(prefix)}": v for k, v in logs.items()
                      if k.startswith("val_") == bool(prefix)}
            events.write_scalars(writer, events.with_comparisons(values, self.spec), epoch)
            faults.point("flush")
            writer.flush()
        self.epochs_done = epoch + 1
        self.last = logs
        self._check(logs)
        interrupt.check()


def train_run(experiment: Experiment, spec: RunSpec, data: Dataset, run_dir: Path, *,
              verbose: int = 0) -> dict:
    """Train from scratch with `model.fit` into `run_dir` and return the final manifest.

    A KeyboardInterrupt marks the run interrupted and propagates.
    """
    manifest = begin_run(experiment, spec, data, run_dir)

    # A fresh Keras state per run: layer names (shown in the report) and memory do not
    # depend on how many runs this process trained before.
    keras.backend.clear_session()
    writers = {s: tf.summary.create_file_writer(str(run_dir / s)) for s in SPLITS}
    scalars = EpochScalars(writers, spec)
    noise = None
    model = None
    start = time.perf_counter()
    # Everything after the "running" manifest is inside the try, so an interrupt or an
    # error at any point (model build included) still ends in a final manifest.
    try:
        keras.utils.set_random_seed(spec.seed)
        model = build_model(spec, input_shape=data.x_train.shape[1:], classes=int(data.y_train.max()) + 1)
        model.compile(optimizer=make_optimizer(spec), loss=spec.loss, metrics=["accuracy"],
                      steps_per_execution=experiment.steps_per_execution)
        manifest["model"] = summarize(model)
        events.write_run_hparams(run_dir, spec, trial_id=run_dir.name)
        y_train, y_val = data.y_train, data.y_val
        if spec.loss == "categorical_crossentropy":
            classes = int(data.y_train.max()) + 1
            y_train, y_val = (keras.utils.to_categorical(y, classes) for y in (y_train, y_val))
        batches = OrderedBatches(data.x_train, y_train, spec)
        callbacks = [batches, scalars]
        if experiment.gradient_noise.enabled:
            # Before EpochScalars: its end-of-epoch flush then covers the gradient scalars too.
            noise = GradientNoise(experiment.gradient_noise, x=data.x_train, y=y_train,
                                  batch_size=spec.batch_size, loss=spec.loss, seed=spec.seed,
                                  writer=writers[TRAIN])
            callbacks.insert(0, noise)
        with writers[TRAIN].as_default():
            model.fit(
                batches.dataset, epochs=spec.epochs,
                validation_data=(data.x_val, y_val), validation_batch_size=max(spec.batch_size, 1024),
                shuffle=False, verbose=verbose, callbacks=callbacks,
            )
        interrupt.check()  # a signal swallowed inside TensorFlow during the last batches
        status = DIVERGED if scalars.diverged else COMPLETE
    except KeyboardInterrupt:
        _finish(manifest, model, scalars, data, spec, start, INTERRUPTED, run_dir, writers, noise)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the grid
        manifest["error"] = one_line(exc)
        manifest["traceback"] = traceback.format_exc()
        status = FAILED
    return _finish(manifest, model, scalars, data, spec, start, status, run_dir, writers, noise)


class OrderedBatches(keras.callbacks.Callback):
    """The training batches in the other engines' order (`trainer.data.epoch_order`; an
    epoch's last batch partial): `dataset`, for `fit`, yields the batches of the epoch
    this callback last saw begin (fit starts an iterator of it each epoch, after
    `on_epoch_begin`).

    Not `fit(x, y, shuffle=True)`: once a global seed is set (`set_random_seed`, for the
    initial weights), Keras 3's shuffle of arrays draws the same permutation every epoch
    (seen with keras 3.15: each epoch's iterator restarts the seeded shuffle op). Nor one
    iterator over all epochs with `steps_per_epoch`: fit then runs steps_per_execution
    steps a call past an epoch's end, into the next epoch's batches.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, spec: RunSpec):
        super().__init__()
        self.epoch = tf.Variable(0)
        orders = tf.constant(np.stack([epoch_order(len(x), spec.seed, e) for e in range(spec.epochs)]))
        xs, ys = tf.constant(x), tf.constant(y)
        steps = math.ceil(len(x) / spec.batch_size)
        rows = tf.data.Dataset.range(1).flat_map(lambda _: tf.data.Dataset.from_tensor_slices(
            tf.gather(orders, self.epoch.read_value())).batch(spec.batch_size))
        # The known length lets fit end every epoch at its last batch.
        rows = rows.apply(tf.data.experimental.assert_cardinality(steps))
        self.dataset = rows.map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)),
                                num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


def _finish(manifest, model, scalars, data, spec, start, status, run_dir, writers, noise) -> dict:
    return finish_run(
        manifest, run_dir=run_dir, writers=writers, status=status, start=start,
        steps=int(model.optimizer.iterations.numpy()) if model is not None else 0,
        train_examples=len(data.x_train), batch_size=spec.batch_size,
        epochs_done=scalars.epochs_done, final=scalars.last,
        noise_summary=noise.summary() if noise is not None else None, diverged_at=scalars.diverged_at)
