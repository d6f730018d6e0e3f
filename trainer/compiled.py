"""The compiled engine's step loop: one run of a model the fused engine (`trainer.packed`)
cannot express (a CNN, one-hot labels), or of any model with `engine = "compiled"` or
`precision = "bfloat16"`, trained with many steps per call of one TensorFlow program
(`trainer.compiled_model.Program`) instead of `model.fit`'s step at a time.

The same layout as the other engines: every step's loss at its exact global step, epoch
scalars in train/ and validation/, the gradient-noise probe on
`contract.noise.NoiseSchedule`'s schedule (chunks end at the due steps, so the probe sees
the weights of exactly that step), `run.json` through `trainer.manifest`, the fused
engine's data order (a permutation from seed and epoch alone). An epoch's partial last
batch is a step of its own shape.

Runs train one at a time: the documents' grids that need this engine vary the batch size,
so no two of their runs share a data order that would let them share a program. A
program is kept for the next run of the same structure (new initial weights, the
optimizer restarted), so its functions are traced once per process.
"""
from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import numpy as np
import tensorflow as tf

from contract.layout import (
    COMPLETE,
    DIVERGED,
    EPOCH_ACCURACY,
    EPOCH_LOSS,
    FAILED,
    INTERRUPTED,
    SPLITS,
    TRAIN,
    VALIDATION,
)
from contract.noise import NoiseSchedule, roughness
from contract.spec import RunSpec
from trainer import events, faults, interrupt
from trainer.compiled_model import Program
from trainer.compiled_programs import Tensors, build, release, tensors
from trainer.data import Dataset
from trainer.manifest import begin_run, finish_run, one_line
from trainer.models import summarize

__all__ = ["Program", "build", "epoch_batches", "release", "tensors", "train_run"]

# At least this many examples per call of the training program (steps_per_execution is
# raised to reach it): each call costs ≈0.3 ms of Python and a write of its step losses.
MIN_CHUNK_EXAMPLES = 2048


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """An epoch's batches as row indices, the last one partial: the fused engine's order
    (`trainer.data.epoch_order`: a permutation from (seed, epoch) alone)."""
    from trainer.packed import _batches

    idx, counts = _batches(n, batch, seed, epoch)
    return [rows[:count] for rows, count in zip(idx, counts)]


def train_run(experiment, spec: RunSpec, data: Dataset, run_dir: Path, *, precision: str | None = None,
              max_threads: int | None = None) -> dict:
    """Train `spec` from scratch into `run_dir` and return its final manifest. A
    KeyboardInterrupt marks the run interrupted and propagates. `max_threads`: see `build`."""
    precision = precision or getattr(experiment, "precision", "float32")
    manifest = begin_run(experiment, spec, data, run_dir)
    writers = {s: tf.summary.create_file_writer(str(run_dir / s)) for s in SPLITS}
    # "seconds": where the run's time went (run.json "compiled"), to see what to speed up.
    state = {"epochs": 0, "final": {}, "diverged_at": None, "steps": 0,
             "seconds": {"build": 0.0, "train": 0.0, "probe": 0.0, "validate": 0.0, "write": 0.0}}
    program = noise = writer = None
    start = time.perf_counter()

    def finish(status: str) -> dict:
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - a write failed: the log is incomplete
                status = FAILED if status == COMPLETE else status
                manifest.setdefault("error", one_line(exc))
        if program is not None:
            release(program)
        diverged = state["diverged_at"] is not None
        status = DIVERGED if diverged and status == COMPLETE else status
        if "compiled" in manifest:
            manifest["compiled"]["seconds"] = {k: round(v, 3) for k, v in state["seconds"].items()}
        return finish_run(
            manifest, run_dir=run_dir, writers=writers, status=status, start=start,
            steps=state["diverged_at"] or state["steps"], train_examples=len(data.x_train),
            batch_size=spec.batch_size, epochs_done=state["epochs"],
            final={"loss": math.nan} if status == DIVERGED else state["final"],
            noise_summary=noise.summary() if noise is not None else None, diverged_at=state["diverged_at"])

    try:
        program, model = build(spec, data, precision, max_threads)
        state["seconds"]["build"] = time.perf_counter() - start
        manifest["model"] = summarize(model)
        manifest["precision"] = precision
        # How it ran: XLA or not, whose optimizer update, its own session's threads (None:
        # the process's pools), and where the time went.
        manifest["compiled"] = {"xla": program.xla, "update": program.update, "threads": program.threads}
        events.write_run_hparams(run_dir, spec, trial_id=run_dir.name)
        t = tensors(data, program.one_hot, program.eval_rows)
        writer = events.BatchedWriter([writers])
        if experiment.gradient_noise.enabled:
            noise = NoiseSchedule(experiment.gradient_noise, examples=len(data.x_train),
                                  batch_size=spec.batch_size, seed=spec.seed)
        _train_epochs(experiment, spec, data, program, t, writers, writer, noise, state)
        interrupt.check()  # a signal swallowed inside TensorFlow during the last steps
        return finish(COMPLETE)
    except KeyboardInterrupt:
        finish(INTERRUPTED)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the grid
        manifest["error"] = one_line(exc)
        manifest["traceback"] = traceback.format_exc()
        return finish(FAILED)


def chunk_steps(experiment, batch_size: int) -> int:
    """Steps per call of the training program: steps_per_execution, raised to at least
    MIN_CHUNK_EXAMPLES examples."""
    return max(experiment.steps_per_execution, math.ceil(MIN_CHUNK_EXAMPLES / batch_size))


def _train_epochs(experiment, spec: RunSpec, data: Dataset, program: Program, t: Tensors, writers: dict,
                  writer: events.BatchedWriter, noise, state: dict) -> None:
    n_train, batch = len(data.x_train), spec.batch_size
    chunk = chunk_steps(experiment, batch)
    steps_done = 0
    for epoch in range(spec.epochs):
        batches = epoch_batches(n_train, batch, spec.seed, epoch)
        full = len(batches) if len(batches[-1]) == batch else len(batches) - 1
        epoch_losses, loss_sum, right_sum = [], 0.0, 0.0
        s = 0
        while s < len(batches):
            # Whole batches in chunks that end where a measurement is due (so the probe
            # sees the weights of exactly that step); an epoch's partial batch on its own.
            if s < full:
                n = min(chunk, full - s, noise.steps_to_due(steps_done) if noise is not None else chunk)
                idx = np.stack(batches[s:s + n])
                if program.xla and n < chunk:  # one shape per batch size for XLA
                    idx = np.concatenate([idx, np.zeros((chunk - n, batch), np.int32)])
            else:
                n, idx = 1, batches[s][None]
            last = s + n == len(batches)
            with _timed(state, "train"):
                losses, chunk_loss, chunk_right = program.train(t, idx, n)
            first_step = steps_done + 1
            steps_done += n
            state["steps"] = steps_done
            bad = np.flatnonzero(~np.isfinite(losses))
            written = int(bad[0]) + 1 if bad.size else n
            if bad.size:
                state["diverged_at"] = first_step + int(bad[0])
            epoch_losses.append(losses[:written])
            loss_sum += chunk_loss
            right_sum += chunk_right
            if noise is not None and not bad.size:
                plan = noise.plan(steps_done, last)
                if plan is not None:
                    with _timed(state, "probe"):
                        measured = program.probe(t, *plan)
                    (values,) = noise.record(steps_done, *([v] for v in measured))
                    writer.add(0, TRAIN, values, steps_done)
            if bad.size or not last:  # else written with the epoch's scalars below
                writer.write(losses[:, None], first_step, np.array([written]))
                faults.point("step")
                interrupt.check()
            if bad.size:
                writer.drain()
                return
            s += n
        with _timed(state, "validate"):
            val_loss, val_accuracy = program.validate(t)
        state["epochs"] = epoch + 1
        state["final"] = final = {"loss": loss_sum / n_train, "accuracy": right_sum / n_train,
                                  "val_loss": val_loss, "val_accuracy": val_accuracy}
        # As trainer.fit.EpochScalars: epoch_* in train/ and validation/ at the epoch index.
        writer.add(0, TRAIN, events.with_comparisons(
            {EPOCH_LOSS: final["loss"], EPOCH_ACCURACY: final["accuracy"]}, spec), epoch)
        writer.add(0, VALIDATION, events.with_comparisons({EPOCH_LOSS: val_loss, EPOCH_ACCURACY: val_accuracy}, spec),
                   epoch)
        if noise is not None:
            writer.add(0, TRAIN, noise.epoch_values(0, roughness(np.concatenate(epoch_losses))), epoch)
        writer.write(losses[:, None], first_step, np.array([n]))
        with _timed(state, "write"):  # waiting for the writing thread
            writer.drain()
        faults.point("step")
        for split in SPLITS:
            faults.point("flush")
            writers[split].flush()
        interrupt.check()


class _timed:
    """Adds the seconds of a `with` block to state["seconds"][key]."""

    def __init__(self, state: dict, key: str):
        self.seconds, self.key = state["seconds"], key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.key] += time.perf_counter() - self.t0
