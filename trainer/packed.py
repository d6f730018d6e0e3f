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
import time
import traceback
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer import faults, interrupt
from trainer.data import Dataset
from trainer.models import STEP_LOSS_TAG, build_model, make_optimizer, summarize
from trainer.noise import EPOCH_TAGS, PREFIX, STEP_TAGS, NoiseScaleEMA, roughness, two_batch_estimate
from trainer.run import SPLITS, _one_line, begin_run, finish_run
from trainer.spec import Experiment, RunSpec
from trainer.tblog import write_run_hparams, write_scalars

# keras.layers.BatchNormalization's defaults, which build_model uses.
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
EVAL_CHUNK = 2048  # validation examples per call


class PackedMLP:
    """The members' dense layers stacked on a leading member axis (members with batch
    norm last, so batch norm applies to one contiguous block), with compiled functions
    for a chunk of training steps, evaluation and gradient probes.

    Variables: the first layer's kernel is [inputs, members × units] (one matmul for all
    members: they share the input), later kernels [members, in, out], biases and batch
    norm parameters [members, 1, units].
    """

    def __init__(self, specs: list[RunSpec], *, input_shape: tuple[int, ...], classes: int):
        if [s.uses_batch_norm for s in specs] != sorted(s.uses_batch_norm for s in specs):
            raise ValueError("members with batch norm must come last")
        if len({s.pack_key() for s in specs}) != 1:
            raise ValueError("a pack's members must differ only in initializer and batch norm")
        first = specs[0]
        self.members = len(specs)
        self.normed = sum(s.uses_batch_norm for s in specs)
        self.inputs = int(np.prod(input_shape))
        self.activation = keras.activations.get("linear" if first.architecture == "linear" else first.activation)
        self.summaries = []
        dense, norms = [], []
        self.specs = list(specs)
        for spec in specs:
            model = build_model(spec, input_shape=input_shape, classes=classes)
            self.summaries.append(summarize(model))
            dense.append([(l.kernel.numpy(), l.bias.numpy()) for l in model.layers
                          if isinstance(l, keras.layers.Dense)])
            if spec.uses_batch_norm:
                norms.append([[v.numpy() for v in (l.gamma, l.beta, l.moving_mean, l.moving_variance)]
                              for l in model.layers if isinstance(l, keras.layers.BatchNormalization)])
        self.units = [k.shape[1] for k, _ in dense[0][:-1]]
        m = self.members

        def var(value, trainable=True):
            return tf.Variable(np.asarray(value, np.float32), trainable=trainable)

        self.kernels = [var(np.concatenate([d[0][0] for d in dense], axis=1))]
        self.biases = [var(np.concatenate([d[0][1] for d in dense]))]
        for layer in range(1, len(dense[0])):
            self.kernels.append(var(np.stack([d[layer][0] for d in dense])))
            self.biases.append(var(np.stack([d[layer][1][None] for d in dense])))
        # Per hidden layer: gamma, beta, moving mean, moving variance of the normed members.
        self.norms = [[var(np.stack([n[layer][j][None] for n in norms]), trainable=j < 2) for j in range(4)]
                      for layer in range(len(self.units))] if norms else []
        self.trainable = self.kernels + self.biases + [v for n in self.norms for v in n[:2]]
        self.optimizer = make_optimizer(first)
        self.optimizer.build(self.trainable)
        # How each trainable variable splits into the members' parameters: [members, -1].
        first_units = self.units[0]
        views = [lambda t: tf.reshape(tf.transpose(tf.reshape(t, [self.inputs, m, first_units]), [1, 0, 2]),
                                      [m, -1]),
                 *[lambda t: tf.reshape(t, [m, -1])] * (len(self.kernels) - 1),
                 lambda t: tf.reshape(t, [m, -1]),
                 *[lambda t: tf.reshape(t, [m, -1])] * (len(self.biases) - 1)]
        def normed_view(t):  # members without batch norm have no such parameters: zeros
            t = tf.reshape(t, [self.normed, -1])
            return tf.concat([tf.zeros([m - self.normed, t.shape[1]], t.dtype), t], axis=0)

        views += [normed_view] * (2 * len(self.norms))
        self._views = views
        # autograph=False: the loops are written as tf.while_loop, and converting Keras'
        # optimizer code with autograph would cost ≈1 s of tracing per pack.
        self.train_chunk = tf.function(self._train_chunk, jit_compile=True, autograph=False)
        # Evaluation runs once an epoch: XLA's compilation (≈0.4 s) would cost more than it saves.
        self.evaluate_chunk = tf.function(self._evaluate_chunk, autograph=False)
        # Not compiled with XLA: called a few dozen times per run, its compilation (≈2 s
        # at batch 64) would cost more than it saves (≈0.01 s a call).
        self.probe = tf.function(self._probe, autograph=False)

    def warm_up(self, experiment: Experiment, data: Dataset) -> None:
        """Trace and compile every function with the shapes training will use, changing no
        state (zero steps; evaluation and probes only read), so that this can run in a
        thread while another pack trains."""
        x, y = train_tensors(data)
        chunk, batch = experiment.steps_per_execution, self.specs[0].batch_size
        self.train_chunk(x, y, np.zeros((chunk, batch), np.int32), np.zeros(chunk, np.int32),
                         tf.constant(0, tf.int32))
        rows = min(EVAL_CHUNK, len(data.x_val))
        self.evaluate_chunk(np.zeros((rows, self.inputs), np.float32), np.zeros(rows, data.y_val.dtype),
                            np.ones(rows, np.float32))
        s = experiment.gradient_noise
        if s.enabled and s.big_batch <= len(data.x_train):
            one = min(batch, len(data.x_train))
            self.probe(np.zeros((s.batches, s.small_batch, self.inputs), np.float32),
                       np.zeros((s.batches, s.small_batch), data.y_train.dtype),
                       np.zeros((one, self.inputs), np.float32), np.zeros(one, data.y_train.dtype))

    @property
    def steps(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # -- the model --------------------------------------------------------------------

    def forward(self, x, weight, count, *, training: bool, update_statistics: bool = False):
        """Logits [members, batch, classes] for x [batch, inputs]; `weight` masks padding
        rows (batch statistics and losses use only the `count` real ones)."""
        h = self.activation(tf.matmul(x, self.kernels[0]) + self.biases[0])
        h = tf.transpose(tf.reshape(h, [-1, self.members, self.units[0]]), [1, 0, 2])
        for layer in range(len(self.units)):
            if layer:
                h = self.activation(tf.matmul(h, self.kernels[layer]) + self.biases[layer])
            h = self._batch_norm(h, layer, weight, count, training, update_statistics)
        return tf.matmul(h, self.kernels[-1]) + self.biases[-1]

    def _batch_norm(self, h, layer, weight, count, training, update_statistics):
        if not self.normed:
            return h
        gamma, beta, moving_mean, moving_var = self.norms[layer]
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
        """`n_steps` training steps on the rows idx[i, :counts[i]]: per step and member the
        loss [steps, members], and per member the summed loss × examples and right answers."""
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
        return losses, loss_sum, right_sum

    def _evaluate_chunk(self, x, y, weight):
        count = tf.reduce_sum(weight)
        loss, right = self._losses(self.forward(x, weight, count, training=False), y, weight, count)
        return loss * count, right

    def _gradient(self, x, y):
        """The members' gradients at the current weights, as a training step sees them
        (batch statistics) but changing nothing (no moving-statistics update)."""
        weight = tf.ones([tf.shape(x)[0]])
        count = tf.reduce_sum(weight)
        with tf.GradientTape() as tape:
            loss, _ = self._losses(self.forward(x, weight, count, training=True), y, weight, count)
            total = tf.reduce_sum(loss)
        return [tf.cast(g, tf.float64) for g in tape.gradient(total, self.trainable)]

    def _dot(self, a, b):
        """Per member: the dot product of two gradients (lists like `trainable`)."""
        return tf.add_n([tf.reduce_sum(view(ga) * view(gb), axis=1)
                         for view, ga, gb in zip(self._views, a, b)])

    def _probe(self, xs, ys, x_one, y_one):
        """As `trainer.noise_probe.GradientProbe.measure`, per member: mean |G_small|² over
        the k batches xs[i], |G_big|² of their mean, and cosine(G of (x_one, y_one), G_big)."""
        k = tf.shape(xs)[0]

        def add(i, total, squares):
            g = self._gradient(xs[i], ys[i])
            return i + 1, [t + gi for t, gi in zip(total, g)], squares + self._dot(g, g)

        _, total, squares = tf.while_loop(
            lambda i, *_: i < k, add,
            (tf.constant(0), [tf.zeros(v.shape, tf.float64) for v in self.trainable],
             tf.zeros([self.members], tf.float64)))
        big = [t / tf.cast(k, tf.float64) for t in total]
        one = self._gradient(x_one, y_one)
        big_sq = self._dot(big, big)
        cosine = self._dot(one, big) / tf.sqrt(self._dot(one, one) * big_sq)
        return squares / tf.cast(k, tf.float64), big_sq, cosine


_TENSORS: dict[int, tuple] = {}


def train_tensors(data: Dataset) -> tuple[tf.Tensor, tf.Tensor]:
    """The training arrays as tensors [examples, inputs] and [examples], made once per
    dataset and shared by every pack this process trains."""
    entry = _TENSORS.get(id(data))
    if entry is None or entry[0] is not data:
        _TENSORS.clear()
        entry = (data, tf.constant(data.x_train.reshape(len(data.x_train), -1)), tf.constant(data.y_train))
        _TENSORS[id(data)] = entry
    return entry[1], entry[2]


def prepare(experiment: Experiment, specs: list[RunSpec], data: Dataset) -> PackedMLP:
    """A pack built and compiled, ready for `train_pack(..., prepared=)`; the grid runs this
    for the next pack while the current one trains (tracing and XLA compilation take
    1–3 s a pack, mostly on one core)."""
    specs = sorted(specs, key=lambda s: s.uses_batch_norm)
    pack = PackedMLP(specs, input_shape=data.x_train.shape[1:], classes=int(data.y_train.max()) + 1)
    pack.warm_up(experiment, data)
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
    end), an EMA per member; values are written to each member's train writer."""

    def __init__(self, settings, pack: PackedMLP, *, x, y, batch_size: int, seed: int, writers):
        if settings.big_batch > len(x):
            raise ValueError(f"[gradient_noise] needs batches × small_batch = {settings.big_batch} "
                             f"training examples, the data has {len(x)}")
        self.settings, self.pack, self.x, self.y = settings, pack, x, y
        self.batch_size, self.writers = batch_size, writers
        self.rng = np.random.default_rng([seed, 0x6E6F697365])  # as GradientNoise: same draws
        self.emas = [NoiseScaleEMA(settings.beta) for _ in writers]
        self.measurements = [0] * len(writers)
        self.next_due = settings.every
        self.last: list[dict] | None = None

    def after_chunk(self, step: int, alive: list[bool]) -> None:
        if step >= self.next_due:
            self.measure(step, alive)
            self.next_due = (step // self.settings.every + 1) * self.settings.every

    def measure(self, step: int, alive: list[bool]) -> list[dict]:
        s = self.settings
        idx = self.rng.choice(len(self.x), size=s.big_batch, replace=False)
        one = self.rng.choice(len(self.x), size=min(self.batch_size, len(self.x)), replace=False)
        xs = self.x[idx].reshape((s.batches, s.small_batch, -1))
        ys = self.y[idx].reshape((s.batches, s.small_batch))
        small, big, cosine = (t.numpy() for t in self.pack.probe(xs, ys, self.x[one], self.y[one]))
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
            write_scalars(self.writers[j], {PREFIX + t: m.get(t) for t in STEP_TAGS}, step)
        self.last = out
        return out

    def epoch_end(self, epoch: int, step: int, step_losses: np.ndarray, alive: list[bool]) -> None:
        last = self.last
        if last is None or not any(m.get("step") == step for m in last):
            last = self.measure(step, alive)
        for j, m in enumerate(last):
            if alive[j] and m:
                write_scalars(self.writers[j], {
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
    pack = noise = None
    start = time.perf_counter()

    def finish(status_of) -> list[dict]:
        out = []
        for j in range(m):
            status = "diverged" if state["diverged_at"][j] is not None else status_of
            final = {"loss": math.nan} if status == "diverged" else state["final"][j]
            steps = state["diverged_at"][j] or (pack.steps if pack is not None else 0)
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
            pack = PackedMLP(specs, input_shape=data.x_train.shape[1:], classes=int(data.y_train.max()) + 1)
        for manifest, summary, spec, d in zip(manifests, pack.summaries, specs, run_dirs):
            manifest["model"] = summary
            write_run_hparams(d, spec, trial_id=d.name)
        x_train, y_train = train_tensors(data)
        x_flat = data.x_train.reshape(len(data.x_train), -1)
        if experiment.gradient_noise.enabled:
            noise = PackNoise(experiment.gradient_noise, pack, x=x_flat, y=data.y_train,
                              batch_size=first.batch_size, seed=first.seed,
                              writers=[w["train"] for w in writers])
        write_steps = _step_writer([w["train"] for w in writers])
        chunk = experiment.steps_per_execution
        for epoch in range(first.epochs):
            idx, counts = _batches(len(data.x_train), first.batch_size, first.seed, epoch)
            epoch_losses, loss_sum, right_sum = [], np.zeros(m), np.zeros(m)
            for s in range(0, steps_per_epoch, chunk):
                n = min(chunk, steps_per_epoch - s)
                part_idx = np.zeros((chunk, first.batch_size), np.int32)
                part_idx[:n] = idx[s:s + n]
                part_counts = np.zeros(chunk, np.int32)
                part_counts[:n] = counts[s:s + n]
                step0 = pack.steps
                padded, sums, rights = pack.train_chunk(x_train, y_train, part_idx, part_counts,
                                                        tf.constant(n, tf.int32))
                padded = padded.numpy()
                losses = padded[:n]
                written = _record_divergence(losses, step0, state["diverged_at"])
                # The padded array: one shape, so the writer is traced once.
                write_steps(padded, tf.constant(step0 + 1, tf.int64), written)
                epoch_losses.append(losses)
                loss_sum += sums.numpy()
                right_sum += rights.numpy()
                alive = [d is None for d in state["diverged_at"]]
                if noise is not None and any(alive):
                    noise.after_chunk(pack.steps, alive)
                faults.point("step")
                interrupt.check()
                if not any(alive):
                    break
            alive = [d is None for d in state["diverged_at"]]
            if not any(alive):
                break
            val_loss, val_right = _evaluate(pack, data)
            n_train = len(data.x_train)
            for j in range(m):
                if alive[j]:
                    state["epochs"][j] = epoch + 1
                    state["final"][j] = {"loss": float(loss_sum[j] / n_train), "accuracy": float(right_sum[j] / n_train),
                                         "val_loss": float(val_loss[j]), "val_accuracy": float(val_right[j])}
            # As trainer.tblog.EpochScalars: epoch_* in train/ and validation/ at the epoch index.
            for j, final in enumerate(state["final"]):
                if alive[j]:
                    write_scalars(writers[j]["train"], {"epoch_loss": final["loss"],
                                                         "epoch_accuracy": final["accuracy"]}, epoch)
                    write_scalars(writers[j]["validation"], {"epoch_loss": final["val_loss"],
                                                              "epoch_accuracy": final["val_accuracy"]}, epoch)
            if noise is not None:
                noise.epoch_end(epoch, pack.steps, np.concatenate(epoch_losses), alive)
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


def _step_writer(writers):
    def write(losses, first_step, counts):
        for j, writer in enumerate(writers):
            def one(i, j=j):
                # At the root name scope: inside the loop the tag would read "while/step_loss".
                with tf.compat.v1.get_default_graph().name_scope(None):
                    tf.summary.scalar(STEP_LOSS_TAG, losses[i, j], step=first_step + tf.cast(i, tf.int64))
                return i + 1

            with writer.as_default():
                tf.while_loop(lambda i, j=j: i < counts[j], one, (tf.constant(0),))

    return tf.function(write, autograph=False)


def _evaluate(pack: PackedMLP, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per member: the validation loss and accuracy (inference mode: moving statistics)."""
    x = data.x_val.reshape(len(data.x_val), -1)
    n = len(x)
    size = min(EVAL_CHUNK, n)
    loss, right = np.zeros(pack.members), np.zeros(pack.members)
    for s in range(0, n, size):
        rows = min(size, n - s)
        xb = np.zeros((size, x.shape[1]), np.float32)
        yb = np.zeros(size, data.y_val.dtype)
        xb[:rows], yb[:rows] = x[s:s + rows], data.y_val[s:s + rows]
        weight = (np.arange(size) < rows).astype(np.float32)
        lo, ri = pack.evaluate_chunk(xb, yb, weight)
        loss += lo.numpy()
        right += ri.numpy()
    return loss / n, right / n


