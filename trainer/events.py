"""Everything the trainer writes to TensorBoard, for both engines: the HParams config and
per-run hparams, the Custom Scalars layout, the run status, eager scalars (the Keras
engine) and the fused engine's batched graph writer. One rule for every scalar: None and
non-finite values are left out (`loggable`)."""
from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.scalar import metadata as scalar_metadata

from contract.layout import (BN_NAMES, COMPLETE, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, EPOCH_METRICS,
                             EVENT_FILE_GLOB, FAILED, INTERRUPTED, NOISE_AT_BATCH, NOISE_B_SIMPLE,
                             NOISE_COSINE, NOISE_EPOCH_AT_BATCH, NOISE_EPOCH_B_HIGH, NOISE_EPOCH_B_LOW,
                             NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_COSINE, NOISE_G2, NOISE_ROUGHNESS,
                             NOISE_TRACE, RUN_STATUS_TAG, SCALAR_TAGS, SPLITS, STEP_LOSS, TRAIN, VALIDATION,
                             comparison_tags, is_comparison_tag, noise_tag)
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
        _write_layout(values["batch_size"], values["batch_norm"])
    writer.close()
    for path in old:
        path.unlink(missing_ok=True)


def with_comparisons(values: dict, spec: RunSpec) -> dict:
    """Epoch scalars `values` and, for each epoch metric among them, its copies under the
    run's comparison tags (`contract.layout.comparison_tags`)."""
    out = dict(values)
    for metric in EPOCH_METRICS:
        if metric in values:
            out.update(dict.fromkeys(comparison_tags(metric, spec.batch_size, spec.batch_norm), values[metric]))
    return out


def _chart(title: str, *patterns: str):
    from tensorboard.plugins.custom_scalar import layout_pb2

    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(patterns)))


def custom_scalars_layout(batch_sizes, batch_norms):
    """The Custom Scalars tab as the documents compare runs: per batch size, the loss and
    accuracy of train and validation with BN on and off in one chart; per BN setting, the
    batch sizes in one chart; the gradient-noise tags grouped. Each chart's tag regex
    matches one comparison tag exactly, so it holds only the runs of its setting (the
    run names tell them apart: `<run>/train`, `<run>/validation`)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    def exact(tag: str) -> str:
        return f"^{re.escape(tag)}$"

    def noise(*names: str) -> str:
        return "^(" + "|".join(re.escape(noise_tag(n)) for n in names) + ")$"

    sizes = sorted({int(b) for b in batch_sizes})
    norms = [bn for bn in (False, True) if bn in {bool(b) for b in batch_norms}]
    per_size = [_chart(f"batch {b}: {metric.removeprefix('epoch_')}, BN on and off",
                       exact(comparison_tags(metric, b, False)[0]))
                for b in sizes for metric in EPOCH_METRICS]
    per_bn = [_chart(f"BN {BN_NAMES[bn]}: {metric.removeprefix('epoch_')}, batch sizes side by side",
                     exact(comparison_tags(metric, sizes[0], bn)[1]))
              for bn in norms for metric in EPOCH_METRICS]
    gradient = [_chart("B_simple at each measurement", noise(NOISE_B_SIMPLE)),
                _chart("B_simple at epoch ends, with its 95% interval",
                       noise(NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH)),
                _chart("|G|² and tr Σ, single estimates", noise(NOISE_G2, NOISE_TRACE)),
                _chart("noise at the run's batch size, tr Σ / B", noise(NOISE_AT_BATCH, NOISE_EPOCH_AT_BATCH)),
                _chart("cosine of a batch gradient with the big batch's (probe runs)", noise(NOISE_COSINE, NOISE_EPOCH_COSINE)),
                _chart("step-loss roughness", noise(NOISE_ROUGHNESS))]
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="Per batch size: BN on and off, train and validation", chart=per_size),
        layout_pb2.Category(title="Per batch-norm setting: batch sizes side by side", chart=per_bn),
        layout_pb2.Category(title="Gradient noise", chart=gradient, closed=True)])


def _write_layout(batch_sizes, batch_norms) -> None:
    """The Custom Scalars layout, into the default writer (as `summary.custom_scalar_pb`)."""
    from tensorboard.summary.v1 import custom_scalar_pb

    pb = custom_scalar_pb(custom_scalars_layout(batch_sizes, batch_norms))
    tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)


def write_run_hparams(run_dir: Path, spec: RunSpec, trial_id: str, *, layout: bool = False) -> None:
    """The run's hparams at its root; with `layout`, also its own Custom Scalars charts (for
    runs logged outside a grid, by `tblab.LabLogger`: TensorBoard merges every run's layout,
    one chart per title)."""
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        hp.hparams(spec.hparams(), trial_id=trial_id)
        if layout:
            _write_layout([spec.batch_size], [spec.batch_norm])
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


def _write_rows_impl(handles, offsets, names, tags, values, steps):
    """Rows offsets[k] ≤ r < offsets[k + 1] to the summary writer handles[k]: the event
    `tf.summary.scalar(names[tags[r]], values[r], step=steps[r])` writes."""
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
                                 tf.TensorSpec([streams + 1], tf.int32), tf.TensorSpec([None], tf.string), *rows])
        return _WRITE_ROWS[streams]


def warm_up(members: int) -> None:
    """Trace the batched writer for packs of `members` runs (on throwaway writers)."""
    streams = len(SPLITS) * members
    if streams in _WRITE_ROWS:
        return
    with tempfile.TemporaryDirectory(prefix="events-warm-up-") as tmp:
        writers = [tf.summary.create_file_writer(f"{tmp}/{k}") for k in range(streams)]
        _write_rows(streams)([w._resource for w in writers], np.zeros(streams + 1, np.int32),
                             np.array(SCALAR_TAGS, dtype=object), np.zeros(0, np.int32),
                             np.zeros(0, np.float32), np.zeros(0, np.int64))
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
        self.tag_ids = {tag: i for i, tag in enumerate(SCALAR_TAGS)}  # comparison tags join in `add`
        self._names_tensor: tf.Tensor | None = None
        self.rows: list[tuple[int, int, float, int]] = []  # (stream, tag id, value, step)
        # Streams: per split (SPLITS order), the members' writers. `_resource`
        # is the handle `tf.summary.write` itself uses; TensorFlow has no public accessor.
        self.handles = [w[split]._resource for split in SPLITS for w in writers]

    def add(self, member: int, split: str, values: dict, step: int) -> None:
        """Scalars {tag: value} for one member's split at `step`, the `loggable` ones."""
        stream = SPLITS.index(split) * self.members + member
        for tag, value in values.items():
            if loggable(value):
                if tag not in self.tag_ids and not is_comparison_tag(tag):
                    raise KeyError(f"not a tag of the log layout: {tag!r}")
                tag_id = self.tag_ids.setdefault(tag, len(self.tag_ids))
                self.rows.append((stream, tag_id, float(value), int(step)))

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
            _write_rows(len(self.handles)), self.handles, offsets, self._names(), np.concatenate(tags)[order],
            np.concatenate(values).astype(np.float32)[order], np.concatenate(steps).astype(np.int64)[order]))
        self.rows = []

    def _names(self) -> tf.Tensor:
        """The tag names by id, as a tensor made again only when a tag joined."""
        if self._names_tensor is None or self._names_tensor.shape[0] != len(self.tag_ids):
            self._names_tensor = tf.constant(list(self.tag_ids))
        return self._names_tensor

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
