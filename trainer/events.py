"""Everything the trainer writes to TensorBoard, for both engines: the HParams config and
per-run hparams, the run status, eager scalars (the Keras engine) and the fused engine's
batched graph writer. One rule for every scalar: None and non-finite values are left out
(`loggable`)."""
from __future__ import annotations

import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.scalar import metadata as scalar_metadata

from contract.layout import (COMPLETE, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, EVENT_FILE_GLOB, FAILED,
                             INTERRUPTED, RUN_STATUS_TAG, SCALAR_TAGS, SPLITS, STEP_LOSS, TRAIN, VALIDATION)
from contract.spec import RUN_FIELDS, RunSpec
from trainer.spec import Experiment

# Metrics the HParams dashboard shows for each run: (group = run subfolder, tag).
HPARAM_METRICS = (
    (VALIDATION, EPOCH_LOSS, "validation loss"),
    (VALIDATION, EPOCH_ACCURACY, "validation accuracy"),
    (TRAIN, EPOCH_LOSS, "train loss"),
    (TRAIN, EPOCH_ACCURACY, "train accuracy"),
)
# What the HParams dashboard's "session status" shows for each run status.
_SESSION_STATUS = {COMPLETE: "STATUS_SUCCESS", DIVERGED: "STATUS_FAILURE",
                   FAILED: "STATUS_FAILURE", INTERRUPTED: "STATUS_UNKNOWN"}


def loggable(value) -> bool:
    """Whether a scalar is written: None (e.g. no B_simple yet) and NaN/inf are not."""
    return value is not None and math.isfinite(value)


def _event_files(folder: Path) -> set[Path]:
    return set(folder.glob(EVENT_FILE_GLOB))


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
    # TensorBoard's HParams table shows the first few hparams by default: the grid's axes
    # first (in the file's order), then the other fields that vary, then the constants.
    order = [*experiment.grid_axes, *(n for n in RUN_FIELDS if len(values[n]) > 1),
             *(n for n in RUN_FIELDS if len(values[n]) <= 1)]
    hparams = [hp.HParam(name, hp.Discrete(values[name])) for name in dict.fromkeys(order) if name in values]
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


