"""The fused engine's step loop: a pack of runs that share a data order, trained together.

A pack's model and compiled functions are `trainer.packed_model.PackedMLP`. Here:
which runs form a pack and which pack object trains them (a released one of the same
structure is reused), each epoch's batches, the chunks of `steps_per_execution` steps
(the last, partial batch of an epoch is a masked full-size batch, so one program serves
every step), divergence per member, the gradient-noise schedule (`contract.noise`),
and the events and manifests of every member. A run's data order depends only on its
seed and batch size, never on its pack mates, so its numbers do not depend on how the
grid was packed.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import tensorflow as tf

from contract.layout import COMPLETE, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, FAILED, INTERRUPTED, SPLITS, TRAIN, VALIDATION
from contract.noise import NoiseSchedule, roughness
from contract.spec import PER_EXAMPLE, PROBE, RunSpec
from trainer import events, faults, interrupt
from trainer.data import Dataset, epoch_order
from trainer.manifest import begin_run, finish_run, one_line, pack_entry
from trainer.packed_model import PackedMLP, structure_key
from trainer.spec import Experiment

# Packs whose training is over, kept for the next pack of the same structure: loading new
# runs into one reuses its traced functions (≈0.8 s a pack) and any XLA program already
# compiled for the batch size. Two are enough: one trains while the next is prepared.
_FREE: list[PackedMLP] = []
_FREE_LOCK = threading.Lock()
KEEP_FREE = 2


def release(pack: PackedMLP) -> None:
    """`pack` is no longer used: `build` may load other runs into it."""
    with _FREE_LOCK:
        _FREE.append(pack)
        del _FREE[:-KEEP_FREE]


def _structure(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> tuple[tuple, tuple | None, bool]:
    """`specs` (batch-norm members last) → (structure key, probe shape or None, per-example norms)."""
    s = experiment.gradient_noise
    estimators = [experiment.noise_estimator(spec) for spec in specs] if s.enabled else []
    per_example = PER_EXAMPLE in estimators
    probe = None
    if PROBE in estimators and s.big_batch <= len(data.x_train):
        probe = (s.batches, s.small_batch)
    input_shape, classes = data.x_train.shape[1:], int(data.y_train.max()) + 1
    return structure_key(specs, input_shape, classes, per_example, probe), probe, per_example


def program_of(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> tuple:
    """Packs with equal values train with the same compiled XLA program (structure and
    batch size): the next such pack loads into the same pack object, so it is not worth
    preparing in a second one (that would compile the program again)."""
    specs = sorted(specs, key=lambda s: s.uses_batch_norm)
    return _structure(experiment, specs, data)[0], specs[0].batch_size


def build(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> PackedMLP:
    """The pack of `specs` (batch-norm members last), with the gradient probe if the
    experiment measures gradient noise and the data has enough examples for it; a
    released pack of the same structure if there is one, preferably one that has compiled
    the batch size already."""
    specs = sorted(specs, key=lambda s: s.uses_batch_norm)
    key, probe, per_example = _structure(experiment, specs, data)
    with _FREE_LOCK:
        same = [p for p in _FREE if p.key == key]
        pack = next((p for p in same if specs[0].batch_size in p.batch_sizes), same[0] if same else None)
        if pack is not None:
            _FREE.remove(pack)
    if pack is None:
        input_shape, classes = data.x_train.shape[1:], int(data.y_train.max()) + 1
        return PackedMLP(specs, input_shape=input_shape, classes=classes, probe=probe, per_example=per_example)
    pack.load(specs, probe)
    return pack


def prepare(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> PackedMLP:
    """A pack built and compiled, ready for `train_pack(..., prepared=)`; the grid runs this
    for the next pack while the current one trains (tracing and XLA compilation take
    1–3 s a pack, mostly on one core)."""
    pack = build(experiment, specs, data)
    pack.warm_up(data, experiment.steps_per_execution)
    return pack


def _batches(n: int, batch: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's batches of `trainer.data.epoch_order` as indices [steps, batch] (the last
    padded) and row counts."""
    order = epoch_order(n, seed, epoch)
    steps = math.ceil(n / batch)
    idx = np.zeros(steps * batch, np.int32)
    idx[:n] = order
    counts = np.full(steps, batch, np.int32)
    counts[-1] = n - (steps - 1) * batch
    return idx.reshape(steps, batch), counts


