"""`LabLogger`: a Keras callback that logs a user's own `model.fit` in the layout our
trainer writes (`contract.layout`), so `python -m report --logdir …` reports it.

The exact loss of every step comes from inside the training step (`tblab.capture`);
the run's files are written with the trainer's own functions (`trainer.manifest`,
`trainer.events`, `trainer.lock`), so a run logged here and one trained by
`python -m trainer` differ only in what decided their numbers.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract import files
from contract.layout import (COMPARISON_MANIFEST_KEY, COMPLETE, DIVERGED, FAILED, INTERRUPTED, RUN_MANIFEST,
                             RUNNING, SPLITS, TEMPLATES, TRAIN, VALIDATION)
from contract.noise import NoiseSchedule, check_examples, roughness
from contract.spec import PER_EXAMPLE, NoiseSettings
from tblab import infer
from tblab.capture import StepCapture
from tblab.experiment import WRITER, record_run
from tblab.scalars import split_logs, write_step_losses
from trainer import events
from trainer.lock import describe_owner, try_lock
from trainer.manifest import finish_run, hardware, library_versions, one_line, pack_entry
from trainer.models import summarize

# Runs this process is logging, (experiment folder, run name) → logger: a run whose fit
# ended in an exception the callback never saw is closed as interrupted when the same
# run starts again in the same thread, or when Python exits.
_ACTIVE: dict[tuple[str, str], LabLogger] = {}
_ENDED_UNSEEN = "its fit ended without the callback seeing the end (an exception outside the training steps?)"


@atexit.register
def _close_all() -> None:
    for logger in list(_ACTIVE.values()):
        logger._finish(INTERRUPTED, error="Python exited while the run was being logged")


def _hook(method):
    """A callback method whose exceptions end the run as failed before they propagate."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            self._abort(exc)
            raise
    return wrapper


def _noise_settings(gradient_noise) -> NoiseSettings | None:
    if gradient_noise is True:
        return NoiseSettings()
    if isinstance(gradient_noise, dict):
        gradient_noise = NoiseSettings(**gradient_noise)
    if isinstance(gradient_noise, NoiseSettings):
        if gradient_noise.enabled and gradient_noise.estimator == PER_EXAMPLE:
            raise ValueError('LabLogger measures gradient noise with the probe: give estimator "probe" or '
                             '"auto", not "per_example" (the trainer\'s fused engine only)')
        return gradient_noise if gradient_noise.enabled else None
    if gradient_noise:
        raise TypeError(f"LabLogger(gradient_noise={gradient_noise!r}): give True, False, a dict of "
                        "NoiseSettings fields or a contract.spec.NoiseSettings")
    return None


