"""Runs written by others: Keras' TensorBoard callback, `tf.summary.scalar` by hand, and
PyTorch / TensorboardX `SummaryWriter` (`simple_value`) scalars, read into our tags.

A run is a folder with split subfolders holding event files (train/, validation/; also
training/, val/, valid/, eval/, evaluation/, test/), or a folder holding event files
itself. Its event files are read record by record (TensorFlow's reader, so damage is
reported as for our own logs): `simple_value` scalars and scalar tensors of the scalars
plugin are kept; text, graphs (Keras' write_graph model config), histograms, images and
hparams are not scalars and are skipped; hparams (`hp.hparams`) are read as the run's
factors.

Each scalar tag is mapped to (split, metric, unit) by its words (`classify`): the split
from the tag ("loss/train", "val_loss", "Accuracy/val") or else the folder (none: train);
the metric from loss/cost/nll or accuracy/acc; the unit from epoch or batch/step/iter
words. A tag naming no unit is per-epoch if it is a validation tag, or a train tag with
as many points as the run's validation tags (or no more than a per-step series of the
same metric); a train tag with more points than the validation tags is per-step. Per-epoch
points are numbered 0, 1, ... in step order; per-step points keep their steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from contract.layout import (EPOCH_ACCURACY, EPOCH_LOSS, EVENT_FILE_GLOB, NOISE_TAGS, RUN_MANIFEST, STEP_LOSS,
                             TRAIN, VALIDATION, is_comparison_tag)

SPLIT_FOLDERS = {TRAIN: TRAIN, "training": TRAIN, VALIDATION: VALIDATION, "val": VALIDATION,
                 "valid": VALIDATION, "eval": VALIDATION, "evaluation": VALIDATION, "test": VALIDATION}
TRAIN_WORDS = {"train", "training", "trn"}
# Validation words, most preferred first: with "Loss/val" and "Loss/test" both logged,
# the first is the validation loss and the second is left unused.
VALIDATION_WORDS = ({"val", "valid", "validation"}, {"eval", "evaluation", "dev", "holdout"},
                    {"test", "testing", "tst"})
LOSS_WORDS = {"loss", "cost", "nll", "xent"}
ACCURACY_WORDS = {"accuracy", "acc", "accu"}
EPOCH_WORDS = {"epoch", "epochs", "ep"}
STEP_WORDS = {"batch", "batches", "step", "steps", "iter", "iters", "iteration", "iterations", "it", "global",
              "minibatch", "update", "updates"}
NOT_THE_METRIC = re.compile(r"top\d*|topk|k|std|var|min|max")
OUR_TAGS = {(TRAIN, "loss", "epoch"): EPOCH_LOSS, (VALIDATION, "loss", "epoch"): EPOCH_LOSS,
            (TRAIN, "accuracy", "epoch"): EPOCH_ACCURACY, (VALIDATION, "accuracy", "epoch"): EPOCH_ACCURACY,
            (TRAIN, "loss", "step"): STEP_LOSS}
HPARAMS_TAG = "_hparams_/session_start_info"
SCALAR_PLUGINS = ("scalars", "")
MAX_DEPTH = 6
KERAS_EPOCHS_DROPPED = ("Keras' TensorBoard(update_freq=N) writes an epoch's summaries only when the epoch's last "
                        "batch number is a multiple of N: use update_freq='epoch' or 'batch'")


@dataclass
class Found:
    """A run folder of someone else's logs."""
    name: str                                   # its path under the log folder ("fit/xavier_bs64")
    path: Path
    files: list[tuple[Path, str | None]]        # event files and their folder's split (None: the run folder)
    hparams_files: list[Path] = field(default_factory=list)  # add_hparams subfolders (PyTorch)


@dataclass
class Read:
    """One foreign run's scalars in our tags, and what was made of its tags."""
    scalars: pd.DataFrame                       # split, tag, step, value
    epochs: int = 0                             # per-epoch points of its longest epoch series
    steps: int | None = None                    # optimizer steps, where the logs say
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_batch_tags: bool = False


def _events(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(EVENT_FILE_GLOB) if p.is_file())


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_events(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob(EVENT_FILE_GLOB))


def is_run(folder: Path) -> bool:
    """Whether `folder` itself is one run (split subfolders with event files)."""
    return any(s.name.lower() in SPLIT_FOLDERS and _events(s) for s in _subdirs(folder))


def discover(logdir: Path, folders: list[Path], notes: list[str]) -> list[Found]:
    """The runs in `folders` (folders under `logdir` that are not our trainer's runs)."""
    out: list[Found] = []
    for folder in folders:
        _walk(logdir, folder, out, notes, 0)
    return out


