"""The fused engine: the runs of a grid that share a data order, trained as one XLA program.

Runs that differ only in initializer and batch norm (same architecture, optimizer,
learning rate, batch size, epochs and seed) see the same batches in the same order, so
they can share each step: their first layers become one wide matmul, later layers batched
matmuls over a leading "member" axis. Members share no weights and the loss is the sum of
their losses, so each member's gradient is its own loss's gradient; every optimizer we
offer updates element by element, so each member trains as it would alone (up to float
rounding in the wider matmul). A run's data order depends only on its seed and batch
size, never on its pack mates, so its numbers do not depend on how the grid was packed.

`steps_per_execution` steps run per call inside one XLA program (the last, partial batch
of an epoch is a masked full-size batch, so one program serves every step); the step
losses come back as an array and a small graph function writes them, one value per step
and member, at the exact global step.

Written by hand because neither Keras nor TensorFlow trains several independent models
as one program (Keras has no vmap over models on the TensorFlow backend), and on a
laptop CPU it is per-step overhead, not arithmetic, that makes small models slow. The
members' initial weights come from the same Keras models `model.fit` would train
(`trainer.models.build_model`), and the optimizer is Keras'.
"""
from __future__ import annotations

import math
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.scalar import metadata as scalar_metadata

from trainer import faults, interrupt
from trainer.data import Dataset
from trainer.models import STEP_LOSS_TAG, build_model, make_optimizer, summarize
from trainer.noise import EPOCH_TAGS, PREFIX, STEP_TAGS, NoiseScaleEMA, roughness, two_batch_estimate
from trainer.run import SPLITS, _one_line, begin_run, finish_run
from trainer.spec import Experiment, RunSpec
from trainer.tblog import write_run_hparams

# keras.layers.BatchNormalization's defaults, which build_model uses.
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
EVAL_CHUNK = 2048  # validation examples per step of the validation pass