def train_pack(experiment: Experiment, specs: list[RunSpec], data: Dataset, run_dirs: list[Path], *,
               prepared: PackedMLP | None = None) -> list[dict]:
    """Train the runs `specs` (one pack) from scratch into `run_dirs`; their final manifests,
    in the order given. `prepared`: from `prepare`, used if it holds exactly these runs.
    A KeyboardInterrupt marks every member interrupted and propagates."""
    order = sorted(range(len(specs)), key=lambda j: specs[j].uses_batch_norm)
    specs, run_dirs = [specs[j] for j in order], [run_dirs[j] for j in order]
    first, m = specs[0], len(specs)
    names = [d.name for d in run_dirs]
    # Every member's run.json says which pack it trained in: its wall_seconds are the pack's.
    manifests = [begin_run(experiment, spec, data, d, pack=pack_entry(names, j))
                 for j, (spec, d) in enumerate(zip(specs, run_dirs))]
    writers = [{s: tf.summary.create_file_writer(str(d / s)) for s in SPLITS} for d in run_dirs]
    steps_per_epoch = math.ceil(len(data.x_train) / first.batch_size)
    state = {"epochs": [0] * m, "final": [{} for _ in range(m)], "diverged_at": [None] * m}
    pack = noise = writer = None
    start = time.perf_counter()

    def finish(status_of) -> list[dict]:
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - a write failed: the log is incomplete
                if status_of == COMPLETE:
                    status_of = FAILED
                for manifest in manifests:
                    manifest.setdefault("error", one_line(exc))
        trained = pack.steps if pack is not None else 0
        if pack is not None:
            release(pack)
        out = []
        for j in range(m):
            status = DIVERGED if state["diverged_at"][j] is not None else status_of
            final = {"loss": math.nan} if status == DIVERGED else state["final"][j]
            steps = state["diverged_at"][j] or trained
            out.append(finish_run(
                manifests[j], run_dir=run_dirs[j], writers=writers[j], status=status, start=start,
                steps=steps, train_examples=len(data.x_train), batch_size=first.batch_size,
                epochs_done=state["epochs"][j], final=final,
                noise_summary=noise.summary(j) if noise is not None else None,
                diverged_at=state["diverged_at"][j]))
        return [out[order.index(j)] for j in range(m)]

    try:
        if prepared is not None and prepared.specs == specs and prepared.steps == 0:
            pack = prepared
        else:
            pack = build(experiment, specs, data)
        for manifest, summary, spec, d in zip(manifests, pack.summaries, specs, run_dirs):
            manifest["model"] = summary
            events.write_run_hparams(d, spec, trial_id=d.name)
        writer = events.BatchedWriter(writers)
        if experiment.gradient_noise.enabled:
            noise = NoiseSchedule(experiment.gradient_noise, examples=len(data.x_train),
                                  batch_size=first.batch_size, seed=first.seed, members=m,
                                  estimator=[experiment.noise_estimator(spec) for spec in specs])
        chunk, steps_done = experiment.steps_per_execution, 0
        for epoch in range(first.epochs):
            idx, counts = _batches(len(data.x_train), first.batch_size, first.seed, epoch)
            epoch_losses, loss_sum, right_sum = [], np.zeros(m), np.zeros(m)
            s = 0
            while s < steps_per_epoch:
                n = min(chunk, steps_per_epoch - s)
                last = s + n == steps_per_epoch
                part_idx = np.zeros((chunk, first.batch_size), np.int32)
                part_idx[:n] = idx[s:s + n]
                part_counts = np.zeros(chunk, np.int32)
                part_counts[:n] = counts[s:s + n]
                # The measurements that fall in this chunk (contract.noise.NoiseSchedule),
                # inside the training program, after exactly their steps.
                due = noise.due_in(steps_done, steps_done + n) if noise is not None else []
                rows = [d - steps_done - 1 for d in due]
                probes = {i: noise.plan(d, epoch_end=last and d == steps_done + n)[0]
                          for i, d in zip(rows, due)} if pack.probe_shape else {}
                out = pack.run_chunk(data, part_idx, part_counts, n, validate=last, probes=probes, norms_at=rows)
                losses = out["losses"][:n]
                written = _record_divergence(losses, steps_done, state["diverged_at"])
                first_step, steps_done = steps_done + 1, steps_done + n
                epoch_losses.append(losses)
                loss_sum += out["loss_sum"]
                right_sum += out["right_sum"]
                alive = [d is None for d in state["diverged_at"]]
                if noise is not None:
                    _measure(noise, pack, out, part_counts[:n], first_step - 1, due, last, state["diverged_at"], writer)
                if not last or not any(alive):  # else written with the epoch's scalars below
                    writer.write(losses, first_step, written)
                    faults.point("step")
                    interrupt.check()
                if not any(alive):
                    break
                s += n
            if not any(alive):
                break
            n_train = len(data.x_train)
            for j in range(m):
                if alive[j]:
                    state["epochs"][j] = epoch + 1
                    state["final"][j] = {"loss": float(loss_sum[j] / n_train), "accuracy": float(right_sum[j] / n_train),
                                         "val_loss": float(out["val_loss"][j]),
                                         "val_accuracy": float(out["val_accuracy"][j])}
            # As trainer.fit.EpochScalars: epoch_* in train/ and validation/ at the epoch index.
            epoch_losses = np.concatenate(epoch_losses)
            for j, final in enumerate(state["final"]):
                if alive[j]:
                    writer.add(j, TRAIN, events.with_comparisons(
                        {EPOCH_LOSS: final["loss"], EPOCH_ACCURACY: final["accuracy"]}, specs[j]), epoch)
                    writer.add(j, VALIDATION, events.with_comparisons(
                        {EPOCH_LOSS: final["val_loss"], EPOCH_ACCURACY: final["val_accuracy"]}, specs[j]), epoch)
                    if noise is not None:
                        writer.add(j, TRAIN, noise.epoch_values(j, roughness(epoch_losses[:, j])), epoch)
            writer.write(losses, first_step, written)  # the epoch's last chunk, and its epoch scalars
            writer.drain()
            faults.point("step")
            for j in range(m):
                for split in SPLITS:
                    faults.point("flush")
                    writers[j][split].flush()
            interrupt.check()
        interrupt.check()  # a signal swallowed inside TensorFlow during the last steps
        return finish(COMPLETE)
    except KeyboardInterrupt:
        finish(INTERRUPTED)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed pack must not stop the grid
        for manifest in manifests:
            manifest["error"] = one_line(exc)
            manifest["traceback"] = traceback.format_exc()
        return finish(FAILED)


def _measure(noise: NoiseSchedule, pack: PackedMLP, out: dict, counts: np.ndarray, step0: int, due: list[int],
             epoch_end: bool, diverged_at: list, writer: events.BatchedWriter) -> None:
    """The chunk's per-example values into `noise`, split at its measurements `due`; each
    measurement logged at its step for the members alive then (the probe's cosine at an
    epoch's end only, as the other engines take it; its dot product with the step's own
    gradient at every measurement, with that step's rows, where the probe took it)."""
    start = 0
    for d in due:
        end = d - step0
        if pack.per_example:
            noise.add_steps(out["example_sq"][start:end], out["batch_sq"][start:end], counts[start:end])
        start = end
        alive = [at is None or at > d for at in diverged_at]
        probe = None
        if pack.probe_shape is not None:
            cosine = out["probe_cosine"][end - 1] if epoch_end and end == len(counts) else None
            # The cross term is NaN where the update came between the step and the probe.
            probe = (out["probe_small"][end - 1], out["probe_big"][end - 1], cosine,
                     out["probe_cross"][end - 1], int(counts[end - 1]))
        for j, values in enumerate(noise.measure(d, alive, probe)):
            writer.add(j, TRAIN, values, d)
    if pack.per_example:
        noise.add_steps(out["example_sq"][start:len(counts)], out["batch_sq"][start:len(counts)], counts[start:])


def _record_divergence(losses: np.ndarray, step0: int, diverged_at: list) -> np.ndarray:
    """How many of this chunk's step losses to write per member: all while finite, up to
    and including the first non-finite one, none once a member has diverged."""
    written = np.zeros(losses.shape[1], np.int32)
    for j in range(losses.shape[1]):
        if diverged_at[j] is not None:
            continue
        bad = np.flatnonzero(~np.isfinite(losses[:, j]))
        if bad.size:
            diverged_at[j] = step0 + int(bad[0]) + 1
            written[j] = bad[0] + 1
        else:
            written[j] = len(losses)
    return written

