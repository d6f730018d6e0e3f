"""The compiled engine: one run of any model `trainer.models.build_model` builds (the CNN of
document 000, the one-hot linear bottleneck of 002, MLPs with one-hot labels), trained with
many steps per call of one TensorFlow program instead of `model.fit`'s step-at-a-time loop.

What the fused engine (`trainer.packed`) cannot express trains here, in the same layout:
per-step losses at their exact global steps, epoch scalars in train/ and validation/, the
gradient-noise probe on `contract.noise.NoiseSchedule`'s schedule, `run.json` through
`trainer.manifest`, the data order of `trainer.packed._batches` (from seed and epoch alone).

- The model is the Keras model itself (its variables, initial weights and optimizer); its
  forward pass is re-expressed layer by layer as plain TensorFlow ops (`Program.forward`:
  Reshape, Conv2D, MaxPooling2D, BatchNormalization, Flatten, Dense, the loss from the
  logits, as Keras computes them). In graph mode Keras' layer calls cost as much as the
  arithmetic at batch 8.
- Adam updates each variable with TensorFlow's fused `ResourceApplyAdam` kernel (Keras'
  Adam formula, one pass over the variable and its moments instead of about ten); other
  optimizers use Keras' `apply`. Keras' Adam in graph mode was ≈2.8 ms a step at batch 8,
  most of `model.fit`'s 3–4 ms: the 692k weights of the CNN's dense layer and their moments
  are streamed through memory once per elementwise op.
- Models with a convolution run in a plain (non-XLA) `tf.function` with a `tf.while_loop`
  over the chunk: TensorFlow's oneDNN conv kernels are ≈10× faster than XLA's CPU convs
  here (conv backprop at batch 128: 3.2 vs 89 ms). Models without one are compiled with
  XLA (`jit_compile=True`), which fuses their small ops.
- `precision = "bfloat16"`: matmuls, convolutions and activations in bfloat16, weights,
  optimizer state, batch-norm statistics, loss and gradients in float32 (Keras'
  "mixed_bfloat16" policy, written out); bfloat16 reaches the CPU's bf16 units only
  outside XLA, so then every model runs without XLA.

Runs are trained one at a time: the documents' grids that need this engine vary the batch
size, so no two of their runs share a data order. A program is kept for the next run of
the same structure (new initial weights, the optimizer restarted), so its functions are
traced once per process.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract.layout import (COMPLETE, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, FAILED, INTERRUPTED, SPLITS, TRAIN,
                             VALIDATION)
from contract.noise import NoiseSchedule, roughness
from contract.spec import RunSpec
from trainer import events, faults, interrupt
from trainer.data import Dataset
from trainer.manifest import begin_run, finish_run, one_line
from trainer.models import build_model, make_optimizer, summarize

PRECISIONS = ("float32", "bfloat16")
# Validation rows per step of the validation pass: as many as keep the largest activation
# under this many values (a CNN: 256 rows), at most 4096.
EVAL_VALUES = 1 << 23
# At least this many examples per call of the training program (steps_per_execution is
# raised to reach it): each call costs ≈0.3 ms of Python and a write of its step losses.
MIN_CHUNK_EXAMPLES = 2048


def has_conv(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)


def uses_xla(model: keras.Model, precision: str) -> bool:
    """XLA for models without a convolution in float32 (see the module docstring)."""
    return precision == "float32" and not has_conv(model)


def structure_key(spec: RunSpec, input_shape: tuple[int, ...], classes: int, precision: str) -> tuple:
    """Runs with equal keys have the same variables and functions (they differ in
    initializer, batch size, epochs and seed)."""
    d = spec.to_dict()
    for name in ("initializer", "batch_size", "epochs", "seed"):
        del d[name]
    return tuple(sorted((k, repr(v)) for k, v in d.items())), tuple(input_shape), classes, precision


class Program:
    """A Keras model's training step, validation pass and gradient probe as TensorFlow
    functions over the model's own variables."""

    def __init__(self, model: keras.Model, spec: RunSpec, *, precision: str = "float32", key: tuple = ()):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
        self.key, self.precision, self.model = key, precision, model
        self.compute = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self.one_hot = spec.loss == "categorical_crossentropy"
        self.layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        last = self.layers[-1]
        if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
            raise ValueError("the compiled engine needs a model that ends in Dense(softmax)")
        # The tf.Variables under Keras' variables: what the functions read, differentiate and update.
        self.trainable = [v.value for v in model.trainable_variables]
        self.optimizer = make_optimizer(spec)
        self.optimizer.build(model.trainable_variables)
        self._optimizer_start = [v.numpy() for v in self.optimizer.variables]
        self._adam = self._adam_slots()
        self._adam_xla = None
        self.xla = uses_xla(model, precision)
        # Largest activation per example: sets the validation pass's rows per step.
        largest = max(int(np.prod(l.output.shape[1:])) for l in self.layers)
        self.eval_rows = int(min(4096, max(64, 2 ** math.floor(math.log2(max(1, EVAL_VALUES // largest))))))
        self._train = self._validate = self._probe = None
        self._trace_lock = threading.Lock()

    def load(self, model: keras.Model) -> None:
        """Start over with `model`'s initial weights (same structure) and the optimizer's
        starting state; the traced functions are kept."""
        for mine, theirs in zip(self.model.weights, model.weights):
            mine.assign(theirs)
        for variable, value in zip(self.optimizer.variables, self._optimizer_start):
            variable.assign(value)

    @property
    def steps(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # -- the model as TensorFlow ops --------------------------------------------------

    def forward(self, x, *, training: bool, update_statistics: bool = False):
        """float32 logits for the batch x, as the Keras model computes them (before its
        final softmax). Batch norm uses batch statistics when `training`, and only
        `update_statistics` moves its moving averages (the probe leaves them alone)."""
        h = tf.cast(x, self.compute)
        for layer in self.layers:
            if isinstance(layer, keras.layers.Reshape):
                h = tf.reshape(h, [-1, *layer.target_shape])
            elif isinstance(layer, keras.layers.Flatten):
                h = tf.reshape(h, [tf.shape(h)[0], -1])
            elif isinstance(layer, keras.layers.Conv2D) and layer.data_format == "channels_last" \
                    and layer.groups == 1:
                h = tf.nn.convolution(h, self._weight(layer.kernel), strides=layer.strides,
                                      padding=layer.padding.upper(), dilations=layer.dilation_rate)
                h = self._activate(layer, h)
            elif isinstance(layer, keras.layers.MaxPooling2D) and layer.data_format == "channels_last":
                h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
            elif isinstance(layer, keras.layers.Dense):
                h = tf.matmul(h, self._weight(layer.kernel))
                if layer is self.layers[-1]:
                    return tf.cast(h + self._weight(layer.bias), tf.float32) if layer.use_bias \
                        else tf.cast(h, tf.float32)
                h = self._activate(layer, h)
            elif isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (-1, len(h.shape) - 1) \
                    and not layer.renorm:
                h = self._batch_norm(layer, h, training, update_statistics)
            else:
                raise ValueError(f"the compiled engine has no translation of {type(layer).__name__}")
        raise AssertionError("unreachable: the last layer is Dense")

    def _weight(self, variable):
        return tf.cast(variable.value, self.compute)

    def _activate(self, layer, h):
        if layer.use_bias:
            h = h + self._weight(layer.bias)
        return layer.activation(h)

    def _batch_norm(self, layer, h, training, update_statistics):
        # As keras.layers.BatchNormalization: statistics and normalization in float32.
        h32 = tf.cast(h, tf.float32)
        if training:
            mean, variance = tf.nn.moments(h32, list(range(len(h.shape) - 1)))
            if update_statistics:
                m = layer.momentum
                layer.moving_mean.value.assign(layer.moving_mean.value * m + mean * (1.0 - m))
                layer.moving_variance.value.assign(layer.moving_variance.value * m + variance * (1.0 - m))
        else:
            mean, variance = layer.moving_mean.value, layer.moving_variance.value
        out = tf.nn.batch_normalization(h32, mean, variance, layer.beta.value if layer.center else None,
                                        layer.gamma.value if layer.scale else None, layer.epsilon)
        return tf.cast(out, self.compute)

    def losses(self, logits, y):
        """Per example: the cross-entropy from the logits (as Keras computes it from a
        softmax output) and 1.0 where the prediction is right."""
        if self.one_hot:
            ce = tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits)
            label = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            label = tf.cast(y, tf.int32)
        right = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), label), tf.float32)
        return ce, right

    # -- the optimizer ----------------------------------------------------------------

    def _adam_slots(self):
        """(momentums, velocities) per trainable variable when the optimizer is a plain
        Keras Adam (no amsgrad, clipping, weight decay, EMA or loss scaling), else None."""
        opt = self.optimizer
        plain = (type(opt) is keras.optimizers.Adam and not opt.amsgrad and opt.clipnorm is None
                 and opt.clipvalue is None and opt.global_clipnorm is None and not opt.use_ema
                 and opt.weight_decay is None and getattr(opt, "loss_scale_factor", None) is None
                 and getattr(opt, "gradient_accumulation_steps", None) is None)
        if not plain:
            return None
        try:
            variables = self.model.trainable_variables
            return ([opt._momentums[opt._get_variable_index(v)].value for v in variables],
                    [opt._velocities[opt._get_variable_index(v)].value for v in variables])
        except (AttributeError, KeyError, IndexError):  # another Keras: its own apply
            return None

    def apply(self, grads) -> None:
        """One optimizer update with `grads` (float32, in the order of `trainable`)."""
        if self._adam is None:
            self.optimizer.apply(grads, self.model.trainable_variables)
        elif self.xla:
            self._adam_update(grads)
        else:
            if self._adam_xla is None:
                self._adam_xla = tf.function(self._adam_update, jit_compile=True, autograph=False)
            self._adam_xla(grads)

    def _adam_update(self, grads) -> None:
        """keras.optimizers.Adam.update_step's arithmetic, op for op (so the numbers are
        Keras' to float32 rounding; TensorFlow's fused ResourceApplyAdam kernel rounds
        differently, ≈3e-5 apart after 20 steps of a CNN at lr 0.01), for every variable
        at once: under XLA one fused pass over each variable and its moments instead of
        ten separate elementwise ops."""
        opt = self.optimizer
        step = tf.cast(opt.iterations.value + 1, tf.float32)
        lr = tf.cast(opt.learning_rate, tf.float32)
        beta_1_power = tf.pow(tf.constant(opt.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(opt.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        for variable, m, v, g in zip(self.trainable, *self._adam, grads):
            m.assign_add((g - m) * (1 - opt.beta_1))
            v.assign_add((tf.square(g) - v) * (1 - opt.beta_2))
            variable.assign_sub((m * alpha) / (tf.sqrt(v) + opt.epsilon))
        opt.iterations.value.assign_add(1)

    # -- compiled functions -----------------------------------------------------------

    def _train_chunk(self, x_all, y_all, idx, n_steps):
        """`n_steps` training steps on the rows idx[i] (exact batches); the loss of each
        step, and per chunk the summed loss × examples and right answers."""
        batch = tf.cast(tf.shape(idx)[1], tf.float32)

        def step(i, losses, loss_sum, right_sum):
            x, y = tf.gather(x_all, idx[i]), tf.gather(y_all, idx[i])
            with tf.GradientTape() as tape:
                ce, right = self.losses(self.forward(x, training=True, update_statistics=True), y)
                loss = tf.reduce_mean(ce)
            self.apply(tape.gradient(loss, self.trainable))
            losses = tf.tensor_scatter_nd_update(losses, [[i]], loss[None])
            return i + 1, losses, loss_sum + loss * batch, right_sum + tf.reduce_sum(right)

        _, losses, loss_sum, right_sum = tf.while_loop(
            lambda i, *_: i < n_steps, step,
            (tf.constant(0), tf.zeros([tf.shape(idx)[0]]), tf.constant(0.0), tf.constant(0.0)))
        return losses, loss_sum, right_sum

    def _validate_fn(self, x_val, y_val, w_val):
        """Summed loss and right answers over the chunks x_val[c] (inference mode; w_val
        masks the padding rows)."""
        def chunk(c, loss_sum, right_sum):
            ce, right = self.losses(self.forward(x_val[c], training=False), y_val[c])
            return c + 1, loss_sum + tf.reduce_sum(ce * w_val[c]), right_sum + tf.reduce_sum(right * w_val[c])

        _, loss_sum, right_sum = tf.while_loop(lambda c, *_: c < tf.shape(x_val)[0], chunk,
                                               (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
        return loss_sum, right_sum

    def _gradient(self, x, y):
        """The gradient of the mean loss over (x, y) at the current weights, as a training
        step sees it (batch statistics), changing nothing."""
        with tf.GradientTape() as tape:
            ce, _ = self.losses(self.forward(x, training=True), y)
            loss = tf.reduce_mean(ce)
        return tape.gradient(loss, self.trainable)

    @staticmethod
    def _dot(a, b):
        """Dot product of two gradients in float64, from float32 row sums."""
        total = tf.constant(0.0, tf.float64)
        for ga, gb in zip(a, b):
            prod = ga * gb
            rows = tf.reduce_sum(prod, axis=-1) if prod.shape.rank > 1 else prod
            total += tf.reduce_sum(tf.cast(rows, tf.float64))
        return total

    def _probe_fn(self, xs, ys, x_one, y_one):
        """As `trainer.noise_probe.GradientProbe.measure`: mean |G_small|² over the k
        batches xs[i], |G_big|² of their mean, cosine(G of (x_one, y_one), G_big)."""
        k = tf.shape(xs)[0]

        def add(i, total, squares):
            g = self._gradient(xs[i], ys[i])
            return i + 1, [t + gi for t, gi in zip(total, g)], squares + self._dot(g, g)

        _, total, squares = tf.while_loop(
            lambda i, *_: i < k, add,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.trainable], tf.constant(0.0, tf.float64)))
        big = [t / tf.cast(k, t.dtype) for t in total]
        one = self._gradient(x_one, y_one)
        big_sq = self._dot(big, big)
        cosine = self._dot(one, big) / tf.sqrt(self._dot(one, one) * big_sq)
        return squares / tf.cast(k, tf.float64), big_sq, cosine

    def functions(self, t: "Tensors"):
        """(train, validate, probe), traced at the first call with batch sizes left open."""
        with self._trace_lock:
            if self._train is None:
                def open_spec(tensor, dims):
                    return tf.TensorSpec([None] * dims + tensor.shape[dims:].as_list(), tensor.dtype)

                # autograph=False: the loops are tf.while_loop already.
                self._train = tf.function(
                    self._train_chunk, jit_compile=self.xla, autograph=False,
                    input_signature=[open_spec(t.x, 1), open_spec(t.y, 1), tf.TensorSpec([None, None], tf.int32),
                                     tf.TensorSpec([], tf.int32)])
                self._validate = tf.function(
                    self._validate_fn, jit_compile=self.xla, autograph=False,
                    input_signature=[open_spec(t.x_val, 2), open_spec(t.y_val, 2), tf.TensorSpec([None, None])])
                # The probe runs ≈10 times an epoch: not worth an XLA compile.
                self._probe = tf.function(
                    self._probe_fn, autograph=False,
                    input_signature=[open_spec(t.x[None], 2), open_spec(t.y[None], 2),
                                     open_spec(t.x, 1), open_spec(t.y, 1)])
            return self._train, self._validate, self._probe

    def train(self, t: "Tensors", idx: np.ndarray, steps: int) -> tuple[np.ndarray, float, float]:
        """`steps` steps on the batches idx[:steps] (rows of the training set); the step
        losses [steps], the summed loss × examples and the right answers."""
        train, _, _ = self.functions(t)
        losses, loss_sum, right_sum = train(t.x, t.y, idx, tf.constant(steps, tf.int32))
        return losses.numpy()[:steps], float(loss_sum), float(right_sum)

    def validate(self, t: "Tensors") -> tuple[float, float]:
        """(validation loss, validation accuracy)."""
        _, validate, _ = self.functions(t)
        loss_sum, right_sum = validate(t.x_val, t.y_val, t.w_val)
        return float(loss_sum) / t.n_val, float(right_sum) / t.n_val

    def probe(self, t: "Tensors", rows: np.ndarray, one: np.ndarray) -> tuple[float, float, float]:
        _, _, probe = self.functions(t)
        out = probe(tf.gather(t.x, rows), tf.gather(t.y, rows), tf.gather(t.x, one), tf.gather(t.y, one))
        return tuple(float(v) for v in out)


class Tensors:
    """A dataset as the programs read it: the training set whole, the validation set in
    zero-padded chunks of `rows` with a mask; labels one-hot for a one-hot loss."""

    def __init__(self, data: Dataset, *, one_hot: bool, rows: int):
        classes = int(data.y_train.max()) + 1
        self.data, self.one_hot, self.rows = data, one_hot, rows

        def labels(y):
            return np.eye(classes, dtype=np.float32)[y] if one_hot else y.astype(np.int32)

        self.x, self.y = tf.constant(data.x_train), tf.constant(labels(data.y_train))
        n = self.n_val = len(data.x_val)
        size = min(rows, n)
        chunks = math.ceil(n / size)
        x_val = np.zeros((chunks * size,) + data.x_val.shape[1:], np.float32)
        x_val[:n] = data.x_val
        y_val = np.zeros((chunks * size,) + labels(data.y_val).shape[1:], labels(data.y_val).dtype)
        y_val[:n] = labels(data.y_val)
        self.x_val = tf.constant(x_val.reshape((chunks, size) + x_val.shape[1:]))
        self.y_val = tf.constant(y_val.reshape((chunks, size) + y_val.shape[1:]))
        self.w_val = tf.constant((np.arange(chunks * size) < n).astype(np.float32).reshape(chunks, size))


_TENSORS: dict[tuple, Tensors] = {}
_PROGRAMS: dict[tuple, Program] = {}  # one free program per structure
_LOCK = threading.Lock()


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


def build(spec: RunSpec, data: Dataset, precision: str = "float32") -> tuple[Program, keras.Model]:
    """The program for `spec` with its initial weights (a released one of the same
    structure, loaded, if there is one) and the Keras model they came from."""
    input_shape, classes = data.x_train.shape[1:], int(data.y_train.max()) + 1
    keras.utils.set_random_seed(spec.seed)
    model = build_model(spec, input_shape=input_shape, classes=classes)
    key = structure_key(spec, input_shape, classes, precision)
    with _LOCK:
        program = _PROGRAMS.pop(key, None)
    if program is None:
        return Program(model, spec, precision=precision, key=key), model
    program.load(model)
    return program, model


def release(program: Program) -> None:
    with _LOCK:
        _PROGRAMS[program.key] = program


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """An epoch's batches as row indices, the last one partial: the fused engine's order
    (`trainer.packed._batches`: a permutation from (seed, epoch) alone)."""
    from trainer.packed import _batches

    idx, counts = _batches(n, batch, seed, epoch)
    return [rows[:count] for rows, count in zip(idx, counts)]


def train_run(experiment, spec: RunSpec, data: Dataset, run_dir: Path, *, precision: str | None = None) -> dict:
    """Train `spec` from scratch into `run_dir` and return its final manifest. A
    KeyboardInterrupt marks the run interrupted and propagates."""
    precision = precision or getattr(experiment, "precision", "float32")
    manifest = begin_run(experiment, spec, data, run_dir)
    manifest.setdefault("precision", precision)
    writers = {s: tf.summary.create_file_writer(str(run_dir / s)) for s in SPLITS}
    state = {"epochs": 0, "final": {}, "diverged_at": None, "steps": 0}
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
        return finish_run(
            manifest, run_dir=run_dir, writers=writers, status=status, start=start,
            steps=state["diverged_at"] or state["steps"], train_examples=len(data.x_train),
            batch_size=spec.batch_size, epochs_done=state["epochs"],
            final={"loss": math.nan} if status == DIVERGED else state["final"],
            noise_summary=noise.summary() if noise is not None else None, diverged_at=state["diverged_at"])

    try:
        program, model = build(spec, data, precision)
        manifest["model"] = summarize(model)
        manifest["precision"] = precision
        manifest["compiled"] = {"xla": program.xla, "optimizer": "adam (fused)" if program._adam else "keras"}
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
                    (values,) = noise.record(steps_done, *([v] for v in program.probe(t, *plan)))
                    writer.add(0, TRAIN, values, steps_done)
            if bad.size or not last:  # else written with the epoch's scalars below
                writer.write(losses[:, None], first_step, np.array([written]))
                faults.point("step")
                interrupt.check()
            if bad.size:
                writer.drain()
                return
            s += n
        val_loss, val_accuracy = program.validate(t)
        state["epochs"] = epoch + 1
        state["final"] = final = {"loss": loss_sum / n_train, "accuracy": right_sum / n_train,
                                  "val_loss": val_loss, "val_accuracy": val_accuracy}
        # As trainer.fit.EpochScalars: epoch_* in train/ and validation/ at the epoch index.
        writer.add(0, TRAIN, {EPOCH_LOSS: final["loss"], EPOCH_ACCURACY: final["accuracy"]}, epoch)
        writer.add(0, VALIDATION, {EPOCH_LOSS: val_loss, EPOCH_ACCURACY: val_accuracy}, epoch)
        if noise is not None:
            writer.add(0, TRAIN, noise.epoch_values(0, roughness(np.concatenate(epoch_losses))), epoch)
        writer.write(losses[:, None], first_step, np.array([n]))
        writer.drain()
        faults.point("step")
        for split in SPLITS:
            faults.point("flush")
            writers[split].flush()
        interrupt.check()