class PackedMLP:
    """The members' dense layers stacked on a leading member axis (members with batch
    norm last, so batch norm applies to one contiguous block), with compiled functions
    for a chunk of training steps, evaluation and gradient probes.

    Variables: the first layer's kernel is [inputs, members × units] (one matmul for all
    members: they share the input), later kernels [members, in, out], biases and batch
    norm parameters [members, 1, units].
    """

    def __init__(self, specs: list[RunSpec], *, input_shape: tuple[int, ...], classes: int,
                 probe: tuple[int, int, int] | None = None):
        self.key = structure_key(specs, input_shape, classes)
        first = specs[0]
        self.input_shape, self.classes = tuple(input_shape), classes
        self.members = len(specs)
        self.normed = sum(s.uses_batch_norm for s in specs)
        self.inputs = int(np.prod(input_shape))
        self.activation = keras.activations.get("linear" if first.architecture == "linear" else first.activation)
        kernels, biases, norms = self._unpack(self._start(specs, probe))
        m = self.members
        self.kernels = [tf.Variable(v) for v in kernels]
        self.biases = [tf.Variable(v) for v in biases]
        # Per hidden layer: gamma, beta, moving mean, moving variance of the normed members.
        self.norms = [[tf.Variable(v, trainable=j < 2) for j, v in enumerate(n)] for n in norms]
        self.state = self.kernels + self.biases + [v for n in self.norms for v in n]
        self.trainable = self.kernels + self.biases + [v for n in self.norms for v in n[:2]]
        self.optimizer = make_optimizer(first)
        self.optimizer.build(self.trainable)
        self._optimizer_start = [v.numpy() for v in self.optimizer.variables]
        # Per trainable variable: its elementwise product of two gradients (float32) summed
        # per member, [members] in float64: rows of at most a layer's width are summed in
        # float32, and those partial sums in float64 (as exact as summing it all in float64
        # to ≈1e-7, and ≈8 ms a probe faster). The first kernel is [inputs, members × units]:
        # summed over inputs and units without a transpose; members without batch norm
        # have no gamma or beta (0).
        first_units = self.units[0]
        def first_kernel(t):
            rows = tf.reduce_sum(tf.reshape(t, [self.inputs, m, first_units]), axis=2)
            return tf.reduce_sum(tf.cast(rows, tf.float64), axis=0)

        def per_member(t, members):  # t: [members, …, width], or [members × width]
            width = t.shape[-1] if t.shape.rank > 1 else t.shape[0] // members
            rows = tf.reduce_sum(tf.reshape(t, [members, -1, width]), axis=2)
            return tf.reduce_sum(tf.cast(rows, tf.float64), axis=1)

        def stacked(t):
            return per_member(t, m)

        def normed(t):
            return tf.concat([tf.zeros([m - self.normed], tf.float64), per_member(t, self.normed)], axis=0)

        self._member_sums = ([first_kernel] + [stacked] * (len(self.kernels) - 1)
                             + [stacked] * len(self.biases) + [normed] * (2 * len(self.norms)))
        # The compiled functions, made at the first call with the batch sizes left open in
        # their signatures: one trace (≈0.3 s for training, ≈0.5 s for the probe) then
        # serves every pack this object trains (`load`), and XLA compiles each batch size
        # once.
        self.train_chunk = self.probe = None
        self._pending: dict[str, Future] = {}  # see warm_up

    def validator(self, t: "Tensors"):
        """The validation pass for packs of this structure: one XLA program that takes the
        weights as arguments, so it is compiled once per structure and process, not once
        per batch size as it would be inside `train_chunk` (≈0.5 s of CPU each)."""
        with _VALIDATE_LOCK:
            if self.key not in _VALIDATE:
                state = [tf.TensorSpec(v.shape, v.dtype) for v in self.state]
                chunks = [tf.TensorSpec([None, None, *v.shape[2:]], v.dtype) for v in (t.x_val, t.y_val, t.w_val)]
                _VALIDATE[self.key] = tf.function(self._validate, jit_compile=True, autograph=False,
                                                  input_signature=[state, *chunks])
            return _VALIDATE[self.key]

    def _start(self, specs: list[RunSpec], probe) -> list[np.ndarray]:
        """Take `specs` as the members: their initial values (kernels, biases, then per
        hidden layer gamma, beta, moving mean and variance of the normed members), as
        the same Keras models `model.fit` would train hold them."""
        if [s.uses_batch_norm for s in specs] != sorted(s.uses_batch_norm for s in specs):
            raise ValueError("members with batch norm must come last")
        if len({s.pack_key() for s in specs}) != 1:
            raise ValueError("a pack's members must differ only in initializer and batch norm")
        dense, norms, self.summaries = [], [], []
        for spec in specs:
            model = build_model(spec, input_shape=self.input_shape, classes=self.classes)
            self.summaries.append(summarize(model))
            dense.append([(l.kernel.numpy(), l.bias.numpy()) for l in model.layers
                          if isinstance(l, keras.layers.Dense)])
            if spec.uses_batch_norm:
                norms.append([[v.numpy() for v in (l.gamma, l.beta, l.moving_mean, l.moving_variance)]
                              for l in model.layers if isinstance(l, keras.layers.BatchNormalization)])
        self.specs = list(specs)
        self.units = [k.shape[1] for k, _ in dense[0][:-1]]
        # (batches, small batch, one batch) of the gradient-noise probe, or None: no probe.
        self.probe_shape = probe
        kernels = [np.concatenate([d[0][0] for d in dense], axis=1)]
        biases = [np.concatenate([d[0][1] for d in dense])]
        for layer in range(1, len(dense[0])):
            kernels.append(np.stack([d[layer][0] for d in dense]))
            biases.append(np.stack([d[layer][1][None] for d in dense]))
        normed = [np.stack([n[layer][j][None] for n in norms]) for layer in range(len(norms[0]) if norms else 0)
                  for j in range(4)]
        return [np.asarray(v, np.float32) for v in kernels + biases + normed]

    def load(self, specs: list[RunSpec], probe: tuple[int, int, int] | None) -> None:
        """Start over as the pack of `specs` (same `structure_key`): their initial weights,
        the optimizer's starting state; the traced and compiled functions are kept."""
        if structure_key(specs, self.input_shape, self.classes) != self.key:
            raise ValueError("a pack can only be loaded with runs of the same structure")
        for variable, value in zip(self.state, self._start(specs, probe)):
            variable.assign(value)
        for variable, value in zip(self.optimizer.variables, self._optimizer_start):
            variable.assign(value)

    def _functions(self, t: "Tensors") -> None:
        if self.train_chunk is not None:
            return
        def spec(tensor, open_dims):  # the first `open_dims` dimensions left open
            return tf.TensorSpec([None] * open_dims + tensor.shape[open_dims:].as_list(), tensor.dtype)

        # autograph=False: the loops are written as tf.while_loop, and converting Keras'
        # optimizer code with autograph would cost ≈1 s of tracing per pack.
        self.train_chunk = tf.function(
            self._train_chunk, jit_compile=True, autograph=False,
            input_signature=[spec(t.x, 1), spec(t.y, 1), tf.TensorSpec([None, None], tf.int32),
                             tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)])
        # The probe is not compiled with XLA: its backward passes add ≈0.9 s
        # to a pack's compilation, more than the ≈66 calls of a lab grid gain from it.
        self.probe = tf.function(
            self._probe, autograph=False,
            input_signature=[tf.TensorSpec([None, None, self.inputs], t.x.dtype),
                             tf.TensorSpec([None, None], t.y.dtype), spec(t.x, 1), spec(t.y, 1)])

    def warm_up(self, data: Dataset, steps_per_execution: int) -> None:
        """Trace and compile the functions with the shapes training will use, changing no
        state (zero steps; the probe only reads), so that this can run in a thread while
        another pack trains. What training needs only after its first steps (the probe,
        the validation pass, the event writer) is traced in the background thread, while
        XLA compiles the training program here (C++, without the GIL) and on into the
        pack's training; `run_chunk` waits for it where it is used."""
        t = tensors(data)
        self._functions(t)
        _BACKGROUND.submit(warm_up_events, self.members)  # the writing thread waits for it if need be
        self._pending = {"validate": _BACKGROUND.submit(self._warm_up_validator, t)}
        if self.probe_shape is not None:
            k, small, one = self.probe_shape
            self._pending["probe"] = _BACKGROUND.submit(
                self.probe, tf.zeros((k, small, self.inputs), t.x.dtype), tf.zeros((k, small), t.y.dtype),
                t.x[:one], t.y[:one])
        batch = self.specs[0].batch_size
        self.run_chunk(data, np.zeros((steps_per_execution, batch), np.int32),
                       np.zeros(steps_per_execution, np.int32), 0)

    def _warm_up_validator(self, t: "Tensors") -> None:
        """Compile the validation pass for these shapes, once per process (on zero weights:
        the pack may be training meanwhile)."""
        shapes = (self.key, tuple(t.x_val.shape))
        if shapes not in _VALIDATE_WARM:
            self.validator(t)([tf.zeros(v.shape, v.dtype) for v in self.state], t.x_val, t.y_val, t.w_val)
            _VALIDATE_WARM.add(shapes)

    def _ready(self, name: str) -> None:
        """Wait for `warm_up`'s background work `name` (and raise its error, if any)."""
        job = self._pending.pop(name, None)
        if job is not None:
            job.result()

    def run_chunk(self, data: Dataset, idx: np.ndarray, counts: np.ndarray, steps: int, *,
                  probe: tuple[np.ndarray, np.ndarray] | None = None, validate: bool = False) -> dict:
        """`steps` training steps on the rows idx[i, :counts[i]] of the training set; then,
        if given, the gradient probe on the rows `probe` = (small batches [k, B_small],
        one batch), and if `validate`, the validation pass. numpy arrays:
        "losses" [len(idx), members] (the first `steps` rows real), "loss_sum" and
        "right_sum" per member (loss × examples, right answers); "probe": see `_probe`;
        "val_loss", "val_accuracy" per member."""
        t = tensors(data)
        self._functions(t)
        out = self.train_chunk(t.x, t.y, idx, counts, tf.constant(steps, tf.int32))
        if validate:
            self._ready("validate")
            out["val_loss_sum"], out["val_right"] = self.validator(t)(self.state, t.x_val, t.y_val, t.w_val)
        out = {key: value.numpy() for key, value in out.items()}
        if probe is not None:
            if self.probe_shape is None:
                raise ValueError("this pack was built without a gradient probe")
            rows, one = probe
            self._ready("probe")
            out["probe"] = tuple(v.numpy() for v in self.probe(
                tf.gather(t.x, rows), tf.gather(t.y, rows), tf.gather(t.x, one), tf.gather(t.y, one)))
        if validate:
            n_val = len(data.x_val)
            out["val_loss"], out["val_accuracy"] = out.pop("val_loss_sum") / n_val, out.pop("val_right") / n_val
        return out

    @property
    def steps(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # -- the model --------------------------------------------------------------------

    def forward(self, x, weight, count, *, training: bool, update_statistics: bool = False, state=None):
        """Logits [members, batch, classes] for x [batch, inputs]; `weight` masks padding
        rows (batch statistics and losses use only the `count` real ones). `state`: values
        in the order of `self.state` to use instead of the variables (no statistics update)."""
        kernels, biases, norms = self._unpack(self.state if state is None else state)
        h = self.activation(tf.matmul(x, kernels[0]) + biases[0])
        h = tf.transpose(tf.reshape(h, [-1, self.members, self.units[0]]), [1, 0, 2])
        for layer in range(len(self.units)):
            if layer:
                h = self.activation(tf.matmul(h, kernels[layer]) + biases[layer])
            if self.normed:
                h = self._batch_norm(h, norms[layer], weight, count, training, update_statistics)
        return tf.matmul(h, kernels[-1]) + biases[-1]

    def _unpack(self, state: list) -> tuple[list, list, list]:
        """Values (or variables) in the order of `self.state` as (kernels, biases, per
        normed hidden layer [gamma, beta, moving mean, moving variance])."""
        layers = len(self.units) + 1
        rest = state[2 * layers:]
        return state[:layers], state[layers:2 * layers], [rest[4 * i:4 * i + 4] for i in range(len(rest) // 4)]

    def _batch_norm(self, h, norm, weight, count, training, update_statistics):
        gamma, beta, moving_mean, moving_var = norm
        plain, normed = h[:self.members - self.normed], h[self.members - self.normed:]
        if training:
            w = weight[None, :, None]
            mean = tf.reduce_sum(normed * w, axis=1, keepdims=True) / count
            var = tf.reduce_sum(tf.square(normed - mean) * w, axis=1, keepdims=True) / count
            if update_statistics:
                moving_mean.assign(moving_mean * BN_MOMENTUM + mean * (1 - BN_MOMENTUM))
                moving_var.assign(moving_var * BN_MOMENTUM + var * (1 - BN_MOMENTUM))
        else:
            mean, var = moving_mean, moving_var
        normed = (normed - mean) * tf.math.rsqrt(var + BN_EPSILON) * gamma + beta
        return tf.concat([plain, normed], axis=0)

    def _losses(self, logits, y, weight, count):
        """Per member: the mean loss over the real rows, and the count of right answers."""
        labels = tf.broadcast_to(y[None], [self.members, tf.shape(y)[0]])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        right = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.float32)
        return tf.reduce_sum(ce * weight, axis=1) / count, tf.reduce_sum(right * weight, axis=1)

    # -- compiled functions -----------------------------------------------------------

    def _train_chunk(self, x_all, y_all, idx, counts, n_steps):
        """`n_steps` training steps on the rows idx[i, :counts[i]]."""
        batch = tf.shape(idx)[1]

        def step(i, losses, loss_sum, right_sum):
            count = tf.cast(counts[i], tf.float32)
            weight = tf.cast(tf.range(batch) < counts[i], tf.float32)
            x, y = tf.gather(x_all, idx[i]), tf.gather(y_all, idx[i])
            with tf.GradientTape() as tape:
                logits = self.forward(x, weight, count, training=True, update_statistics=True)
                loss, right = self._losses(logits, y, weight, count)
                total = tf.reduce_sum(loss)
            self.optimizer.apply(tape.gradient(total, self.trainable), self.trainable)
            losses = tf.tensor_scatter_nd_update(losses, [[i]], loss[None])
            return i + 1, losses, loss_sum + loss * count, right_sum + right

        zeros = tf.zeros([self.members])
        _, losses, loss_sum, right_sum = tf.while_loop(
            lambda i, *_: i < n_steps, step,
            (tf.constant(0), tf.zeros([tf.shape(idx)[0], self.members]), zeros, zeros))
        return {"losses": losses, "loss_sum": loss_sum, "right_sum": right_sum}

    def _validate(self, state, x_val, y_val, w_val):
        """Per member: the summed validation loss and right answers over the chunks
        x_val[c] (inference mode: moving statistics; w_val masks the padding rows), for
        the weights and statistics `state` (values in the order of `self.state`)."""
        def chunk(c, loss_sum, right_sum):
            count = tf.reduce_sum(w_val[c])
            loss, right = self._losses(self.forward(x_val[c], w_val[c], count, training=False, state=state),
                                       y_val[c], w_val[c], count)
            return c + 1, loss_sum + loss * count, right_sum + right

        zeros = tf.zeros([self.members])
        _, loss_sum, right_sum = tf.while_loop(lambda c, *_: c < tf.shape(x_val)[0], chunk,
                                               (tf.constant(0), zeros, zeros))
        return loss_sum, right_sum

    def _gradient(self, x, y):
        """The members' gradients at the current weights, as a training step sees them
        (batch statistics) but changing nothing (no moving-statistics update)."""
        weight = tf.ones([tf.shape(x)[0]])
        count = tf.reduce_sum(weight)
        with tf.GradientTape() as tape:
            loss, _ = self._losses(self.forward(x, weight, count, training=True), y, weight, count)
            total = tf.reduce_sum(loss)
        return tape.gradient(total, self.trainable)

    def _dot(self, a, b):
        """Per member: the dot product of two gradients (lists like `trainable`), float64."""
        return tf.add_n([member_sum(ga * gb) for member_sum, ga, gb in zip(self._member_sums, a, b)])

    def _probe(self, xs, ys, x_one, y_one):
        """As `trainer.noise_probe.GradientProbe.measure`, per member: mean |G_small|² over
        the k batches xs[i], |G_big|² of their mean, and cosine(G of (x_one, y_one), G_big)."""
        k = tf.shape(xs)[0]

        def add(i, total, squares):
            g = self._gradient(xs[i], ys[i])
            return i + 1, [t + gi for t, gi in zip(total, g)], squares + self._dot(g, g)

        _, total, squares = tf.while_loop(
            lambda i, *_: i < k, add,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in self.trainable],
             tf.zeros([self.members], tf.float64)))
        big = [t / tf.cast(k, t.dtype) for t in total]
        one = self._gradient(x_one, y_one)
        big_sq = self._dot(big, big)
        cosine = self._dot(one, big) / tf.sqrt(self._dot(one, one) * big_sq)
        return squares / tf.cast(k, tf.float64), big_sq, cosine


