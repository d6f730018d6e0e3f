"""Which compiled program trains a run: built, or a released one of the same structure
loaded with the run's initial weights (its functions are traced once per process), with
its thread count (`trainer.compiled_model`'s docstring says why); and the dataset as the
programs read it."""
from __future__ import annotations

import math
import os
import threading

import keras
import numpy as np
import tensorflow as tf

from contract.spec import RunSpec
from trainer.compiled_model import Program, update_kind, has_conv, uses_xla
from trainer.data import Dataset
from trainer.models import build_model, make_optimizer

# Training steps under this many FLOPs (3 × forward × batch) run on one thread.
SMALL_STEP_FLOPS = 2e8


def forward_flops(model: keras.Model) -> int:
    """Multiply-adds × 2 of one example's forward pass through the Dense and Conv2D layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Conv2D):
            total += 2 * int(np.prod(layer.kernel.shape)) * int(np.prod(layer.output.shape[1:3]))
    return total


def session_threads(model: keras.Model, batch_size: int) -> int | None:
    """The thread count of the program's own session: 1 for steps under SMALL_STEP_FLOPS
    (the CNN at batch 8 and 32), else the CPU count; None: no session of its own (no
    convolution: XLA in the process's pools). Small ops do not scale across threads, and
    on a shared machine they lose badly when the second thread waits for a core: the CNN
    at batch 8 took 1.1 ms a step on one thread, 2.1 ms on two (load ≈3.5 from others on
    2 cores); at batch 128 two threads were faster (4.6–5.0 vs 6.7–6.9 ms, load ≈2.3).
    The process-wide pools are fixed before training starts and cannot change."""
    if not has_conv(model):
        return None
    return 1 if 3 * forward_flops(model) * batch_size < SMALL_STEP_FLOPS else (os.cpu_count() or 1)


def structure_key(spec: RunSpec, input_shape: tuple[int, ...], classes: int, precision: str,
                  threads: int | None = None) -> tuple:
    """Runs with equal keys have the same variables and functions (they differ in
    initializer, batch size, epochs and seed)."""
    d = spec.to_dict()
    for name in ("initializer", "batch_size", "epochs", "seed"):
        del d[name]
    return tuple(sorted((k, repr(v)) for k, v in d.items())), tuple(input_shape), classes, precision, threads


class Tensors:
    """A dataset as the programs read it: the training set whole, the validation set in
    zero-padded chunks of `rows` with a mask; labels one-hot for a one-hot loss. `arrays`
    (numpy) for a program's own session, the same as tensors (made at first use) for the
    others."""

    def __init__(self, data: Dataset, *, one_hot: bool, rows: int):
        classes = int(data.y_train.max()) + 1
        self.data, self.one_hot, self.rows = data, one_hot, rows

        def labels(y):
            return np.eye(classes, dtype=np.float32)[y] if one_hot else y.astype(np.int32)

        n = self.n_val = len(data.x_val)
        size = min(rows, n)
        chunks = math.ceil(n / size)
        x_val = np.zeros((chunks * size,) + data.x_val.shape[1:], np.float32)
        x_val[:n] = data.x_val
        y_val = np.zeros((chunks * size,) + labels(data.y_val).shape[1:], labels(data.y_val).dtype)
        y_val[:n] = labels(data.y_val)
        self.arrays = {"x": data.x_train, "y": labels(data.y_train),
                       "x_val": x_val.reshape((chunks, size) + x_val.shape[1:]),
                       "y_val": y_val.reshape((chunks, size) + y_val.shape[1:]),
                       "w_val": (np.arange(chunks * size) < n).astype(np.float32).reshape(chunks, size)}
        self._tensors: dict = {}

    def __getattr__(self, name):
        if name in ("x", "y", "x_val", "y_val", "w_val"):
            if name not in self._tensors:
                self._tensors[name] = tf.constant(self.arrays[name])
            return self._tensors[name]
        raise AttributeError(name)


_TENSORS: dict[tuple, Tensors] = {}
_PROGRAMS: dict[tuple, Program] = {}  # one free program per structure
_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()


def tensors(data: Dataset, one_hot: bool, rows: int) -> Tensors:
    """The dataset's tensors, made once per dataset, label kind and chunk size."""
    key = (id(data), one_hot, rows)
    with _LOCK:
        entry = _TENSORS.get(key)
        if entry is None or entry.data is not data:
            for k in [k for k, v in _TENSORS.items() if v.data is not data]:
                del _TENSORS[k]
            entry = _TENSORS[key] = Tensors(data, one_hot=one_hot, rows=rows)
        return entry


def build(spec: RunSpec, data: Dataset, precision: str = "float32",
          max_threads: int | None = None) -> tuple[Program, keras.Model]:
    """The program for `spec` with its initial weights (a released one of the same
    structure, loaded, if there is one) and the Keras model they came from. `max_threads`:
    at most that many threads in a session of its own (the run shares the machine)."""
    input_shape, classes = data.x_train.shape[1:], int(data.y_train.max()) + 1
    # set_random_seed sets the process's Python, NumPy and TensorFlow seeds: runs built in
    # two threads at once hold this lock from setting it until their model is built.
    with _BUILD_LOCK:
        keras.utils.set_random_seed(spec.seed)
        model = build_model(spec, input_shape=input_shape, classes=classes)
    threads = session_threads(model, spec.batch_size)
    if threads is not None and max_threads is not None:
        threads = max(1, min(threads, max_threads))
    key = structure_key(spec, input_shape, classes, precision, threads)
    with _LOCK:
        program = _PROGRAMS.pop(key, None)
    if program is None:
        return Program(model, spec, precision=precision, key=key, threads=threads), model
    program.load(model)
    return program, model


def own_threads(spec: RunSpec, data: Dataset, precision: str = "float32") -> int | None:
    """The threads of the session of its own that `spec`'s program trains in (it can then
    share the machine with other such runs), or None: in the process's thread pools (XLA,
    or Keras' own optimizer `apply`), which it should have to itself."""
    with _BUILD_LOCK:
        model = build_model(spec, input_shape=data.x_train.shape[1:], classes=int(data.y_train.max()) + 1)
    if uses_xla(model, precision) or update_kind(make_optimizer(spec)) == "keras":
        return None
    return session_threads(model, spec.batch_size)


def release(program: Program) -> None:
    with _LOCK:
        _PROGRAMS[program.key] = program