def _walk(logdir: Path, folder: Path, out: list[Found], notes: list[str], depth: int) -> None:
    subdirs = _subdirs(folder)
    own = _events(folder)
    splits = [s for s in subdirs if s.name.lower() in SPLIT_FOLDERS and _events(s)]
    others = [s for s in subdirs if s not in splits and _has_events(s)]
    # PyTorch's add_hparams writes its hparams into a subfolder named by the time.
    timed = [s for s in others if re.fullmatch(r"\d+(\.\d+)?", s.name)]
    name = folder.name if folder == logdir else folder.relative_to(logdir).as_posix()
    if splits or (own and len(timed) == len(others)):
        files = [(f, None) for f in own] + [(f, SPLIT_FOLDERS[s.name.lower()]) for s in splits for f in _events(s)]
        hparams_files = [f for s in timed for f in sorted(s.rglob(EVENT_FILE_GLOB)) if f.is_file()]
        out.append(Found(name, folder, files, hparams_files))
        return
    if own:
        notes.append(f"{name}: its own event files sit beside run folders and were not read")
    if depth >= MAX_DEPTH:
        return
    for sub in others:
        if (sub / RUN_MANIFEST).exists():
            notes.append(f"{sub.relative_to(logdir).as_posix()}: a run of our trainer below the log folder's "
                         f"top level, not read; report its experiment folder ({sub.parent}) instead")
            continue
        _walk(logdir, sub, out, notes, depth + 1)


# -- reading an event file --------------------------------------------------------------------

def read_file(path: Path) -> tuple[pd.DataFrame, dict]:
    """One event file → (step, tag, value) frame of its scalars and {"records", "error",
    "hparams"}: damage is found as for our files (length and CRC, TensorFlow's reader)."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2
    from tensorflow.python.util import deprecation

    steps, tags, values, plugins, hparams = [], [], [], {}, None
    records, error = 0, None
    try:
        with deprecation.silence():
            for record in tf.compat.v1.io.tf_record_iterator(str(path)):
                records += 1
                event = event_pb2.Event.FromString(record)
                if not event.HasField("summary"):
                    continue
                for v in event.summary.value:
                    if v.HasField("metadata") and v.metadata.plugin_data.plugin_name:
                        plugins[v.tag] = v.metadata.plugin_data.plugin_name
                    if v.tag == HPARAMS_TAG:
                        hparams = {**(hparams or {}), **_hparams(v)}
                        continue
                    x = _scalar(v, plugins.get(v.tag, ""))
                    if x is not None:
                        steps.append(event.step), tags.append(v.tag), values.append(x)
    except Exception as exc:  # noqa: BLE001 - DataLossError and OS errors alike mean damage
        error = str(exc).split(" failed with ")[0].splitlines()[0]
    if error is None and records == 0:
        error = "empty file"
    frame = pd.DataFrame({"step": np.asarray(steps, dtype=np.int64), "tag": pd.Series(tags, dtype=object),
                          "value": np.asarray(values, dtype=np.float64)})
    return (frame.iloc[:0] if error else frame), {"records": records, "error": error, "hparams": hparams}


def _scalar(v, plugin: str) -> float | None:
    kind = v.WhichOneof("value")
    if kind == "simple_value":
        return float(v.simple_value)
    if kind != "tensor" or plugin not in SCALAR_PLUGINS:
        return None  # histograms, images, audio, text, Keras' model graph, hparams
    from tensorboard.util import tensor_util

    try:
        a = tensor_util.make_ndarray(v.tensor)
    except Exception:  # noqa: BLE001 - a tensor type TensorBoard cannot decode is no scalar
        return None
    if a.size != 1 or a.dtype.kind not in "fiub":
        return None
    return float(a.reshape(()))


def _hparams(v) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    try:
        data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
    except Exception:  # noqa: BLE001 - unreadable hparams are no hparams
        return {}
    out = {}
    for name, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        if kind in ("number_value", "string_value", "bool_value"):
            out[name] = getattr(value, kind)
    return out


# -- tags → our tags --------------------------------------------------------------------------

def words(tag: str) -> list[str]:
    """'Loss/train' → ['loss', 'train']; 'valAcc' → ['val', 'acc']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", tag)
    return [w for w in re.split(r"[/_\-.\s:]+", spaced.lower()) if w]


def classify(tag: str, folder_split: str | None) -> tuple[str, str, str | None, int] | None:
    """(split, metric, unit or None, preference) of a scalar tag, or None when it is not a
    loss or an accuracy (learning rate, steps per second, ...). Lower preference wins."""
    ws = words(tag)
    if any(NOT_THE_METRIC.fullmatch(w) for w in ws):
        return None
    loss, acc = any(w in LOSS_WORDS for w in ws), any(w in ACCURACY_WORDS for w in ws)
    if loss == acc:
        return None
    train = any(w in TRAIN_WORDS for w in ws)
    rank = next((i for i, group in enumerate(VALIDATION_WORDS) if any(w in group for w in ws)), None)
    if train and rank is not None:
        return None
    split = TRAIN if train else VALIDATION if rank is not None else folder_split or TRAIN
    epoch, step = any(w in EPOCH_WORDS for w in ws), any(w in STEP_WORDS for w in ws)
    unit = None if epoch == step else "epoch" if epoch else "step"
    return split, "loss" if loss else "accuracy", unit, (rank or 0) * 1000 + len(tag)