class Tensors(NamedTuple):
    x: tf.Tensor      # training inputs [examples, inputs]
    y: tf.Tensor      # training labels [examples]
    x_val: tf.Tensor  # validation inputs in chunks [chunks, EVAL_CHUNK, inputs], zero-padded
    y_val: tf.Tensor  # [chunks, EVAL_CHUNK]
    w_val: tf.Tensor  # 1 for a real row, 0 for padding


_TENSORS: dict[int, tuple[Dataset, Tensors]] = {}
# The validation pass per structure_key (see `PackedMLP.validator`).
_VALIDATE: dict[tuple, tf.types.experimental.PolymorphicFunction] = {}
_VALIDATE_LOCK = threading.Lock()
_VALIDATE_WARM: set[tuple] = set()  # (structure key, validation chunks' shape) compiled
# Where `PackedMLP.warm_up` traces and compiles what training needs only after its first steps.
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-up")


def tensors(data: Dataset) -> Tensors:
    """The dataset as tensors, made once per dataset and shared by every pack this process
    trains."""
    entry = _TENSORS.get(id(data))
    if entry is None or entry[0] is not data:
        _TENSORS.clear()
        n, size = len(data.x_val), min(EVAL_CHUNK, len(data.x_val))
        chunks = math.ceil(n / size)
        x_val = np.zeros((chunks * size, int(np.prod(data.x_val.shape[1:]))), np.float32)
        x_val[:n] = data.x_val.reshape(n, -1)
        y_val = np.zeros(chunks * size, data.y_val.dtype)
        y_val[:n] = data.y_val
        w_val = (np.arange(chunks * size) < n).astype(np.float32)
        entry = (data, Tensors(tf.constant(data.x_train.reshape(len(data.x_train), -1)), tf.constant(data.y_train),
                               tf.constant(x_val.reshape(chunks, size, -1)), tf.constant(y_val.reshape(chunks, size)),
                               tf.constant(w_val.reshape(chunks, size))))
        _TENSORS[id(data)] = entry
    return entry[1]


