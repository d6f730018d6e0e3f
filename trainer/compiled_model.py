"""The compiled engine's model: a Keras model (`trainer.models.build_model`: the CNN of
document 000, the one-hot linear bottleneck of 002, MLPs) with compiled functions for a
chunk of training steps, the validation pass and the gradient probe, over the model's own
variables. The step loop around it is `trainer.compiled`.

- The forward pass is re-expressed layer by layer as plain TensorFlow ops (`Program.forward`:
  Reshape, Conv2D, MaxPooling2D, BatchNormalization, Flatten, Dense, and the loss from the
  logits, as Keras computes them): in graph mode Keras' layer calls cost as much as the
  arithmetic at batch 8. The initial weights and the optimizer are Keras' own.
- Adam: Keras' `update_step` arithmetic op for op, all variables in one XLA cluster (one
  pass over each variable and its moments; Keras' ten elementwise ops a variable took
  ≈2.8 ms of `model.fit`'s 3–4 ms a step at batch 8; TensorFlow's ResourceApplyAdam
  rounds differently, 3e-5 off after 20 CNN steps). Other optimizers: Keras' `apply`.
- A model with a convolution runs without XLA (oneDNN's convs beat XLA's CPU convs ≈10×:
  conv backprop at batch 128 3.2 vs 89 ms), in a `tf.compat.v1.Session` with thread pools
  of its own (`trainer.compiled_programs.session_threads`); others are XLA-compiled.
- Mixed bfloat16 (`[execution] precision = "bfloat16"`): matmuls, convolutions and
  activations in bfloat16; weights, optimizer state, batch-norm statistics, loss and
  gradients in float32 (Keras' "mixed_bfloat16" policy, written out). Only outside XLA
  does bfloat16 reach the CPU's bf16 instructions (oneDNN), so then no model uses XLA.
"""
from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from contract.spec import RunSpec
from trainer.models import make_optimizer
from trainer.spec import PRECISIONS

if TYPE_CHECKING:
    from trainer.compiled_programs import Tensors

# Validation rows per step of the validation pass: as many as keep the largest activation
# under this many values (a CNN: 256 rows), at most 4096.
EVAL_VALUES = 1 << 23


def has_conv(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)


def uses_xla(model: keras.Model, precision: str) -> bool:
    """XLA for models without a convolution in float32 (see the module docstring)."""
    return precision == "float32" and not has_conv(model)


