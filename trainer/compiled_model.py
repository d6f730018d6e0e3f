"""The compiled engine's model: a Keras model (`trainer.models.build_model`: the CNN of
document 000, the one-hot linear bottleneck of 002, MLPs) with compiled functions for a
chunk of training steps, the validation pass and the gradient probe, over the model's own
variables. The step loop around it is `trainer.compiled`.

- The forward pass is re-expressed layer by layer as plain TensorFlow ops (`Program.forward`:
  Reshape, Conv2D, MaxPooling2D, BatchNormalization, Flatten, Dense, and the loss from the
  logits, as Keras computes them): in graph mode Keras' layer calls cost as much as the
  arithmetic at batch 8. The initial weights and the optimizer are Keras' own.
- Adam: Keras' `update_step` arithmetic op for op, for all variables in one XLA cluster
  (one fused pass over each variable and its moments). Keras' Adam in graph mode, ten
  separate elementwise ops a variable, was ≈2.8 ms a step at batch 8, most of
  `model.fit`'s 3–4 ms: the CNN's 692k dense weights and their moments streamed through
  memory once per op. TensorFlow's own fused ResourceApplyAdam rounds differently (≈3e-5
  apart from Keras after 20 CNN steps at lr 0.01), so it is not used. Other optimizers:
  Keras' `apply`.
- Models with a convolution run in a plain (non-XLA) `tf.function` with a `tf.while_loop`
  over the chunk: TensorFlow's oneDNN conv kernels are ≈10× faster than XLA's CPU convs
  here (conv backprop at batch 128: 3.2 vs 89 ms). Models without one are compiled with
  XLA (`jit_compile=True`), which fuses their small ops.
- Mixed bfloat16 (`[execution] precision = "bfloat16"`): matmuls, convolutions and
  activations in bfloat16; weights, optimizer state, batch-norm statistics, loss and
  gradients in float32 (Keras' "mixed_bfloat16" policy, written out). Only outside XLA
  does bfloat16 reach the CPU's bf16 instructions (oneDNN), so then no model uses XLA.
"""
from __future__ import annotations

import math
import threading

import keras
import numpy as np
import tensorflow as tf

from contract.spec import RunSpec
from trainer.data import Dataset
from trainer.models import build_model, make_optimizer
from trainer.spec import PRECISIONS

# Validation rows per step of the validation pass: as many as keep the largest activation
# under this many values (a CNN: 256 rows), at most 4096.
EVAL_VALUES = 1 << 23


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
                h = tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])
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
        batches xs[i], |G_big|² of their mean, cosine(G of (x_one, y_one), G_big) (NaN
        when x_one has no rows)."""
        k = tf.shape(xs)[0]

        def add(i, total, squares):
            g = self._gradient(xs[i], ys[i])
            return i + 1, [t + gi for t, gi in zip(total, g)], squares + self._dot(g, g)

        _, total, squares = tf.while_loop(
            lambda i, *_: i < k, add,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.trainable], tf.constant(0.0, tf.float64)))
        big = [t / tf.cast(k, t.dtype) for t in total]
        big_sq = self._dot(big, big)

        def cosine():
            one = self._gradient(x_one, y_one)
            return self._dot(one, big) / tf.sqrt(self._dot(one, one) * big_sq)

        # No rows for the cosine (the schedule asks for it at epoch ends only): NaN, and
        # that batch's gradient is not taken.
        cosine = tf.cond(tf.shape(x_one)[0] > 0, cosine, lambda: tf.constant(math.nan, tf.float64))
        return squares / tf.cast(k, tf.float64), big_sq, cosine

    def functions(self, t: Tensors):
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

    def train(self, t: Tensors, idx: np.ndarray, steps: int) -> tuple[np.ndarray, float, float]:
        """`steps` steps on the batches idx[:steps] (rows of the training set); the step
        losses [steps], the summed loss × examples and the right answers."""
        train, _, _ = self.functions(t)
        losses, loss_sum, right_sum = train(t.x, t.y, idx, tf.constant(steps, tf.int32))
        return losses.numpy()[:steps], float(loss_sum), float(right_sum)

    def validate(self, t: Tensors) -> tuple[float, float]:
        """(validation loss, validation accuracy)."""
        _, validate, _ = self.functions(t)
        loss_sum, right_sum = validate(t.x_val, t.y_val, t.w_val)
        return float(loss_sum) / t.n_val, float(right_sum) / t.n_val

    def probe(self, t: Tensors, rows: np.ndarray, one: np.ndarray) -> tuple[float, float, float]:
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
