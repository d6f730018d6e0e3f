"""The gradient noise scale measured by the Keras engine: a probe that takes mini-batch
gradients at fixed weights, in-graph sums for the loss curve's roughness, and the Keras
callback that logs the `gradient/` scalars (estimator and schedule: `contract.noise`)."""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from contract.noise import NoiseSchedule
from trainer.events import write_scalars


class GradientProbe:
    """Mini-batch gradients at the model's current weights, changing no model state.

    `stateless_call` runs the forward pass with the weights given as tensors, so batch
    normalization uses batch statistics exactly as in a training step but its moving
    averages are not updated, and nothing is applied to the weights.
    """

    def __init__(self, model, loss: str):
        self.model = model
        size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        loss_fn = keras.losses.get(loss)  # per-example losses; the batch loss is their mean

        def flat_gradient(trainable, non_trainable, x, y):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
                loss_value = tf.reduce_mean(loss_fn(y, y_pred))
            grads = tape.gradient(loss_value, trainable)
            return tf.concat([tf.reshape(tf.cast(g, tf.float64), [-1]) for g in grads], axis=0)

        def weights():
            return ([tf.identity(v.value) for v in model.trainable_variables],
                    [tf.identity(v.value) for v in model.non_trainable_variables])

        @tf.function(reduce_retracing=True)
        def gradient(x, y):
            return flat_gradient(*weights(), x, y)

        def small_batches(trainable, non_trainable, xs, ys):
            k = tf.shape(xs)[0]
            total = tf.zeros([size], tf.float64)
            squares = tf.constant(0.0, tf.float64)
            for i in tf.range(k):
                g = flat_gradient(trainable, non_trainable, xs[i], ys[i])
                total += g
                squares += tf.reduce_sum(g * g)
            big = total / tf.cast(k, tf.float64)
            return squares / tf.cast(k, tf.float64), big

        @tf.function(reduce_retracing=True)
        def measure(xs, ys, x_one, y_one):
            trainable, non_trainable = weights()
            small_sq, big = small_batches(trainable, non_trainable, xs, ys)
            one = flat_gradient(trainable, non_trainable, x_one, y_one)
            cosine = tf.reduce_sum(one * big) / (tf.norm(one) * tf.norm(big))
            return small_sq, tf.reduce_sum(big * big), cosine

        @tf.function(reduce_retracing=True)
        def measure_noise(xs, ys):
            small_sq, big = small_batches(*weights(), xs, ys)
            return small_sq, tf.reduce_sum(big * big)

        self._gradient, self._measure, self._measure_noise = gradient, measure, measure_noise

    def gradient(self, x, y) -> np.ndarray:
        """The flat gradient (float64) of the mean loss over the batch (x, y)."""
        return self._gradient(x, y).numpy()

    def measure(self, xs, ys, x_one=None, y_one=None) -> tuple[float, float, float | None]:
        """From k stacked small batches (xs: k×B_small×…) and one batch of the run's size:
        (|G_small|² averaged over the k, |G_big|² of their mean, cosine(one, big)); the
        cosine None without the one batch."""
        if x_one is None:
            small_sq, big_sq = self._measure_noise(xs, ys)
            return float(small_sq), float(big_sq), None
        small_sq, big_sq, cosine = self._measure(xs, ys, x_one, y_one)
        return float(small_sq), float(big_sq), float(cosine)


class LossDiffs:
    """In-graph sums of step-to-step loss differences within an epoch, for `roughness`.

    The step loss exists only inside the compiled training step (several steps run per
    call), so the sums are kept in variables there and read once per epoch. Plain
    attributes of a plain object: Keras does not count them as model weights.
    """

    def __init__(self):
        def var():
            return tf.Variable(0.0, dtype=tf.float64, trainable=False)

        self.prev, self.seen, self.n, self.s1, self.s2 = var(), var(), var(), var(), var()

    def update(self, loss) -> None:
        loss = tf.cast(loss, tf.float64)
        valid = tf.cast(self.seen > 0, tf.float64)
        d = (loss - self.prev) * valid
        self.n.assign_add(valid)
        self.s1.assign_add(d)
        self.s2.assign_add(d * d)
        self.prev.assign(loss)
        self.seen.assign_add(1.0)

    def read_and_reset(self) -> float:
        """Sample std (ddof 1) of this epoch's differences, NaN under two; then start anew."""
        n, s1, s2 = float(self.n.numpy()), float(self.s1.numpy()), float(self.s2.numpy())
        for v in (self.prev, self.seen, self.n, self.s1, self.s2):
            v.assign(0.0)
        if n < 2:
            return math.nan
        return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1))


class GradientNoise(keras.callbacks.Callback):
    """Measures the noise scale on `contract.noise.NoiseSchedule`'s schedule (each time
    an epoch has seen another `settings.every_examples` examples, and at each epoch end)
    and writes the `gradient/` scalars to the train writer.

    With several steps per execution Keras calls back once per execution, so a
    measurement lands on the first callback at or after each due step (two due within
    one execution give one measurement); the logged step is the exact global step the
    weights were at.
    """

    def __init__(self, settings, *, x, y, batch_size: int, loss: str, seed: int, writer):
        super().__init__()
        self.schedule = NoiseSchedule(settings, examples=len(x), batch_size=batch_size, seed=seed)
        self.x, self.y, self.loss, self.writer = x, y, loss, writer
        self.probe = None

    def on_train_begin(self, logs=None):
        self.probe = GradientProbe(self.model, self.loss)
        self.model.loss_diffs = LossDiffs()

    def on_train_batch_end(self, batch, logs=None):
        self._measure(int(self.model.optimizer.iterations.numpy()), epoch_end=False)

    def on_epoch_end(self, epoch, logs=None):
        self._measure(int(self.model.optimizer.iterations.numpy()), epoch_end=True)
        write_scalars(self.writer, self.schedule.epoch_values(0, self.model.loss_diffs.read_and_reset()), epoch)

    def _measure(self, step: int, epoch_end: bool) -> None:
        plan = self.schedule.plan(step, epoch_end)
        if plan is None:
            return
        rows, one = plan
        s = self.schedule.settings
        xs = self.x[rows.ravel()].reshape((s.batches, s.small_batch) + self.x.shape[1:])
        ys = self.y[rows.ravel()].reshape((s.batches, s.small_batch) + self.y.shape[1:])
        x_one, y_one = (self.x[one], self.y[one]) if len(one) else (None, None)
        small_sq, big_sq, cosine = self.probe.measure(xs, ys, x_one, y_one)
        (values,) = self.schedule.record(step, [small_sq], [big_sq], [cosine])
        write_scalars(self.writer, values, step)

    def summary(self) -> dict:
        """For run.json: the settings and how many measurements were taken."""
        return self.schedule.summary()
