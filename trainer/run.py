"""Train one run of a grid and log it in the layout the report reads."""
from __future__ import annotations

import math
import os
import shutil
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer import interrupt
from trainer.data import Dataset
from trainer.manifest import FINISHED, MANIFEST, hardware, library_versions, read_manifest, write_json_atomic
from trainer.models import build_model, make_optimizer, summarize
from trainer.noise_probe import GradientNoise
from trainer.spec import Experiment, RunSpec
from trainer.tblog import EpochScalars, write_run_hparams, write_run_status

SPLITS = ("train", "validation")


def run_config(experiment: Experiment, spec: RunSpec, data: Dataset) -> dict:
    """What decides a run's numbers; a finished run is reused only if this matches."""
    return {
        "spec": spec.to_dict(), "dataset": data.name, "validation": experiment.validation,
        "limit": experiment.limit, "train_examples": int(len(data.x_train)),
        "validation_examples": int(len(data.x_val)),
        "gradient_noise": experiment.gradient_noise.to_dict(),
        "engine": experiment.engine_of(spec),
    }


def is_reusable(run_dir: Path, config: dict) -> dict | None:
    """The manifest of a finished run with the same config, else None."""
    manifest = read_manifest(run_dir)
    if manifest and manifest.get("status") in FINISHED and manifest.get("config") == config:
        return manifest
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def begin_run(experiment: Experiment, spec: RunSpec, data: Dataset, run_dir: Path) -> dict:
    """Empty `run_dir` and write its "running" manifest; returns the manifest.

    Any earlier attempt's files are removed first, so TensorBoard never sees two
    copies of a step.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    manifest = {
        "experiment": experiment.name, "run": run_dir.name, "config": run_config(experiment, spec, data),
        "spec": spec.to_dict(), "seed": spec.seed, "status": "running",
        "start_time": _now(), "end_time": None, "wall_seconds": None, "steps": 0,
        "examples_seen": 0, "epochs_completed": 0, "final": {},
        "dataset": data.describe(), "engine": experiment.engine_of(spec),
        "steps_per_execution": experiment.steps_per_execution,
        "versions": library_versions(), "hardware": hardware(),
        "worker": {"pid": os.getpid(), "host": socket.gethostname()},
    }
    write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


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
    scalars = EpochScalars(writers["train"], writers["validation"])
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
        write_run_hparams(run_dir, spec, trial_id=run_dir.name)
        y_train, y_val = data.y_train, data.y_val
        if spec.loss == "categorical_crossentropy":
            classes = int(data.y_train.max()) + 1
            y_train, y_val = (keras.utils.to_categorical(y, classes) for y in (y_train, y_val))
        callbacks = [scalars]
        if experiment.gradient_noise.enabled:
            # Before EpochScalars: its end-of-epoch flush then covers the gradient scalars too.
            noise = GradientNoise(experiment.gradient_noise, x=data.x_train, y=y_train,
                                  batch_size=spec.batch_size, loss=spec.loss, seed=spec.seed,
                                  writer=writers["train"])
            callbacks.insert(0, noise)
        with writers["train"].as_default():
            model.fit(
                data.x_train, y_train, batch_size=spec.batch_size, epochs=spec.epochs,
                validation_data=(data.x_val, y_val), validation_batch_size=max(spec.batch_size, 1024),
                shuffle=True, verbose=verbose, callbacks=callbacks,
            )
        interrupt.check()  # a signal swallowed inside TensorFlow during the last batches
        status = "diverged" if scalars.diverged else "complete"
    except KeyboardInterrupt:
        _finish(manifest, model, scalars, data, spec, start, "interrupted", run_dir, writers, noise)
        raise
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the grid
        manifest["error"] = _one_line(exc)
        manifest["traceback"] = traceback.format_exc()
        status = "failed"
    return _finish(manifest, model, scalars, data, spec, start, status, run_dir, writers, noise)


# How a full disk, a quota, a file-size limit or a read-only mount show up, from Python
# (OSError) or from TensorFlow's C++ writers (a tf.errors message with the OS text).
DISK_ERRORS = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system")


def _one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def _finish(manifest, model, scalars, data, spec, start, status, run_dir, writers, noise) -> dict:
    return finish_run(
        manifest, run_dir=run_dir, writers=writers, status=status, start=start,
        steps=int(model.optimizer.iterations.numpy()) if model is not None else 0,
        train_examples=len(data.x_train), batch_size=spec.batch_size,
        epochs_done=scalars.epochs_done, final=scalars.last,
        noise_summary=noise.summary() if noise is not None else None, diverged_at=scalars.diverged_at)


def finish_run(manifest: dict, *, run_dir: Path, writers: dict, status: str, start: float, steps: int,
               train_examples: int, batch_size: int, epochs_done: int, final: dict,
               noise_summary: dict | None = None, diverged_at: int | None = None) -> dict:
    """Close the run's writers, mark its end in TensorBoard and write the final manifest."""
    # A run whose event files could not be completely written is not finished, whatever
    # training did: marking it failed keeps a half-written log out of the report.
    log_errors = []
    for writer in writers.values():
        try:
            writer.flush()
            writer.close()
        except Exception as exc:  # noqa: BLE001 - recorded, and the run is marked failed
            log_errors.append(_one_line(exc))
    steps_per_epoch = math.ceil(train_examples / batch_size)
    full, partial = divmod(steps, steps_per_epoch)
    manifest.update({
        "status": status, "end_time": _now(), "wall_seconds": round(time.perf_counter() - start, 3),
        "steps": steps, "examples_seen": full * train_examples + partial * batch_size,
        "epochs_completed": epochs_done,
        "final": {k: (v if np.isfinite(v) else None) for k, v in final.items()},
    })
    if noise_summary is not None:
        manifest["gradient_noise"] = noise_summary
    if status == "diverged":
        manifest["diverged_at_step"] = diverged_at
    detail = {"diverged": f"non-finite loss by step {diverged_at}",
              "failed": manifest.get("error", "")}.get(status, "")
    try:
        write_run_status(run_dir, status, detail)
    except Exception as exc:  # noqa: BLE001 - as above
        log_errors.append(_one_line(exc))
    if log_errors and status != "interrupted":
        manifest["status"] = "failed"
        manifest.setdefault("error", "event files could not be written: " + log_errors[0])
    manifest["disk_error"] = any(e in manifest.get("error", "") for e in DISK_ERRORS)
    write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest
