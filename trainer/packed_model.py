"""The fused engine's model: the members of a pack as one set of stacked variables, with
compiled functions for a chunk of training steps, the validation pass and the gradient
probe.

Runs that differ only in initializer and batch norm (same architecture, optimizer,
learning rate, batch size, epochs and seed) see the same batches in the same order, so
they can share each step: their first layers become one wide matmul, later layers batched
matmuls over a leading "member" axis. Members share no weights and the loss is the sum of
their losses, so each member's gradient is its own loss's gradient; every optimizer we
offer updates element by element, so each member trains as it would alone (up to float
rounding in the wider matmul).

Written by hand because neither Keras nor TensorFlow trains several independent models
as one program (Keras has no vmap over models on the TensorFlow backend), and on a
laptop CPU it is per-step overhead, not arithmetic, that makes small models slow. The
members' initial weights come from the same Keras models `model.fit` would train
(`trainer.models.build_model`), and the optimizer is Keras'. The step loop around it is
`trainer.packed`.
"""
from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from contract.spec import RunSpec
from trainer import events
from trainer.data import Dataset
from trainer.models import build_model, make_optimizer, summarize
from trainer.packed_data import Tensors, tensors
from trainer.packed_noise import PackNoise, member_sums

# keras.layers.BatchNormalization's defaults, which build_model uses.
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
# The per-example estimator takes its norms on one training step in every
# ⌊EXAMPLE_NORM_EVERY / batch⌋ (and on each measurement's step), and on at most
# EXAMPLE_NORM_ROWS rows of it (mean |g_i|² over a random subset is still unbiased; |G_B|²
# is the whole batch's): measured at batch 64, norms on every row of every step cost ≈35%
# of a step, while a run's B_simple hardly depends on how many rows give it (a measurement
# averages its steps since the last one).
EXAMPLE_NORM_EVERY = EXAMPLE_NORM_ROWS = 256


class Members(NamedTuple):
    """What a pack takes from its runs: read from the same Keras models `model.fit` would
    train (`read_members`)."""
    specs: list[RunSpec]        # batch-norm members last
    units: list[int]            # the hidden layers' widths, the same for every member
    summaries: list[dict]       # per member: the model summary for run.json
    values: list[np.ndarray]    # initial values in the order of `PackedMLP.state`


def read_members(specs: list[RunSpec], input_shape: tuple[int, ...], classes: int) -> Members:
    """The members' initial values: kernels, biases, then per hidden layer gamma, beta,
    moving mean and variance of the normed members."""
    if [s.uses_batch_norm for s in specs] != sorted(s.uses_batch_norm for s in specs):
        raise ValueError("members with batch norm must come last")
    if len({s.pack_key() for s in specs}) != 1:
        raise ValueError("a pack's members must differ only in initializer and batch norm")
    dense, norms, summaries = [], [], []
    for spec in specs:
        model = build_model(spec, input_shape=input_shape, classes=classes)
        summaries.append(summarize(model))
        dense.append([(l.kernel.numpy(), l.bias.numpy()) for l in model.layers
                      if isinstance(l, keras.layers.Dense)])
        if spec.uses_batch_norm:
            norms.append([[v.numpy() for v in (l.gamma, l.beta, l.moving_mean, l.moving_variance)]
                          for l in model.layers if isinstance(l, keras.layers.BatchNormalization)])
    kernels = [np.concatenate([d[0][0] for d in dense], axis=1)]
    biases = [np.concatenate([d[0][1] for d in dense])]
    for layer in range(1, len(dense[0])):
        kernels.append(np.stack([d[layer][0] for d in dense]))
        biases.append(np.stack([d[layer][1][None] for d in dense]))
    normed = [np.stack([n[layer][j][None] for n in norms]) for layer in range(len(norms[0]) if norms else 0)
              for j in range(4)]
    return Members(specs=list(specs), units=[k.shape[1] for k, _ in dense[0][:-1]], summaries=summaries,
                   values=[np.asarray(v, np.float32) for v in kernels + biases + normed])