class LabLogger(keras.callbacks.Callback):
    """Logs one `model.fit` as one run of the experiment in `logdir`.

    logdir: the experiment's folder (logs/myexp); the run goes to logdir/<run name>/.
    initializer … epochs, seed: the run's factors (contract.spec.RunSpec fields). Those
        given name the run, as the trainer names grid runs ("init=glorot_normal,bs=64,
        bn=on,seed=0": the given fields in the lab grid's order, the seed last; with none
        given, initializer, batch size and batch norm). Fields not given are read from the
        model (architecture, hidden widths, activation, initializer, batch norm), its
        compile settings (optimizer, learning rate, loss), fit (epochs, batch size: the
        first batch's) and keras.utils.set_random_seed (seed); else RunSpec's defaults.
        The seed is a label: set it yourself before building the model.
    name: the run's folder name instead.
    dataset: a name ("fashion_mnist") or a dict merged over what is measured (train and
        validation example counts, input shape, classes), e.g. {"image_shape": [28, 28]}.
    gradient_noise: True (default settings), a dict or NoiseSettings: measure the gradient
        noise scale as the trainer does; needs probe_data=(x, y), your training arrays
        (the probe draws its batches from them, and its schedule counts len(x) examples
        an epoch).
    title, author, student_id, objective, template: experiment.json's title block.
    verbose: 1 prints a line when the run starts and ends; 0 nothing.
    """

    def __init__(self, logdir, *, initializer=None, batch_size=None, batch_norm=None, seed=None,
                 architecture=None, hidden=None, activation=None, optimizer=None, learning_rate=None,
                 loss=None, epochs=None, name: str | None = None, dataset: str | dict | None = None,
                 gradient_noise=False, probe_data=None, title=None, author=None, student_id=None,
                 objective=None, template=None, verbose: int = 1):
        super().__init__()
        given = dict(initializer=initializer, batch_size=batch_size, batch_norm=batch_norm, seed=seed,
                     architecture=architecture, hidden=hidden, activation=activation, optimizer=optimizer,
                     learning_rate=learning_rate, loss=loss, epochs=epochs)
        self.given = {k: infer.normalize(k, v) for k, v in given.items() if v is not None}
        self.exp_dir = Path(logdir)
        if not self.exp_dir.name:
            raise ValueError(f"LabLogger({logdir!r}): give the experiment's folder, e.g. logs/myexp")
        if name is not None and (not name or "/" in name or name.startswith(".")):
            raise ValueError(f"LabLogger(name={name!r}): a folder name, not empty, without '/', not starting with '.'")
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"LabLogger(template={template!r}): valid templates: {', '.join(TEMPLATES)}")
        self.run = name
        self.dataset = {"name": dataset} if isinstance(dataset, str) else dict(dataset or {})
        self.meta = {"title": title, "author": author, "id": student_id, "objective": objective, "template": template}
        self.noise = _noise_settings(gradient_noise)
        self.probe_data = None
        if self.noise is not None:
            if probe_data is None:
                raise ValueError("LabLogger(gradient_noise=…) needs probe_data=(x_train, y_train): the training "
                                 "arrays the probe draws its batches from")
            x, y = (np.asarray(a) for a in probe_data)
            check_examples(self.noise, len(x))
            self.probe_data = (x, y)
        self.verbose = verbose
        self.status: str | None = None  # None until the run starts; RUNNING; then how it ended
        self.manifest: dict | None = None
        self.run_dir: Path | None = None
        self._capture = None
        self._lock = None

    def _restore(self) -> None:
        if self._capture is not None:
            self._capture.restore()

    # -- Keras' callback methods ---------------------------------------------------------------

    @_hook
    def on_train_begin(self, logs=None):
        if self.status is not None:
            raise RuntimeError(f"this LabLogger already logged run {self.run} ({self.status}); make a new "
                               "LabLogger (and a new model) for each fit")
        self._t0 = time.perf_counter()
        self._step, self._pending, self._samples = 0, [], 0
        self._first_epoch, self._epochs_done, self._last = None, 0, {}
        self._train_examples = self._val_examples = None
        self._batch_size = self._diverged_at = None
        self._initial_steps = int(self.model.optimizer.iterations.numpy())
        self._capture = StepCapture(self.model, self._abort)
        if "batch_size" in self.given:
            self._begin(self.given["batch_size"])

    @_hook
    def on_train_batch_end(self, batch, logs=None):
        steps = self._capture.new_steps()
        if not steps:
            if self.status is None:
                raise RuntimeError("LabLogger: the model's train step never called compute_loss, so the loss of "
                                   "each step is not known; use Keras' train_step or call self.compute_loss in yours")
            return
        if self.status is None:
            self._begin(steps[0][1])
        if self._step == 0 and "batch_size" in self.given and steps[0][1] != self.given["batch_size"]:
            warnings.warn(f"LabLogger: batch_size={self.given['batch_size']} was given, but fit's first batch "
                          f"has {steps[0][1]} examples", stacklevel=2)
        for loss, size in steps:
            self._step += 1
            self._pending.append((self._step, loss))
            self._epoch_losses.append(loss)
            self._samples += size
            self._epoch_samples += size
            if not math.isfinite(loss) and self._diverged_at is None:
                self._diverged_at = self._step
                self.model.stop_training = True
        self._measure(epoch_end=False)

    @_hook
    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
        self._epoch_losses, self._epoch_samples, self._epoch_first_step = [], 0, self._step

    @_hook
    def on_test_begin(self, logs=None):
        if self._capture is not None:  # not an evaluate() outside fit
            self._capture.reset_validation()

    @_hook
    def on_test_end(self, logs=None):
        if self._capture is not None and self._val_examples is None:
            self._val_examples = self._capture.validation_examples()

    @_hook
    def on_epoch_end(self, epoch, logs=None):
        if self.status != RUNNING:
            return
        index = epoch - self._first_epoch
        logs = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        steps = self._step - self._epoch_first_step
        full = steps == self.params.get("steps") if self.params.get("steps") else self._diverged_at is None
        if self._train_examples is None and full:
            self._train_examples = self._epoch_samples
            if self._schedule is not None and self._schedule.examples != self._train_examples:
                warnings.warn(f"LabLogger: probe_data has {self._schedule.examples} examples, fit's epochs "
                              f"{self._train_examples}; the gradient-noise schedule counts "
                              f"{self._schedule.examples} an epoch. Give the training arrays as probe_data",
                              stacklevel=2)
        for split in SPLITS:
            events.write_scalars(self._writers[split], events.with_comparisons(
                split_logs(logs, validation=split == VALIDATION), self.spec), index)
        self._flush_steps()
        self._measure(epoch_end=True)
        if self._schedule is not None:
            rough = roughness(np.array(self._epoch_losses))
            events.write_scalars(self._writers[TRAIN], self._schedule.epoch_values(0, rough), index)
        for writer in self._writers.values():
            writer.flush()
        self._epochs_done, self._last = index + 1, logs
        if not math.isfinite(logs.get("loss", 0.0)) and self._diverged_at is None:
            self._diverged_at = self._step
            self.model.stop_training = True

    @_hook
    def on_train_end(self, logs=None):
        if self.status == RUNNING:
            self._finish(DIVERGED if self._diverged_at is not None else COMPLETE)
        self._restore()

    # -- with LabLogger(...) as lab: model.fit(..., callbacks=[lab]) ---------------------------

    def __enter__(self) -> LabLogger:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self.status == RUNNING:
            if kind is None or issubclass(kind, (KeyboardInterrupt, SystemExit)):
                self._finish(INTERRUPTED, error=_ENDED_UNSEEN if kind is None else None)
            else:
                self._finish(FAILED, error=one_line(exc), trace="".join(traceback.format_exception(exc)))
        self._restore()
        return False

    # -- the run: begin, log, finish ---------------------------------------------------------------

    def _begin(self, batch_size: int) -> None:
        read = {**infer.from_model(self.model, self.params), "batch_size": batch_size, "seed": infer.keras_seed()}
        spec, source, problems = infer.build_spec(self.given, read)
        for problem in problems:
            warnings.warn(problem, stacklevel=3)
        self.spec, self._batch_size = spec, spec.batch_size
        self.axes = infer.name_axes(self.given)
        self.run = self.run or infer.run_name(spec, self.axes)
        self._writers, self._schedule, self._probe = {}, None, None
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        key = (str(self.exp_dir.resolve()), self.run)
        earlier = _ACTIVE.get(key)
        if earlier is not None and earlier is not self and earlier._thread == threading.get_ident():
            earlier._finish(INTERRUPTED, error=_ENDED_UNSEEN)
        held = try_lock(self.exp_dir, self.run)
        if isinstance(held, dict):
            raise RuntimeError(f"LabLogger: run {self.run} in {self.exp_dir} is being logged by "
                               f"{describe_owner(held)}; log this one under another name= or seed")
        self._lock, self._thread = held, threading.get_ident()
        try:
            self.run_dir = self.exp_dir / self.run
            before = files.read_json_dict(self.run_dir / RUN_MANIFEST)
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)  # TensorBoard must never see two copies of a step
            self.run_dir.mkdir(parents=True)
            self.manifest = self._manifest(source)
            files.write_json_atomic(self.run_dir / RUN_MANIFEST, self.manifest)
            self.status = RUNNING
            _ACTIVE[key] = self
            events.write_run_hparams(self.run_dir, spec, trial_id=self.run, layout=True)
            self._writers = {s: tf.summary.create_file_writer(str(self.run_dir / s)) for s in SPLITS}
            if self.noise is not None:
                from trainer.noise_probe import GradientProbe

                self._schedule = NoiseSchedule(self.noise, examples=len(self.probe_data[0]),
                                               batch_size=spec.batch_size, seed=spec.seed)
                self._probe = GradientProbe(self.model, self.model.loss)
            self._record()
        except BaseException:
            if self.status != RUNNING:
                self._release()
            raise
        if self.verbose:
            replaced = f" (replacing an earlier {before.get('status')} run)" if before else ""
            print(f"LabLogger: logging {self.run} to {self.run_dir}{replaced}", flush=True)

    def _manifest(self, source: dict) -> dict:
        model = self.model
        try:
            summary = summarize(model)
        except Exception:  # noqa: BLE001 - a layer without a known output shape: counts only
            summary = {"layers": [], "trainable_params": int(model.count_params()),
                       "total_params": int(model.count_params())}
        manifest = {
            "experiment": self.exp_dir.name, "run": self.run, "config": {}, "spec": self.spec.to_dict(),
            "seed": self.spec.seed, "status": RUNNING, "start_time": _now(), "end_time": None,
            "wall_seconds": None, "pack": pack_entry([self.run], 0), "steps": 0, "examples_seen": 0,
            "epochs_completed": 0, "final": {}, "dataset": self._dataset(), "engine": "keras",
            "precision": _precision(model), COMPARISON_MANIFEST_KEY: True,
            "steps_per_execution": int(getattr(model, "steps_per_execution", 1) or 1),
            "versions": library_versions(), "hardware": hardware(),
            "worker": {"pid": os.getpid(), "host": socket.gethostname()}, "model": summary,
            "logged_by": WRITER, "spec_source": source,
        }
        if self._initial_steps:
            manifest["initial_steps"] = self._initial_steps
            warnings.warn(f"LabLogger: the model had already taken {self._initial_steps} optimizer steps; run "
                          f"{self.run} is logged from its current weights, as steps 1…", stacklevel=4)
        manifest["config"] = self._config(manifest["dataset"])
        return manifest

    def _config(self, dataset: dict) -> dict:
        """What decides the run's numbers, as the trainer's run.json "config" has it."""
        return {"spec": self.spec.to_dict(), "dataset": dataset.get("name"), "validation": dataset.get("validation"),
                "limit": None, "train_examples": dataset.get("train_examples"),
                "validation_examples": dataset.get("validation_examples"),
                "gradient_noise": {k: v for k, v in (self.noise or NoiseSettings(enabled=False)).to_dict().items()
                                   if k != "estimator"}, "engine": "keras"}  # the probe, as the trainer records it

    def _dataset(self) -> dict:
        """The data as measured (counts once an epoch, or a validation pass, is over), with the
        user's description over it."""
        d = {"name": "custom", "source": "the data given to model.fit",
             "train_examples": self._train_examples, "validation_examples": self._val_examples}
        if self._val_examples is not None:
            d["validation"] = "fit's validation data" if self._val_examples else "none"
        try:
            shape = [None if s is None else int(s) for s in self.model.input_shape[1:]]
            d["input_shape"] = shape
            if len(shape) in (2, 3):  # (H, W) or (H, W, C): an image
                d["image_shape"] = shape[:2]
            classes = self.model.output_shape[-1]
            if isinstance(classes, int):
                d["classes"] = classes
        except (AttributeError, TypeError, ValueError, IndexError):
            pass
        return {**d, **self.dataset}

    def _record(self) -> None:
        record_run(self.exp_dir, self.run, self.spec, axes=self.axes, dataset=self._dataset(), meta=self.meta,
                   noise=self.noise or NoiseSettings(enabled=False))

    def _measure(self, epoch_end: bool) -> None:
        """A gradient-noise measurement if the schedule has one due at this step."""
        if self.status != RUNNING or self._schedule is None:
            return
        plan = self._schedule.plan(self._step, epoch_end)
        if plan is None:
            return
        (rows, one), s, (x, y) = plan, self.noise, self.probe_data
        xs = x[rows.ravel()].reshape((s.batches, s.small_batch) + x.shape[1:])
        ys = y[rows.ravel()].reshape((s.batches, s.small_batch) + y.shape[1:])
        # `one`: a batch of the run's size for the cosine (None where the schedule takes none).
        x_one, y_one = (x[one], y[one]) if one is not None else (None, None)
        quiet = tf.get_logger()  # each run's probe is traced anew: no retracing warning for it
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            small_sq, big_sq, cosine = self._probe.measure(xs, ys, x_one, y_one)
        finally:
            quiet.setLevel(level)
        (values,) = self._schedule.record(self._step, [small_sq], [big_sq], [cosine])
        events.write_scalars(self._writers[TRAIN], values, self._step)

    def _flush_steps(self) -> None:
        pending = [(s, v) for s, v in self._pending if events.loggable(v)]
        self._pending = []
        if pending:
            steps, values = zip(*pending)
            write_step_losses(self._writers[TRAIN], values, steps)

    def _abort(self, exc: BaseException) -> None:
        if self.status == RUNNING:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self._finish(INTERRUPTED)
            else:
                self._finish(FAILED, error=one_line(exc), trace="".join(traceback.format_exception(exc)))
        self._restore()

    def _finish(self, status: str, *, error: str | None = None, trace: str | None = None) -> None:
        """Write the run's last step losses and its final run.json (trainer.manifest.finish_run)."""
        if self.status != RUNNING:
            return
        self.status = status  # first: whatever fails below, this run is not finished twice
        try:
            try:
                self._flush_steps()
            except Exception as exc:  # noqa: BLE001 - recorded; the run is failed
                status, error = FAILED, error or f"step losses could not be written: {one_line(exc)}"
            manifest = self.manifest
            if error:
                manifest["error"] = error
            if trace:
                manifest["traceback"] = trace
            manifest["dataset"] = self._dataset()
            manifest["config"] = self._config(manifest["dataset"])
            self.manifest = finish_run(
                manifest, run_dir=self.run_dir, writers=self._writers, status=status, start=self._t0,
                steps=self._step, train_examples=self._train_examples or max(self._samples, 1),
                batch_size=self._batch_size, epochs_done=self._epochs_done, final=self._last,
                noise_summary=self._schedule.summary() if self._schedule is not None else None,
                diverged_at=self._diverged_at)
            self.status = self.manifest["status"]
            self._record()
        finally:
            self._release()
            self._restore()
        if self.verbose:
            final = " ".join(f"{k}={v:.4f}" for k, v in self._last.items() if isinstance(v, float))
            print(f"LabLogger: {self.run} {self.status} after {self._step} steps, {self._epochs_done} epochs "
                  f"{final}".rstrip(), flush=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        key = (str(self.exp_dir.resolve()), self.run)
        if _ACTIVE.get(key) is self:
            del _ACTIVE[key]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _precision(model) -> str:
    """The model's compute dtype ("float32", "bfloat16" under Keras' mixed_bfloat16, …)."""
    policy = getattr(model, "dtype_policy", None) or keras.mixed_precision.global_policy()
    return str(getattr(policy, "compute_dtype", None) or "float32")