def write_run_status(run_dir: Path, status: str, detail: str = "") -> None:
    """Mark the run's end in TensorBoard: the HParams session status, and a `run_status`
    text summary (Text dashboard) that says e.g. "diverged: non-finite loss"."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hp_summary

    pb = hp_summary.session_end_pb(api_pb2.Status.Value(_SESSION_STATUS[status]), int(time.time()))
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
        tf.summary.text(RUN_STATUS_TAG, f"{status}: {detail}" if detail else status, step=0)
    writer.close()


def write_scalars(writer, values: dict, step: int) -> None:
    """Eager scalars {tag: value} at `step`, the `loggable` ones."""
    with writer.as_default():
        for tag, value in values.items():
            if loggable(value):
                tf.summary.scalar(tag, value, step=step)


# -- the fused engine's batched writer ------------------------------------------------------

# What `tf.summary.scalar` attaches to each value: the scalars plugin's metadata.
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None).SerializeToString()


def _write_rows_impl(handles, offsets, tags, values, steps):
    """Rows offsets[k] ≤ r < offsets[k + 1] to the summary writer handles[k]: the event
    `tf.summary.scalar(SCALAR_TAGS[tags[r]], values[r], step=steps[r])` writes."""
    names = tf.constant(SCALAR_TAGS)
    for k, handle in enumerate(handles):
        def write(r, handle=handle):
            tf.raw_ops.WriteSummary(writer=handle, step=steps[r], tensor=values[r],
                                    tag=tf.gather(names, tags[r]), summary_metadata=_SCALAR_METADATA)
            return r + 1

        tf.while_loop(lambda r, k=k: r < offsets[k + 1], write, (offsets[k],))


_WRITE_ROWS: dict[int, tf.types.experimental.PolymorphicFunction] = {}
_WRITE_ROWS_LOCK = threading.Lock()


def _write_rows(streams: int):
    """`_write_rows_impl` for `streams` writers, traced once per process (≈0.6 s). The
    writers are arguments, not the default writer at tracing time, so one trace serves
    every pack; that is why it uses the raw WriteSummary op, which takes a writer's
    resource handle."""
    with _WRITE_ROWS_LOCK:
        if streams not in _WRITE_ROWS:
            rows = [tf.TensorSpec([None], dtype) for dtype in (tf.int32, tf.float32, tf.int64)]
            _WRITE_ROWS[streams] = tf.function(
                _write_rows_impl, autograph=False,
                input_signature=[[tf.TensorSpec([], tf.resource)] * streams,
                                 tf.TensorSpec([streams + 1], tf.int32), *rows])
        return _WRITE_ROWS[streams]


def warm_up(members: int) -> None:
    """Trace the batched writer for packs of `members` runs (on throwaway writers)."""
    streams = len(SPLITS) * members
    if streams in _WRITE_ROWS:
        return
    with tempfile.TemporaryDirectory(prefix="events-warm-up-") as tmp:
        writers = [tf.summary.create_file_writer(f"{tmp}/{k}") for k in range(streams)]
        _write_rows(streams)([w._resource for w in writers], np.zeros(streams + 1, np.int32),
                             np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        for w in writers:
            w.close()


class BatchedWriter:
    """Every scalar a pack logs, written once per chunk by `_write_rows`: the step losses
    (one per step and member, at the exact global step) and the rows added since the last
    call (gradient noise, epoch scalars), each to its member's train or validation writer.

    Written by hand because eager `tf.summary.scalar` costs ≈0.5 ms a value (≈3,000 values
    for a lab grid, besides ≈55,000 step losses); here a value costs ≈20 µs. The writing
    runs in a thread, while the next chunk trains; `drain` waits for it (and raises its
    error, e.g. a full disk), and is called before every flush.
    """

    def __init__(self, writers: list[dict]):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self._pending: list = []
        self.members = len(writers)
        self.tag_ids = {tag: i for i, tag in enumerate(SCALAR_TAGS)}
        self.rows: list[tuple[int, int, float, int]] = []  # (stream, tag id, value, step)
        # Streams: per split (SPLITS order), the members' writers. `_resource`
        # is the handle `tf.summary.write` itself uses; TensorFlow has no public accessor.
        self.handles = [w[split]._resource for split in SPLITS for w in writers]

    def add(self, member: int, split: str, values: dict, step: int) -> None:
        """Scalars {tag: value} for one member's split at `step`, the `loggable` ones."""
        stream = SPLITS.index(split) * self.members + member
        for tag, value in values.items():
            if loggable(value):
                self.rows.append((stream, self.tag_ids[tag], float(value), int(step)))

    def write(self, losses: np.ndarray, first_step: int, counts: np.ndarray) -> None:
        """losses[:counts[j], j] at steps first_step, first_step + 1, … and the added rows."""
        streams, tags, values, steps = [], [], [], []
        for j in range(self.members):
            n = int(counts[j])
            streams.append(np.full(n, SPLITS.index(TRAIN) * self.members + j))
            tags.append(np.full(n, self.tag_ids[STEP_LOSS], np.int32))
            values.append(losses[:n, j])
            steps.append(first_step + np.arange(n))
        if self.rows:
            extra = np.array(self.rows, dtype=object)
            streams.append(extra[:, 0].astype(np.int64))
            tags.append(extra[:, 1].astype(np.int32))
            values.append(extra[:, 2].astype(np.float32))
            steps.append(extra[:, 3].astype(np.int64))
        streams = np.concatenate(streams)
        order = np.argsort(streams, kind="stable")
        offsets = np.searchsorted(streams[order], np.arange(len(self.handles) + 1)).astype(np.int32)
        self._pending.append(self._thread.submit(
            _write_rows(len(self.handles)), self.handles, offsets, np.concatenate(tags)[order],
            np.concatenate(values).astype(np.float32)[order], np.concatenate(steps).astype(np.int64)[order]))
        self.rows = []

    def drain(self) -> None:
        """Wait until everything given to `write` is with the writers."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._thread.shutdown()