def structure_key(specs: list[RunSpec], input_shape: tuple[int, ...], classes: int) -> tuple:
    """Packs with equal keys have the same variables and compiled functions; they differ
    only in initializers, batch size, epochs and seed."""
    d = specs[0].to_dict()
    for name in ("initializer", "batch_norm", "batch_size", "epochs", "seed"):
        del d[name]
    return (tuple(sorted((k, repr(v)) for k, v in d.items())), tuple(s.uses_batch_norm for s in specs),
            tuple(input_shape), classes)


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


def build(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> PackedMLP:
    """The pack of `specs` (batch-norm members last), with the gradient probe if the
    experiment measures gradient noise and the data has enough examples for it; a
    released pack of the same structure if there is one."""
    specs = sorted(specs, key=lambda s: s.uses_batch_norm)
    s = experiment.gradient_noise
    probe = None
    if s.enabled and s.big_batch <= len(data.x_train):
        probe = (s.batches, s.small_batch, min(specs[0].batch_size, len(data.x_train)))
    input_shape, classes = data.x_train.shape[1:], int(data.y_train.max()) + 1
    key = structure_key(specs, input_shape, classes)
    with _FREE_LOCK:
        pack = next((p for p in _FREE if p.key == key), None)
        if pack is not None:
            _FREE.remove(pack)
    if pack is None:
        return PackedMLP(specs, input_shape=input_shape, classes=classes, probe=probe)
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
    """An epoch's shuffled batches as indices [steps, batch] (the last padded) and row counts."""
    order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    steps = math.ceil(n / batch)
    idx = np.zeros(steps * batch, np.int32)
    idx[:n] = order
    counts = np.full(steps, batch, np.int32)
    counts[-1] = n - (steps - 1) * batch
    return idx.reshape(steps, batch), counts


class PackNoise:
    """`trainer.noise_probe.GradientNoise` for a pack: the same draws, the same schedule
    (every K steps, at the first chunk end at or after each multiple, and at each epoch
    end), an EMA per member; the values go to each member's train split through `events`.
    The probe runs at the end of the chunk that `plan` says."""

    def __init__(self, settings, *, examples: int, batch_size: int, seed: int, events: PackEvents):
        if settings.big_batch > examples:
            raise ValueError(f"[gradient_noise] needs batches × small_batch = {settings.big_batch} "
                             f"training examples, the data has {examples}")
        self.settings, self.examples = settings, examples
        self.batch_size, self.events = batch_size, events
        self.rng = np.random.default_rng([seed, 0x6E6F697365])  # as GradientNoise: same draws
        self.emas = [NoiseScaleEMA(settings.beta) for _ in range(events.members)]
        self.measurements = [0] * events.members
        self.next_due = settings.every
        self.last: list[dict] | None = None

    def plan(self, step: int, epoch_end: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """The probe's rows if a measurement is due at `step` (a chunk's last step): the
        small batches [k, B_small] and one batch of the run's size; else None."""
        if step < self.next_due and not epoch_end:
            return None
        s = self.settings
        rows = self.rng.choice(self.examples, size=s.big_batch, replace=False)
        one = self.rng.choice(self.examples, size=min(self.batch_size, self.examples), replace=False)
        return rows.reshape(s.batches, s.small_batch).astype(np.int32), one.astype(np.int32)

    def record(self, step: int, probe: tuple[np.ndarray, np.ndarray, np.ndarray], alive: list[bool]) -> None:
        """A measurement's results (per member |G_small|², |G_big|², cosine) at `step`."""
        s = self.settings
        small, big, cosine = probe
        out = []
        for j, ema in enumerate(self.emas):
            if not alive[j]:
                out.append({})
                continue
            g2, trace = two_batch_estimate(float(small[j]), float(big[j]), s.small_batch, s.big_batch)
            ema.update(g2, trace)
            self.measurements[j] += 1
            out.append({"step": step, "G2": g2, "trace_sigma": trace, "b_simple": ema.b_simple,
                        "noise_at_batch": ema.trace / self.batch_size, "cosine": float(cosine[j])})
        for j, m in enumerate(out):
            self.events.add(j, "train", {PREFIX + t: m.get(t) for t in STEP_TAGS}, step)
        if step >= self.next_due:
            self.next_due = (step // s.every + 1) * s.every
        self.last = out

    def epoch_end(self, epoch: int, step_losses: np.ndarray, alive: list[bool]) -> None:
        """The epoch's `gradient/epoch_*` scalars, from the measurement at the epoch's end."""
        for j, m in enumerate(self.last or []):
            if alive[j] and m:
                self.events.add(j, "train", {
                    PREFIX + "epoch_noise_at_batch": m["noise_at_batch"], PREFIX + "epoch_cosine": m["cosine"],
                    PREFIX + "loss_roughness": roughness(step_losses[:, j]),
                    PREFIX + "epoch_b_simple": m["b_simple"]}, epoch)

    def summary(self, j: int) -> dict:
        return {**self.settings.to_dict(), "measurements": self.measurements[j],
                "tags": [PREFIX + t for t in STEP_TAGS + EPOCH_TAGS]}


def train_pack(experiment: Experiment, specs: list[RunSpec], data: Dataset, run_dirs: list[Path], *,
               prepared: PackedMLP | None = None) -> list[dict]:
    """Train the runs `specs` (one pack) from scratch into `run_dirs`; their final manifests,
    in the order given. `prepared`: from `prepare`, used if it holds exactly these runs.
    A KeyboardInterrupt marks every member interrupted and propagates."""
    order = sorted(range(len(specs)), key=lambda j: specs[j].uses_batch_norm)
    specs, run_dirs = [specs[j] for j in order], [run_dirs[j] for j in order]
    first, m = specs[0], len(specs)
    manifests = [begin_run(experiment, spec, data, d) for spec, d in zip(specs, run_dirs)]
    names = [d.name for d in run_dirs]
    for manifest in manifests:
        manifest["pack"] = names
    writers = [{s: tf.summary.create_file_writer(str(d / s)) for s in SPLITS} for d in run_dirs]
    steps_per_epoch = math.ceil(len(data.x_train) / first.batch_size)
    state = {"epochs": [0] * m, "final": [{} for _ in range(m)], "diverged_at": [None] * m}
    pack = noise = events = None
    start = time.perf_counter()

    def finish(status_of) -> list[dict]:
        if events is not None:
            try:
                events.close()
            except Exception as exc:  # noqa: BLE001 - a write failed: the log is incomplete
                if status_of == "complete":
                    status_of = "failed"
                for manifest in manifests:
                    manifest.setdefault("error", _one_line(exc))
        trained = pack.steps if pack is not None else 0
        if pack is not None:
            release(pack)
        out = []
        for j in range(m):
            status = "diverged" if state["diverged_at"][j] is not None else status_of
            final = {"loss": math.nan} if status == "diverged" else state["final"][j]
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
            write_run_hparams(d, spec, trial_id=d.name)
        events = PackEvents(writers)
        if experiment.gradient_noise.enabled:
            noise = PackNoise(experiment.gradient_noise, examples=len(data.x_train),
                              batch_size=first.batch_size, seed=first.seed, events=events)
        chunk, steps_done = experiment.steps_per_execution, 0
        for epoch in range(first.epochs):
            idx, counts = _batches(len(data.x_train), first.batch_size, first.seed, epoch)
            epoch_losses, loss_sum, right_sum = [], np.zeros(m), np.zeros(m)
            for s in range(0, steps_per_epoch, chunk):
                n = min(chunk, steps_per_epoch - s)
                last = s + n == steps_per_epoch
                part_idx = np.zeros((chunk, first.batch_size), np.int32)
                part_idx[:n] = idx[s:s + n]
                part_counts = np.zeros(chunk, np.int32)
                part_counts[:n] = counts[s:s + n]
                probe = noise.plan(steps_done + n, last) if noise is not None else None
                out = pack.run_chunk(data, part_idx, part_counts, n, probe=probe, validate=last)
                losses = out["losses"][:n]
                written = _record_divergence(losses, steps_done, state["diverged_at"])
                first_step, steps_done = steps_done + 1, steps_done + n
                epoch_losses.append(losses)
                loss_sum += out["loss_sum"]
                right_sum += out["right_sum"]
                alive = [d is None for d in state["diverged_at"]]
                if probe is not None and any(alive):
                    noise.record(steps_done, out["probe"], alive)
                if not last or not any(alive):  # else written with the epoch's scalars below
                    events.write(losses, first_step, written)
                    faults.point("step")
                    interrupt.check()
                if not any(alive):
                    break
            if not any(alive):
                break
            n_train = len(data.x_train)
            for j in range(m):
                if alive[j]:
                    state["epochs"][j] = epoch + 1
                    state["final"][j] = {"loss": float(loss_sum[j] / n_train), "accuracy": float(right_sum[j] / n_train),
                                         "val_loss": float(out["val_loss"][j]),
                                         "val_accuracy": float(out["val_accuracy"][j])}
            # As trainer.tblog.EpochScalars: epoch_* in train/ and validation/ at the epoch index.
            for j, final in enumerate(state["final"]):
                if alive[j]:
                    events.add(j, "train", {"epoch_loss": final["loss"], "epoch_accuracy": final["accuracy"]}, epoch)
                    events.add(j, "validation", {"epoch_loss": final["val_loss"],
                                                 "epoch_accuracy": final["val_accuracy"]}, epoch)
            if noise is not None:
                noise.epoch_end(epoch, np.concatenate(epoch_losses), alive)
            events.write(losses, first_step, written)  # the epoch's last chunk, and its epoch scalars
            events.drain()
            faults.point("step")
            for j in range(m):
                for split in SPLITS:
                    faults.point("flush")
                    writers[j][split].flush()
            interrupt.check()
        interrupt.check()  # a signal swallowed inside TensorFlow during the last steps
        return finish("complete")
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except Exception as exc:  # noqa: BLE001 - one failed pack must not stop the grid
        for manifest in manifests:
            manifest["error"] = _one_line(exc)
            manifest["traceback"] = traceback.format_exc()
        return finish("failed")


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


EVENT_TAGS = (STEP_LOSS_TAG, "epoch_loss", "epoch_accuracy", *(PREFIX + t for t in STEP_TAGS + EPOCH_TAGS))
# What `tf.summary.scalar` attaches to each value: the scalars plugin's metadata.
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None).SerializeToString()


def _write_rows_impl(handles, offsets, tags, values, steps):
    """Rows offsets[k] ≤ r < offsets[k + 1] to the summary writer handles[k]: the event
    `tf.summary.scalar(EVENT_TAGS[tags[r]], values[r], step=steps[r])` writes."""
    names = tf.constant(EVENT_TAGS)
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


def warm_up_events(members: int) -> None:
    """Trace the event writer for packs of `members` runs (on throwaway writers)."""
    streams = len(SPLITS) * members
    if streams in _WRITE_ROWS:
        return
    with tempfile.TemporaryDirectory(prefix="events-warm-up-") as tmp:
        writers = [tf.summary.create_file_writer(f"{tmp}/{k}") for k in range(streams)]
        _write_rows(streams)([w._resource for w in writers], np.zeros(streams + 1, np.int32),
                                 np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        for w in writers:
            w.close()


class PackEvents:
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
        self.tag_ids = {tag: i for i, tag in enumerate(EVENT_TAGS)}
        self.rows: list[tuple[int, int, float, int]] = []  # (stream, tag id, value, step)
        # Streams: per split (SPLITS order), the members' writers. `_resource`
        # is the handle `tf.summary.write` itself uses; TensorFlow has no public accessor.
        self.handles = [w[split]._resource for split in SPLITS for w in writers]

    def add(self, member: int, split: str, values: dict, step: int) -> None:
        """Scalars for one member's split ("train" or "validation") at `step`; None and
        non-finite values are left out, as `trainer.tblog.write_scalars` does."""
        stream = SPLITS.index(split) * self.members + member
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.rows.append((stream, self.tag_ids[tag], float(value), int(step)))

    def write(self, losses: np.ndarray, first_step: int, counts: np.ndarray) -> None:
        """losses[:counts[j], j] at steps first_step, first_step + 1, … and the added rows."""
        streams, tags, values, steps = [], [], [], []
        for j in range(self.members):
            n = int(counts[j])
            streams.append(np.full(n, SPLITS.index("train") * self.members + j))
            tags.append(np.zeros(n, np.int32))
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
