"""A measurement for issue 16's next step, not a trainer: how repeatable B_simple is when
it is estimated in every training step from exact per-example gradient norms (B_small = 1,
B_big = the run's batch), instead of by the probe's extra rows.

    python -m bench.noise_instep                 # the lab grid's MLP, 3 seeds, 5 epochs
    python -m bench.noise_instep --quick         # 6,000 images, 2 epochs, one initializer

For a Dense layer z = aW + b the gradient of example i's loss is a_iᵀδ_i (and δ_i for b),
δ_i = ∂ℓ_i/∂z_i, so |g_i|² = |a_i|²·|δ_i|² + |δ_i|²: two row norms per layer, from tensors
the step computes anyway (written by hand: Keras and TensorFlow give no per-example norms).
With batch norm the rows are coupled through the batch statistics; here they are held
fixed for the per-example norms (their gradient through μ and σ dropped, a second backward
pass that a real implementation would fuse), and the batch gradient of the estimator is
the mean of those same per-example gradients, so |G_B|² and mean |g_i|² stay consistent.
Training itself uses the ordinary batch-norm gradient.

Per step: |G|² ≈ (B·|G_B|² − mean|g_i|²)/(B − 1), tr Σ ≈ (mean|g_i|² − |G_B|²)/(1 − 1/B),
averaged with a bias-corrected EMA whose time constant is TAU examples (β = 1 − B/TAU per
step), so every batch size averages over the same stretch of training; the final B_simple
is the ratio of the two averages. Prints, per (batch norm, batch size) cell: the mean, std
and CV over the cell's runs, beside nothing else: compare with `python -m bench.noise_cv`
on a trained `lab` grid. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import numpy as np

TAU = 150_000  # examples: the EMA's time constant (window ≈ 2·TAU, about the probe's 39 × 7,500)


def run(x, y, *, initializer: str, batch_size: int, batch_norm: bool, seed: int, epochs: int) -> float:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    kind = type(keras.initializers.get(initializer))
    w1 = tf.Variable(kind(seed=seed)((784, 128)))
    b1 = tf.Variable(tf.zeros(128))
    w2 = tf.Variable(kind(seed=seed + 1)((128, 10)))
    b2 = tf.Variable(tf.zeros(10))
    gamma, beta = tf.Variable(tf.ones(128)), tf.Variable(tf.zeros(128))
    params = [w1, b1, w2, b2] + ([gamma, beta] if batch_norm else [])
    opt = keras.optimizers.Adam(1e-3)
    opt.build(params)

    def forward(xb, frozen):
        z1 = xb @ w1 + b1
        h = tf.tanh(z1)
        hat = h
        if batch_norm:
            mean, var = tf.nn.moments(h, [0])
            scale = tf.math.rsqrt(var + 1e-3)
            if frozen:
                mean, scale = tf.stop_gradient(mean), tf.stop_gradient(scale)
            hat = (h - mean) * scale
            h = gamma * hat + beta
        z2 = h @ w2 + b2
        return z1, hat, h, z2

    @tf.function(jit_compile=True)
    def step(xb, yb):
        # The measurement first, at the weights the step's gradient is taken at (measured
        # after the update, on the batch just trained on, B_simple came out ≈1.5× higher).
        with tf.GradientTape() as tape:  # per-example deltas, statistics held fixed
            z1, hat, h, z2 = forward(xb, frozen=True)
            total = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, z2))
        dz1, dh, dz2 = tape.gradient(total, [z1, h, z2])
        rows = lambda t: tf.reduce_sum(tf.square(t), axis=1)  # noqa: E731
        per = rows(xb) * rows(dz1) + rows(dz1) + rows(h) * rows(dz2) + rows(dz2)
        parts = [tf.matmul(xb, dz1, transpose_a=True), tf.reduce_sum(dz1, 0),
                 tf.matmul(h, dz2, transpose_a=True), tf.reduce_sum(dz2, 0)]
        if batch_norm:
            per += rows(dh * hat) + rows(dh)
            parts += [tf.reduce_sum(dh * hat, 0), tf.reduce_sum(dh, 0)]
        b = tf.cast(tf.shape(xb)[0], tf.float32)
        big = tf.add_n([tf.reduce_sum(tf.square(p / b)) for p in parts])
        with tf.GradientTape() as tape:
            _, _, _, z2 = forward(xb, frozen=False)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, z2))
        opt.apply(tape.gradient(loss, params), params)
        return tf.reduce_mean(per), big

    n = len(x)
    beta_step = 1 - batch_size / TAU
    g2_avg = tr_avg = weight = 0.0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):  # full batches only
            idx = order[start:start + batch_size]
            small, big = (float(v) for v in step(x[idx], y[idx]))
            g2 = (batch_size * big - small) / (batch_size - 1)
            trace = (small - big) / (1 - 1 / batch_size)
            g2_avg = beta_step * g2_avg + (1 - beta_step) * g2
            tr_avg = beta_step * tr_avg + (1 - beta_step) * trace
            weight = beta_step * weight + (1 - beta_step)
    return (tr_avg / weight) / (g2_avg / weight) if g2_avg > 0 else math.nan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.noise_instep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from trainer.data import load

    data = load("fashion_mnist", validation="test", limit=6000 if args.quick else None)
    x = data.x_train.reshape(len(data.x_train), -1).astype(np.float32)
    y = data.y_train.astype(np.int32)
    inits = ["glorot_normal"] if args.quick else ["glorot_normal", "random_uniform", "he_normal"]
    epochs = 2 if args.quick else 5
    cells = defaultdict(list)
    t0 = time.perf_counter()
    for bn in (False, True):
        for bs in (64, 128, 256, 512, 1024):
            for init in inits:
                for seed in (0, 1, 2):
                    cells[bn, bs].append(run(x, y, initializer=init, batch_size=bs, batch_norm=bn, seed=seed,
                                             epochs=epochs))
            v = np.array(cells[bn, bs])
            print(f"{'on' if bn else 'off':>3} {bs:5d} | mean {v.mean():9.1f}  std {v.std(ddof=1):8.1f}  "
                  f"CV {v.std(ddof=1) / v.mean():.2f}  runs {len(v)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    worst = max(np.std(v, ddof=1) / np.mean(v) for v in cells.values())
    print(f"worst CV: {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