class Program:
    """A Keras model's training step, validation pass and gradient probe as TensorFlow
    functions. `threads` None: over the model's own variables, in this process's thread
    pools. Else in a Session of its own with that many threads, over graph variables that
    start as copies of the model's (`weights` reads them back, `sync` writes them into the
    model); only for a plain Adam or SGD, whose update is written out here."""

    def __init__(self, model: keras.Model, spec: RunSpec, *, precision: str = "float32", key: tuple = (),
                 threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
        self.key, self.precision, self.model = key, precision, model
        self.compute = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self.one_hot = spec.loss == "categorical_crossentropy"
        self.layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        last = self.layers[-1]
        if not (isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax):
            raise ValueError("the compiled engine needs a model that ends in Dense(softmax)")
        self.optimizer = make_optimizer(spec)
        self.update = update_kind(self.optimizer)
        self.xla = uses_xla(model, precision)
        self.threads = threads if self.update != "keras" and not self.xla else None
        # Largest activation per example: sets the validation pass's rows per step.
        largest = max(int(np.prod(l.output.shape[1:])) for l in self.layers)
        self.eval_rows = int(min(4096, max(64, 2 ** math.floor(math.log2(max(1, EVAL_VALUES // largest))))))
        self._fns = None
        self._trace_lock = threading.Lock()
        if self.threads is None:
            self.session = None
            self.optimizer.build(model.trainable_variables)
            self._optimizer_start = [v.numpy() for v in self.optimizer.variables]
            # The tf.Variables under Keras' variables: what the functions read and update.
            self._vars = {id(v): v.value for v in model.weights}
            opt = self.optimizer
            self._iterations, self._lr = opt.iterations.value, opt.learning_rate
            self._slots = None
            if self.update == "adam":
                index = opt._get_variable_index
                self._slots = ([opt._momentums[index(v)].value for v in model.trainable_variables],
                               [opt._velocities[index(v)].value for v in model.trainable_variables])
        else:
            values, lr = [v.numpy() for v in model.weights], float(np.asarray(self.optimizer.learning_rate))
            self.graph = tf.Graph()
            with self.graph.as_default():
                self._vars = {id(v): tf.Variable(np.zeros_like(value), name=f"w{i}")
                              for i, (v, value) in enumerate(zip(model.weights, values))}
                self._iterations = tf.Variable(0, dtype=tf.int64, name="iterations")
                self._lr = tf.constant(lr, tf.float32)
                self._slots = None
                if self.update == "adam":
                    self._slots = tuple([tf.Variable(tf.zeros(v.shape), name=f"{kind}{i}")
                                         for i, v in enumerate(model.trainable_variables)] for kind in "mv")
                self._load_ops = _assigner(list(self._vars.values()))
                self._reset = tf.group([v.assign(tf.zeros_like(v)) for v in (self._slots or ([], []))[0]]
                                       + [v.assign(tf.zeros_like(v)) for v in (self._slots or ([], []))[1]]
                                       + [self._iterations.assign(0)])
            config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=self.threads,
                                              inter_op_parallelism_threads=self.threads,
                                              use_per_session_threads=True)
            self.session = tf.compat.v1.Session(graph=self.graph, config=config)
            self.session.run([v.initializer for v in self._vars.values()] + [self._iterations.initializer]
                             + [v.initializer for slot in (self._slots or ()) for v in slot])
            self._load_ops(values, self.session)
        self.trainable = [self._vars[id(v)] for v in model.trainable_variables]
        self._data = None  # the Tensors loaded into the session's graph

    def load(self, model: keras.Model) -> None:
        """Start over with `model`'s initial weights (same structure) and the optimizer's
        starting state; the traced functions are kept."""
        self.set_weights([v.numpy() for v in model.weights])
        if self.session is None:
            for variable, value in zip(self.optimizer.variables, self._optimizer_start):
                variable.assign(value)
        else:
            self.session.run(self._reset)

    def set_weights(self, values: list[np.ndarray]) -> None:
        """Set the weights (in the order of the Keras model's `weights`); the optimizer's
        state stays."""
        if self.session is None:
            for variable, value in zip(self.model.weights, values):
                variable.assign(value)
        else:
            self._load_ops(values, self.session)

    @property
    def steps(self) -> int:
        if self.session is None:
            return int(self._iterations.numpy())
        return int(self.session.run(self._iterations))

    def weights(self) -> list[np.ndarray]:
        """The current values, in the order of the Keras model's `weights`."""
        if self.session is None:
            return [v.numpy() for v in self.model.weights]
        return self.session.run([self._vars[id(v)] for v in self.model.weights])

    def sync(self) -> None:
        """Write the current values into the Keras model's variables."""
        if self.session is not None:
            for v, value in zip(self.model.weights, self.weights()):
                v.assign(value)

    # -- the model as TensorFlow ops --------------------------------------------------

    def forward(self, x, *, training: bool, update_statistics: bool = False):
        """float32 logits for the batch x, as the Keras model computes them (before its
        final softmax). Batch norm uses batch statistics when `training`, and only
        `update_statistics` moves its moving averages (the probe leaves them alone)."""
        h = tf.cast(x, self.compute)
        after_pool = None  # an activation moved past the max pooling that follows it
        for i, layer in enumerate(self.layers):
            if isinstance(layer, keras.layers.Reshape):
                h = tf.reshape(h, [-1, *layer.target_shape])
            elif isinstance(layer, keras.layers.Flatten):
                h = tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])
            elif isinstance(layer, keras.layers.Conv2D) and layer.data_format == "channels_last" \
                    and layer.groups == 1:
                h = tf.nn.convolution(h, self._weight(layer.kernel), strides=layer.strides,
                                      padding=layer.padding.upper(), dilations=layer.dilation_rate)
                if layer.use_bias:
                    h = h + self._weight(layer.bias)
                # relu(max(z)) = max(relu(z)), and the gradients agree bit for bit (the max
                # is routed to the same place, or relu' is 0): on a quarter of the values,
                # conv + pool forward and backward took 0.22 instead of 0.54 ms at batch 8.
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                if isinstance(nxt, keras.layers.MaxPooling2D) and layer.activation in _COMMUTES_WITH_MAX:
                    after_pool = layer.activation
                else:
                    h = layer.activation(h)
            elif isinstance(layer, keras.layers.MaxPooling2D) and layer.data_format == "channels_last":
                h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
                if after_pool is not None:
                    h, after_pool = after_pool(h), None
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
        return tf.cast(self._vars[id(variable)], self.compute)

    def _activate(self, layer, h):
        if layer.use_bias:
            h = h + self._weight(layer.bias)
        return layer.activation(h)

    def _batch_norm(self, layer, h, training, update_statistics):
        # As keras.layers.BatchNormalization: statistics and normalization in float32.
        h32 = tf.cast(h, tf.float32)
        moving_mean, moving_variance = self._vars[id(layer.moving_mean)], self._vars[id(layer.moving_variance)]
        if training:
            mean, variance = tf.nn.moments(h32, list(range(len(h.shape) - 1)))
            if update_statistics:
                m = layer.momentum
                moving_mean.assign(moving_mean * m + mean * (1.0 - m))
                moving_variance.assign(moving_variance * m + variance * (1.0 - m))
        else:
            mean, variance = moving_mean, moving_variance
        out = tf.nn.batch_normalization(h32, mean, variance, self._vars[id(layer.beta)] if layer.center else None,
                                        self._vars[id(layer.gamma)] if layer.scale else None, layer.epsilon)
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

    def apply(self, grads) -> None:
        """One optimizer update with `grads` (float32, in the order of `trainable`)."""
        if self.update == "keras":
            self.optimizer.apply(grads, self.model.trainable_variables)
        elif self.update == "sgd":
            # keras.optimizers.SGD.update_step without momentum: w −= g·lr.
            for variable, g in zip(self.trainable, grads):
                variable.assign_sub(g * tf.cast(self._lr, tf.float32))
            self._iterations.assign_add(1)
        elif self.xla:
            self._adam_update(grads)
        else:
            if getattr(self, "_adam_xla", None) is None:
                self._adam_xla = tf.function(self._adam_update, jit_compile=True, autograph=False)
            self._adam_xla(grads)

    def _adam_update(self, grads) -> None:
        """keras.optimizers.Adam.update_step's arithmetic, op for op, for every variable
        at once (under XLA: one fused pass over each variable and its moments)."""
        opt = self.optimizer
        step = tf.cast(self._iterations + 1, tf.float32)
        lr = tf.cast(self._lr, tf.float32)
        beta_1_power = tf.pow(tf.constant(opt.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(opt.beta_2, tf.float32), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        for variable, m, v, g in zip(self.trainable, *self._slots, grads):
            m.assign_add((g - m) * (1 - opt.beta_1))
            v.assign_add((tf.square(g) - v) * (1 - opt.beta_2))
            variable.assign_sub((m * alpha) / (tf.sqrt(v) + opt.epsilon))
        self._iterations.assign_add(1)

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

    def _functions(self, t: Tensors):
        """(train, validate, probe) as tf.functions, traced at the first call with batch
        sizes left open (autograph=False: the loops are tf.while_loop already)."""
        def open_spec(array, dims, dtype=None):
            return tf.TensorSpec([None] * dims + list(array.shape[dims:]), dtype or tf.as_dtype(array.dtype))

        train = tf.function(self._train_chunk, jit_compile=self.xla, autograph=False, input_signature=[
            open_spec(t.arrays["x"], 1), open_spec(t.arrays["y"], 1), tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([], tf.int32)])
        validate = tf.function(self._validate_fn, jit_compile=self.xla, autograph=False, input_signature=[
            open_spec(t.arrays["x_val"], 2), open_spec(t.arrays["y_val"], 2), tf.TensorSpec([None, None])])
        # The probe runs ≈10 times an epoch: not worth an XLA compile.
        probe = tf.function(self._probe_fn, autograph=False, input_signature=[
            open_spec(t.arrays["x"][None], 2), open_spec(t.arrays["y"][None], 2),
            open_spec(t.arrays["x"], 1), open_spec(t.arrays["y"], 1)])
        return train, validate, probe

    def _graph(self, t: Tensors) -> dict:
        """The session's fetches and placeholders, built once; the data loaded when `t` is
        not what is loaded."""
        with self._trace_lock:
            if self._fns is None:
                with self.graph.as_default():
                    data = {k: tf.Variable(np.zeros((0,) + v.shape[1:], v.dtype), shape=(None,) + v.shape[1:],
                                           name=k) for k, v in t.arrays.items()}
                    self.session.run([v.initializer for v in data.values()])
                    ph = {"idx": tf.compat.v1.placeholder(tf.int32, [None, None]),
                          "n": tf.compat.v1.placeholder(tf.int32, []),
                          "rows": tf.compat.v1.placeholder(tf.int32, [None, None]),
                          "one": tf.compat.v1.placeholder(tf.int32, [None])}
                    train, validate, probe = self._functions(t)
                    x, y = data["x"], data["y"]
                    self._fns = {
                        "data": _assigner(list(data.values())), "data_keys": list(data), "ph": ph,
                        "train": train(x, y, ph["idx"], ph["n"]),
                        "validate": validate(data["x_val"], data["y_val"], data["w_val"]),
                        "probe": probe(tf.gather(x, ph["rows"]), tf.gather(y, ph["rows"]),
                                       tf.gather(x, ph["one"]), tf.gather(y, ph["one"]))}
            if self._data is not t:
                self._fns["data"]([t.arrays[k] for k in self._fns["data_keys"]], self.session)
                self._data = t
            return self._fns

    def _eager(self, t: Tensors):
        with self._trace_lock:
            if self._fns is None:
                self._fns = self._functions(t)
            return self._fns

    def train(self, t: Tensors, idx: np.ndarray, steps: int) -> tuple[np.ndarray, float, float]:
        """`steps` steps on the batches idx[:steps] (rows of the training set); the step
        losses [steps], the summed loss × examples and the right answers."""
        if self.session is None:
            losses, loss_sum, right_sum = self._eager(t)[0](t.x, t.y, idx, tf.constant(steps, tf.int32))
            return losses.numpy()[:steps], float(loss_sum), float(right_sum)
        g = self._graph(t)
        losses, loss_sum, right_sum = self.session.run(g["train"], {g["ph"]["idx"]: idx, g["ph"]["n"]: steps})
        return losses[:steps], float(loss_sum), float(right_sum)

    def validate(self, t: Tensors) -> tuple[float, float]:
        """(validation loss, validation accuracy)."""
        if self.session is None:
            loss_sum, right_sum = self._eager(t)[1](t.x_val, t.y_val, t.w_val)
        else:
            loss_sum, right_sum = self.session.run(self._graph(t)["validate"])
        return float(loss_sum) / t.n_val, float(right_sum) / t.n_val

    def probe(self, t: Tensors, rows: np.ndarray, one: np.ndarray) -> tuple[float, float, float]:
        """(mean |G_small|², |G_big|², cosine) for the small batches `rows` [k, B_small] and
        the batch `one` (no rows: NaN cosine)."""
        if self.session is None:
            out = self._eager(t)[2](tf.gather(t.x, rows), tf.gather(t.y, rows), tf.gather(t.x, one),
                                    tf.gather(t.y, one))
        else:
            g = self._graph(t)
            out = self.session.run(g["probe"], {g["ph"]["rows"]: rows, g["ph"]["one"]: one})
        return tuple(float(v) for v in out)


# Activations that may be applied after a max pooling instead of before it, with the same
# values and gradients: non-decreasing ones without saturation ties (tanh and sigmoid
# round large inputs to equal values, where the max would be routed differently).
_COMMUTES_WITH_MAX = (keras.activations.relu, keras.activations.linear)


def update_kind(opt) -> str:
    """"adam" or "sgd" for a plain Keras Adam or momentum-free SGD (no amsgrad, nesterov,
    clipping, weight decay, EMA, loss scaling or accumulation), whose update `Program`
    writes out; else "keras" (its own `apply`)."""
    plain = (opt.clipnorm is None and opt.clipvalue is None and opt.global_clipnorm is None and not opt.use_ema
             and getattr(opt, "loss_scale_factor", None) is None
             and getattr(opt, "gradient_accumulation_steps", None) is None)
    if plain and type(opt) is keras.optimizers.Adam and not opt.amsgrad and opt.weight_decay is None:
        return "adam"
    if plain and type(opt) is keras.optimizers.SGD and opt.momentum == 0 and not opt.nesterov \
            and opt.weight_decay is None:
        return "sgd"
    return "keras"


def _assigner(variables: list):
    """A function (values, session) that assigns numpy `values` to graph `variables`
    (one placeholder each: the graph holds no copy of the data)."""
    holders = [tf.compat.v1.placeholder(v.dtype, [None] * len(v.shape)) for v in variables]
    op = tf.group([v.assign(h) for v, h in zip(variables, holders)])
    return lambda values, session: session.run(op, dict(zip(holders, values)))
