"""The gradient-noise arithmetic of the fused engine's pack (`trainer.packed_model`):
per-member dot products of gradients, per-example gradient norms from one training
step's tensors (contract.noise's per-example estimator, for members without batch
norm), and the probe's gradients at fixed weights (its other estimator). A mixin: it
reads the pack's members, units, trainable variables and forward pass."""
from __future__ import annotations

import math

import tensorflow as tf


def member_sums(pack) -> list:
    """Per trainable variable of `pack`, a function from an elementwise product of
    two gradients (float32) to its sum per member, [members] in float64."""
    # Rows of at most a layer's width are summed in float32, and those partial sums in
    # float64 (as exact as summing it all in float64 to ≈1e-7, and ≈8 ms a probe faster).
    # The first kernel is [inputs, members × units]: summed over inputs and units without
    # a transpose; members without batch norm have no gamma or beta (0).
    m, first_units = pack.members, pack.units[0]

    def first_kernel(t):
        rows = tf.reduce_sum(tf.reshape(t, [pack.inputs, m, first_units]), axis=2)
        return tf.reduce_sum(tf.cast(rows, tf.float64), axis=0)

    def per_member(t, members):  # t: [members, …, width], or [members × width]
        width = t.shape[-1] if t.shape.rank > 1 else t.shape[0] // members
        rows = tf.reduce_sum(tf.reshape(t, [members, -1, width]), axis=2)
        return tf.reduce_sum(tf.cast(rows, tf.float64), axis=1)

    def stacked(t):
        return per_member(t, m)

    def normed(t):
        return tf.concat([tf.zeros([m - pack.normed], tf.float64), per_member(t, pack.normed)], axis=0)

    return ([first_kernel] + [stacked] * (len(pack.kernels) - 1)
            + [stacked] * len(pack.biases) + [normed] * (2 * len(pack.norms)))


class PackNoise:
    """The pack's gradient-noise methods (mixed into `PackedMLP`)."""

    def _example_norms(self, taps, deltas, weight, count, x_sq, rows: int):
        """Per member without batch norm (NaN for the others, which the probe measures):
        the mean of |g_i|² over the real rows among the batch's first `rows` (a random
        subset: the batch is shuffled), g_i the gradient of example i's loss. The loss is
        the mean over `count` rows, so g_i = count·a_iᵀδ_i, with δ_i the row of the loss's
        gradient at a dense layer's output and a_i of its input: per layer
        (|a_i|² + 1)·|δ_i|² (kernel and bias); x_sq: the batch's |x_i|², the first
        layer's |a_i|². Written by hand: neither Keras nor TensorFlow gives per-example
        gradient norms without a backward pass per example."""
        def norms(t):  # squared norm of each row: [members, rows]
            return tf.reduce_sum(tf.square(t), axis=-1)

        plain = self.members - self.normed
        total = 0.0
        for (kind, a, _), d in zip(taps, deltas):
            if kind == "norm":
                continue
            if a.shape.rank == 2:  # the first layer: one input for every member
                per = tf.reshape(d[:rows], [-1, self.members, self.units[0]])[:, :plain]
                total += tf.transpose(tf.reduce_sum(tf.square(per), axis=2)) * (x_sq[:rows] + 1)[None]
            else:
                total += norms(d[:plain, :rows]) * (norms(a[:plain, :rows]) + 1)
        w = weight[:rows]
        c = tf.cast(count, tf.float64)
        mean = tf.reduce_sum(tf.cast(total * w[None], tf.float64), axis=1) * c * c / tf.cast(tf.reduce_sum(w), tf.float64)
        return tf.concat([mean, tf.fill([self.normed], tf.constant(math.nan, tf.float64))], axis=0)

    def _gradient(self, x, y):
        """The members' gradients at the current weights, as a training step sees them
        (batch statistics) but changing nothing (no moving-statistics update)."""
        weight = tf.ones([tf.shape(x)[0]])
        count = tf.reduce_sum(weight)
        with tf.GradientTape() as tape:  # members before `probe_from`: zero gradients, not computed
            loss, _ = self._losses(self.forward(x, weight, count, training=True, first=self.probe_from),
                                   y, weight, count)
            total = tf.reduce_sum(loss)
        return tape.gradient(total, self.trainable)

    def _squares(self, grads):
        """Per member without batch norm (NaN for the others): |g|² of a gradient (a list
        like `trainable`), summed in float32, returned as float64: as `_dot(g, g)` to
        ≈1e-6 and ≈0.1 ms a step faster at batch 64 (measured), the first kernel summed
        over its rows first."""
        plain, layers, units = self.members - self.normed, len(self.kernels), self.units[0]

        def per_member(t):
            return tf.reduce_sum(tf.reshape(tf.square(t), [plain, -1]), axis=1)

        first = tf.reduce_sum(tf.square(grads[0][:, :plain * units]), axis=0)
        parts = [tf.reduce_sum(tf.reshape(first, [plain, units]), axis=1), per_member(grads[layers][:plain * units])]
        parts += [per_member(g[:plain]) for g in grads[1:layers] + grads[layers + 1:2 * layers]]
        return tf.concat([tf.cast(tf.add_n(parts), tf.float64),
                          tf.fill([self.normed], tf.constant(math.nan, tf.float64))], axis=0)

    def _dot(self, a, b):
        """Per member: the dot product of two gradients (lists like `trainable`), float64."""
        return tf.add_n([member_sum(ga * gb) for member_sum, ga, gb in zip(self._member_sums, a, b)])

    def _probe_noise(self, xs, ys):
        """As `trainer.noise_probe.GradientProbe.measure`, per member: mean |G_small|² over
        the k batches xs[i] and |G_big|² of their mean; and that mean (for the cosine).
        The k gradients in one vectorized pass (batched matmuls, each batch its own
        batch-norm statistics): 4–31% less time a probe than a loop over them (measured
        at batch 128–1024 on the lab pack, 15 alternating rounds)."""
        k = tf.cast(tf.shape(xs)[0], tf.float64)
        grads = tf.vectorized_map(lambda batch: self._gradient(*batch), (xs, ys))  # each [k, …]
        # Σ_i |g_i|² per member: the sum over i of the squares, then per member.
        squares = tf.add_n([member_sum(tf.reduce_sum(tf.square(g), axis=0))
                            for member_sum, g in zip(self._member_sums, grads)])
        big = [tf.reduce_mean(g, axis=0) for g in grads]
        return squares / k, self._dot(big, big), big