class PackedMLP(PackNoise):
    """The members' dense layers stacked on a leading member axis (members with batch
    norm last, so batch norm applies to one contiguous block), with compiled functions
    for a chunk of training steps, evaluation and gradient probes.

    Variables: the first layer's kernel is [inputs, members × units] (one matmul for all
    members: they share the input), later kernels [members, in, out], biases and batch
    norm parameters [members, 1, units].
    """

    def __init__(self, specs: list[RunSpec], *, input_shape: tuple[int, ...], classes: int,
                 probe: tuple[int, int] | None = None, per_example: bool = False):
        # per_example: each training step also returns its per-example gradient norms
        # (`_example_norms`), for contract.noise's per-example estimator.
        self.per_example = per_example
        # The probe's first member: with per-example norms for the members without batch
        # norm, it takes the gradients of the batch-norm members only.
        self.probe_from = sum(not s.uses_batch_norm for s in specs) if per_example else 0
        self.key = structure_key(specs, input_shape, classes, per_example, probe)
        first = specs[0]
        self.input_shape, self.classes = tuple(input_shape), classes
        self.members = len(specs)
        self.normed = sum(s.uses_batch_norm for s in specs)
        self.inputs = int(np.prod(input_shape))
        self.activation = keras.activations.get("linear" if first.architecture == "linear" else first.activation)
        members = read_members(specs, self.input_shape, classes)
        self.units = members.units  # fixed by the structure: `_unpack` and `forward` read it
        self._take(members, probe)
        kernels, biases, norms = self._unpack(members.values)
        self.kernels = [tf.Variable(v) for v in kernels]
        self.biases = [tf.Variable(v) for v in biases]
        # Per hidden layer: gamma, beta, moving mean, moving variance of the normed members.
        self.norms = [[tf.Variable(v, trainable=j < 2) for j, v in enumerate(n)] for n in norms]
        self.state = self.kernels + self.biases + [v for n in self.norms for v in n]
        self.trainable = self.kernels + self.biases + [v for n in self.norms for v in n[:2]]
        self.optimizer = make_optimizer(first)
        self.optimizer.build(self.trainable)
        self._optimizer_start = [v.numpy() for v in self.optimizer.variables]
        self._member_sums = member_sums(self)
        # The training program, made at the first call with the batch sizes left open in its
        # signature (the probe inside it): one trace then serves every pack this object
        # trains (`load`), and XLA compiles each batch size once.
        self.train_chunk = None
        self.batch_sizes: set[int] = set()  # those `train_chunk` has run with (so XLA compiled)
        self._pending: dict[str, Future] = {}  # see warm_up

    def validator(self, t: Tensors):
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

    def _take(self, members: Members, probe: tuple[int, int] | None) -> None:
        """Hold `members` as the runs this pack trains (their values are assigned by the
        caller): their specs and model summaries, and the probe's shape."""
        self.specs, self.summaries = members.specs, members.summaries
        # (batches, small batch) of the gradient-noise probe, or None: no probe.
        self.probe_shape = probe

    def load(self, specs: list[RunSpec], probe: tuple[int, int] | None) -> None:
        """Start over as the pack of `specs` (same `structure_key`): their initial weights,
        the optimizer's starting state; the traced and compiled functions are kept."""
        if structure_key(specs, self.input_shape, self.classes, self.per_example, probe) != self.key:
            raise ValueError("a pack can only be loaded with runs of the same structure")
        members = read_members(specs, self.input_shape, self.classes)
        for variable, value in zip(self.state, members.values):
            variable.assign(value)
        self._take(members, probe)
        for variable, value in zip(self.optimizer.variables, self._optimizer_start):
            variable.assign(value)

    def _functions(self, t: Tensors) -> None:
        if self.train_chunk is not None:
            return
        def spec(tensor, open_dims):  # the first `open_dims` dimensions left open
            return tf.TensorSpec([None] * open_dims + tensor.shape[open_dims:].as_list(), tensor.dtype)

        # autograph=False: the loops are written as tf.while_loop, and converting Keras'
        # optimizer code with autograph would cost ≈1 s of tracing per pack. Two programs:
        # the probe after the step's update, or before it with the step's gradient
        # (`_train_chunk`'s `with_step`; `takes_step_gradient` says which a batch size gets).
        signature = [spec(t.x, 1), spec(t.y, 1), spec(t.x_sq, 1), tf.TensorSpec([None, None], tf.int32),
                     tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32),
                     tf.TensorSpec([None, None, None], tf.int32), tf.TensorSpec([None], tf.int32),
                     tf.TensorSpec([None], tf.int32)]
        self.train_chunk, self._train_chunk_with_step = (
            tf.function(functools.partial(self._train_chunk, with_step=with_step), jit_compile=True,
                        autograph=False, input_signature=signature) for with_step in (False, True))

    def takes_step_gradient(self, batch: int) -> bool:
        """Whether the probe at this batch size runs before the step's update and takes the
        step's own gradient (contract.noise): at batches of at least B_small, where it gives
        |G|² the weight λ ≥ 2/(k + 1). Below, it would gain little: λ 0.25 at batch 64 with
        4 × 128, and the estimator's error stayed 0.13–0.14 on the lab grid with it."""
        return self.probe_shape is not None and batch >= self.probe_shape[1]

    def warm_up(self, data: Dataset, steps_per_execution: int) -> None:
        """Trace and compile the functions with the shapes training will use, changing no
        state (zero steps), so that this can run in a thread while another pack trains.
        What training needs only after its first steps (the validation pass, the event
        writer) is traced in the background thread, while
        XLA compiles the training program here (C++, without the GIL) and on into the
        pack's training; `run_chunk` waits for it where it is used."""
        t = tensors(data)
        self._functions(t)
        _BACKGROUND.submit(events.warm_up, self.members)  # the writing thread waits for it if need be
        self._pending = {"validate": _BACKGROUND.submit(self._warm_up_validator, t)}
        batch = self.specs[0].batch_size
        self.run_chunk(data, np.zeros((steps_per_execution, batch), np.int32),
                       np.zeros(steps_per_execution, np.int32), 0)

    def _warm_up_validator(self, t: Tensors) -> None:
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
                  validate: bool = False, probes: dict[int, np.ndarray] | None = None,
                  norms_at: list[int] = ()) -> dict:
        """`steps` training steps on the rows idx[i, :counts[i]] of the training set; at
        step i (0-based) in `probes`, the probe on its small batches' rows [k, B_small];
        then, if `validate`, the validation pass. numpy arrays [len(idx), members]:
        "losses" (the first `steps` rows real); with the probe "probe_small", "probe_big"
        (`_probe_noise`), "probe_cross" (the dot product of step i's own gradient with the
        probe's big batch gradient, where `takes_step_gradient`; else NaN) and
        "probe_cosine" (theirs), NaN at steps without it; with per-example norms "example_sq", "batch_sq"
        (`_example_norms`), on one step in ⌊EXAMPLE_NORM_EVERY / batch⌋ and on the steps
        `norms_at`, NaN elsewhere. Per member: "loss_sum" and "right_sum" (loss ×
        examples, right answers), "val_loss", "val_accuracy"."""
        t = tensors(data)
        self._functions(t)
        if probes and self.probe_shape is None:
            raise ValueError("this pack was built without a gradient probe")
        k, small = self.probe_shape if self.probe_shape is not None else (1, 1)
        probe_rows = np.zeros((len(idx), k, small), np.int32)  # one shape a chunk size: one XLA program
        probe_at, norm_at = np.zeros(len(idx), np.int32), np.zeros(len(idx), np.int32)
        for i, rows in (probes or {}).items():
            probe_rows[i], probe_at[i] = rows, 1
        norm_at[list(norms_at)] = 1
        program = self._train_chunk_with_step if self.takes_step_gradient(idx.shape[1]) else self.train_chunk
        out = program(t.x, t.y, t.x_sq, idx, counts, tf.constant(steps, tf.int32), probe_rows, probe_at, norm_at)
        self.batch_sizes.add(idx.shape[1])
        if validate:
            self._ready("validate")
            out["val_loss_sum"], out["val_right"] = self.validator(t)(self.state, t.x_val, t.y_val, t.w_val)
        out = {key: value.numpy() for key, value in out.items()}
        if validate:
            n_val = len(data.x_val)
            out["val_loss"], out["val_accuracy"] = out.pop("val_loss_sum") / n_val, out.pop("val_right") / n_val
        return out

    @property
    def steps(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # -- the model --------------------------------------------------------------------

    def forward(self, x, weight, count, *, training: bool, update_statistics: bool = False, state=None,
                taps: list | None = None, first: int = 0):
        """Logits [members, batch, classes] for x [batch, inputs]; `weight` masks padding
        rows (batch statistics and losses use only the `count` real ones). `state`: values
        in the order of `self.state` to use instead of the variables (no statistics update).
        `taps`: a list to append, per dense layer, ("dense", its input, its output before
        the activation) and, per batch-norm layer, ("norm", the normalized values, its
        output) of the normed members, for `_example_norms`. `first`: the members from
        `first` on only (at most the first normed one; the probe's)."""
        kernels, biases, norms = self._unpack(self.state if state is None else state)
        u = self.units[0]
        z = tf.matmul(x, kernels[0][:, first * u:]) + biases[0][first * u:]
        if taps is not None:
            taps.append(("dense", x, z))
        h = tf.transpose(tf.reshape(self.activation(z), [-1, self.members - first, u]), [1, 0, 2])
        kernels, biases = kernels[:1] + [k[first:] for k in kernels[1:]], biases[:1] + [b[first:] for b in biases[1:]]
        for layer in range(len(self.units)):
            if layer:
                z = tf.matmul(h, kernels[layer]) + biases[layer]
                if taps is not None:
                    taps.append(("dense", h, z))
                h = self.activation(z)
            if self.normed:
                h = self._batch_norm(h, norms[layer], weight, count, training, update_statistics, taps, first)
        logits = tf.matmul(h, kernels[-1]) + biases[-1]
        if taps is not None:
            taps.append(("dense", h, logits))
        return logits

    def _unpack(self, state: list) -> tuple[list, list, list]:
        """Values (or variables) in the order of `self.state` as (kernels, biases, per
        normed hidden layer [gamma, beta, moving mean, moving variance])."""
        layers = len(self.units) + 1
        rest = state[2 * layers:]
        return state[:layers], state[layers:2 * layers], [rest[4 * i:4 * i + 4] for i in range(len(rest) // 4)]

    def _batch_norm(self, h, norm, weight, count, training, update_statistics, taps=None, first=0):
        gamma, beta, moving_mean, moving_var = norm
        plain, normed = h[:self.members - self.normed - first], h[self.members - self.normed - first:]
        if training:
            w = weight[None, :, None]
            mean = tf.reduce_sum(normed * w, axis=1, keepdims=True) / count
            var = tf.reduce_sum(tf.square(normed - mean) * w, axis=1, keepdims=True) / count
            if update_statistics:
                moving_mean.assign(moving_mean * BN_MOMENTUM + mean * (1 - BN_MOMENTUM))
                moving_var.assign(moving_var * BN_MOMENTUM + var * (1 - BN_MOMENTUM))
        else:
            mean, var = moving_mean, moving_var
        hat = (normed - mean) * tf.math.rsqrt(var + BN_EPSILON)
        normed = hat * gamma + beta
        if taps is not None:
            taps.append(("norm", hat, normed))
        return tf.concat([plain, normed], axis=0)

    def _losses(self, logits, y, weight, count):
        """Per member: the mean loss over the real rows, and the count of right answers."""
        labels = tf.broadcast_to(y[None], [tf.shape(logits)[0], tf.shape(y)[0]])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        right = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.float32)
        return tf.reduce_sum(ce * weight, axis=1) / count, tf.reduce_sum(right * weight, axis=1)

    # -- compiled functions -----------------------------------------------------------

    def _train_chunk(self, x_all, y_all, x_sq, idx, counts, n_steps, probe_rows, probe_at, norm_at, *, with_step):
        """`n_steps` training steps on the rows idx[i, :counts[i]] (x_sq: each training
        row's squared norm, for `_example_norms`, taken where norm_at[i] and on one step
        in ⌊EXAMPLE_NORM_EVERY / batch⌋); at step i where probe_at[i], the probe's small
        batches probe_rows[i] ([k, B_small]), `with_step` at the weights of step i's
        gradient, before its update (so that gradient, of other rows, is a second estimate
        of the same gradient: contract.noise), else at the weights the update left; and
        the dot product and cosine of step i's gradient with their mean (one program for a chunk: a separate call
        and a chunk cut at each measurement cost ≈5 ms each, more than the probe's
        arithmetic)."""
        batch = tf.shape(idx)[1]

        def step(i, losses, loss_sum, right_sum, small, big, probe_small, probe_big, probe_cross, probe_cosine):
            count = tf.cast(counts[i], tf.float32)
            weight = tf.cast(tf.range(batch) < counts[i], tf.float32)
            x, y = tf.gather(x_all, idx[i]), tf.gather(y_all, idx[i])
            taps = [] if self.per_example else None
            with tf.GradientTape() as tape:
                logits = self.forward(x, weight, count, training=True, update_statistics=True, taps=taps)
                loss, right = self._losses(logits, y, weight, count)
                total = tf.reduce_sum(loss)
            if self.per_example:
                # One backward pass for the weights and the taps' outputs (the δ_i); the
                # norms on every `every`-th step and where norm_at (NaN on the others).
                grads, deltas = tape.gradient(total, (self.trainable, [t[2] for t in taps]))

                def norms():
                    row = self._example_norms(taps, deltas, weight, count, tf.gather(x_sq, idx[i]), EXAMPLE_NORM_ROWS)
                    return (tf.tensor_scatter_nd_update(small, [[i]], row[None]),
                            tf.tensor_scatter_nd_update(big, [[i]], self._squares(grads)[None]))

                due = tf.logical_or(self.optimizer.iterations % every == 0, norm_at[i] > 0)
                small, big = tf.cond(due, norms, lambda: (small, big))
            else:
                grads = tape.gradient(total, self.trainable)
            losses = tf.tensor_scatter_nd_update(losses, [[i]], loss[None])
            if not with_step:
                self.optimizer.apply(grads, self.trainable)
            if self.probe_shape is not None:
                def probe():
                    rows = probe_rows[i]
                    small_sq, big_sq, mean = self._probe_noise(tf.gather(x_all, rows), tf.gather(y_all, rows))
                    cross = self._dot(grads, mean)
                    cosine = cross / tf.sqrt(self._dot(grads, grads) * big_sq)
                    if not with_step:  # the update came between them: no estimate of |G|² (NaN)
                        cross = tf.fill(tf.shape(cross), tf.constant(math.nan, cross.dtype))
                    return tuple(tf.tensor_scatter_nd_update(t, [[i]], v[None])
                                 for t, v in ((probe_small, small_sq), (probe_big, big_sq), (probe_cross, cross),
                                              (probe_cosine, cosine))) + (tf.identity(grads[0]),)

                # The first kernel's gradient passes through the cond, so that the update
                # after it depends on it: else XLA, free to order the probe's reads of the
                # weights after the update, copies the first kernel on every step to keep
                # its pre-update value (2.4 MB for the lab pack, ≈4% of a step at batch
                # 128–512; seen as a copy in the optimized HLO and measured).
                probe_small, probe_big, probe_cross, probe_cosine, first = tf.cond(
                    probe_at[i] > 0, probe,
                    lambda: (probe_small, probe_big, probe_cross, probe_cosine, tf.identity(grads[0])))
                grads = [first, *grads[1:]]
            if with_step:
                self.optimizer.apply(grads, self.trainable)
            return (i + 1, losses, loss_sum + loss * count, right_sum + right, small, big,
                    probe_small, probe_big, probe_cross, probe_cosine)

        zeros = tf.zeros([self.members])

        def unset(used: bool):  # [steps, members] of NaN (one row if unused)
            return tf.fill([tf.shape(idx)[0] if used else 1, self.members], tf.constant(math.nan, tf.float64))

        every = tf.cast(tf.maximum(1, EXAMPLE_NORM_EVERY // batch), tf.int64)
        probed = self.probe_shape is not None
        _, losses, loss_sum, right_sum, small, big, probe_small, probe_big, probe_cross, probe_cosine = tf.while_loop(
            lambda i, *_: i < n_steps, step,
            (tf.constant(0), tf.zeros([tf.shape(idx)[0], self.members]), zeros, zeros, unset(self.per_example),
             unset(self.per_example), unset(probed), unset(probed), unset(probed), unset(probed)))
        out = {"losses": losses, "loss_sum": loss_sum, "right_sum": right_sum}
        if self.per_example:
            out["example_sq"], out["batch_sq"] = small, big
        if self.probe_shape is not None:
            out.update(probe_small=probe_small, probe_big=probe_big, probe_cross=probe_cross, probe_cosine=probe_cosine)
        return out

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

# The validation pass per structure_key (see `PackedMLP.validator`).
_VALIDATE: dict[tuple, tf.types.experimental.PolymorphicFunction] = {}
_VALIDATE_LOCK = threading.Lock()
_VALIDATE_WARM: set[tuple] = set()  # (structure key, validation chunks' shape) compiled
# Where `PackedMLP.warm_up` traces and compiles what training needs only after its first steps.
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-up")


def structure_key(specs: list[RunSpec], input_shape: tuple[int, ...], classes: int,
                  per_example: bool = False, probe: tuple[int, int] | None = None) -> tuple:
    """Packs with equal keys have the same variables and compiled functions (the per-example
    norms and the probe's shape are compiled into the training program); they differ only
    in initializers, batch size, epochs and seed."""
    d = specs[0].to_dict()
    for name in ("initializer", "batch_norm", "batch_size", "epochs", "seed"):
        del d[name]
    return (tuple(sorted((k, repr(v)) for k, v in d.items())), tuple(s.uses_batch_norm for s in specs),
            tuple(input_shape), classes, per_example, probe)


# Packs whose training is over, kept for the next pack of the same structure: loading new
# runs into one reuses its traced functions (≈0.8 s a pack) and any XLA program already