def to_our_tags(frames: list[tuple[str | None, pd.DataFrame]]) -> Read:
    """A run's scalars (per folder split) in our tags; see the module docstring."""
    series, unused, has_batch = [], set(), False
    for folder_split, df in frames:
        for tag, g in df.groupby("tag", sort=True):
            if is_comparison_tag(str(tag)):  # our layout's copies for TensorBoard's Custom Scalars
                continue
            has_batch |= str(tag).startswith("batch_")
            if folder_split == TRAIN and tag in NOISE_TAGS:  # our trainer's own gradient-noise tags
                series.append(((TRAIN, tag, "keep", 0), tag, g))
                continue
            c = classify(str(tag), folder_split)
            if c is None:
                unused.add(str(tag))
            else:
                series.append((c, str(tag), g))
    val_points = max((len(g) for (split, _, unit, _), _, g in series if split == VALIDATION and unit != "step"),
                     default=0)
    resolved, guessed = [], []
    for (split, metric, unit, pref), tag, g in series:
        if unit is None:
            if split == VALIDATION:
                unit = "epoch"
            elif val_points:
                unit = "step" if len(g) > val_points else "epoch"
            else:  # no validation series to compare with: per-epoch, unless it has a per-epoch twin
                twin = any((s, m, u) == (split, metric, "epoch") for (s, m, u, _), _, _ in series)
                unit = "step" if twin else "epoch"
                guessed.append(f"{tag} as per-{unit}")
        resolved.append(((split, metric, unit), pref, tag, g))
    chosen: dict[tuple, tuple] = {}
    for key, pref, tag, g in sorted(resolved, key=lambda r: (r[0], r[1], r[2])):
        if key in chosen:
            unused.add(f"{tag} (same as {chosen[key][0]})")
        elif key in OUR_TAGS or key[2] == "keep":
            chosen[key] = (tag, g)
        else:
            unused.add(tag)
    read = _assemble(chosen, sorted(unused), has_batch)
    if guessed:
        read.notes.append(f"no validation series to tell per-epoch from per-step, so {', '.join(guessed)} "
                          "(a tag that names its unit, e.g. loss/train/epoch or batch_loss, is read as named)")
    return read


def _assemble(chosen: dict, unused: list[str], has_batch: bool) -> Read:
    notes, parts = [], []
    epoch_series = {k: g.sort_values("step", kind="stable") for k, (_, g) in chosen.items() if k[2] == "epoch"}
    counts = {len(g) for g in epoch_series.values()}
    # Series of equal length are numbered by their order (one may be logged at the epoch,
    # another at the global step); otherwise by the union of their steps.
    union = np.unique(np.concatenate([g["step"].to_numpy() for g in epoch_series.values()])) \
        if epoch_series else np.array([], dtype=np.int64)
    for (split, metric, unit), (tag, g) in chosen.items():
        g = g.sort_values("step", kind="stable")
        values = g["value"].to_numpy(dtype=float)
        if unit == "epoch":
            steps = (np.arange(len(g)) if len(counts) == 1 and g["step"].is_unique
                     else np.searchsorted(union, g["step"].to_numpy()))
            if metric == "accuracy":
                finite = values[np.isfinite(values)]
                if len(finite) and 1.0 < finite.max() <= 100.0:
                    values = values / 100.0
                    notes.append(f"{tag} is in percent (up to {finite.max():g}); divided by 100")
        else:
            steps = g["step"].to_numpy()
        out_tag = metric if unit == "keep" else OUR_TAGS[split, metric, unit]
        parts.append(pd.DataFrame({"split": split, "tag": out_tag, "step": steps.astype(np.int64), "value": values}))
    frame = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame({"split": [], "tag": [], "step": pd.Series(dtype=np.int64), "value": []}))
    epochs = max(counts, default=0)
    steps = None
    step_loss = frame[frame["tag"] == STEP_LOSS]
    if len(step_loss):
        steps = int(step_loss["step"].max())
    return Read(scalars=frame, epochs=epochs, steps=steps, unused=unused, notes=notes, has_batch_tags=has_batch)


def keras_steps(frames: list[tuple[str | None, pd.DataFrame]]) -> int | None:
    """The optimizer steps of a Keras run: its evaluation_*_vs_iterations scalars are
    logged at the optimizer's step count after each epoch's validation."""
    last = [int(df[df["tag"].astype(str).str.endswith("_vs_iterations")]["step"].max())
            for _, df in frames if len(df) and df["tag"].astype(str).str.endswith("_vs_iterations").any()]
    return max(last) if last else None
