"""The benchmark scripts run and count what they say (their timings are printed, not asserted)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_grid_flops_counts_every_dense_multiply_add():
    from bench.grid_speed import grid_flops
    from trainer.spec import load_experiment

    exp = load_experiment("smoke")  # MLP 784 → 32 → 10, one epoch, 8 runs
    first, second = 2 * 784 * 32, 2 * 32 * 10
    # Training: forward + weight gradient for the first layer (its input needs no
    # gradient), forward + weight and input gradients for the second; validation: forward.
    assert grid_flops(exp, 1000, 100) == 8 * ((2 * first + 3 * second) * 1000 + (first + second) * 100)


def test_grid_flops_counts_the_cnn_convolution():
    """Document 000's CNN: Conv2D(32, 3×3) on 28×28×1 gives 26×26×32 outputs of 9
    multiply-adds each; after MaxPool 13×13×32 = 5408 → Dense 128 → Dense 10."""
    from bench.grid_speed import grid_flops
    from trainer.spec import load_experiment

    exp = load_experiment("batch-noise-cnn", epochs=1)  # 3 runs (batch 8, 32, 128)
    conv, dense, out = 2 * 26 * 26 * 32 * 9, 2 * 5408 * 128, 2 * 128 * 10
    per_run = (2 * conv + 3 * dense + 3 * out) * 1000 + (conv + dense + out) * 100
    assert grid_flops(exp, 1000, 100) == 3 * per_run


def epoch_orders(fit, seed=0, n=64, batch=8, epochs=3):
    """The rows each epoch of `fit(model, x, y, ...)` trained on, in order, after
    `keras.utils.set_random_seed(seed)`: a model whose step records its batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    seen = tf.Variable(tf.zeros([epochs * n // batch, batch]))

    class Recorder(keras.Model):
        def train_step(self, data):
            rows = tf.cast(self.optimizer.iterations.value, tf.int32)
            seen.scatter_nd_update([[rows]], [data[0][:, 0]])
            self.optimizer.iterations.assign_add(1)
            return {"loss": tf.constant(0.0)}

    inputs = keras.Input((1,))
    model = Recorder(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.arange(n, dtype="float32")[:, None]
    fit(model, x, np.zeros(n, "float32"), batch_size=batch, epochs=epochs, verbose=0)
    return seen.numpy().reshape(epochs, n).astype(int)


def test_plain_loop_draws_a_new_order_each_epoch_as_the_documents_do():
    """The documents seed nothing, so `fit` shuffles anew each epoch; the benchmark seeds
    the initial weights, and under that seed Keras' own `fit` repeats one order (the
    reason for `plain_fit`)."""
    import numpy as np

    from bench.grid_speed import plain_fit

    keras_alone = epoch_orders(lambda model, x, y, **kw: model.fit(x, y, **kw))
    assert (keras_alone[0] == keras_alone[1]).all() and (keras_alone[1] == keras_alone[2]).all()
    orders = epoch_orders(plain_fit)
    assert all(sorted(order) == list(range(64)) for order in orders)  # each epoch every row once
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


@pytest.mark.slow
def test_report_benchmark_prints_each_time_and_the_ratio(fixture_logs):
    result = subprocess.run([sys.executable, "-m", "bench.report_speed", "--logdir", str(fixture_logs)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("ours warm (cache):") for line in lines)
    assert re.fullmatch(r"warm parse speedup: \d+\.\dx", lines[-1])


@pytest.mark.slow
def test_noise_overhead_benchmark_trains_both_sides(synthetic_npz):
    result = subprocess.run([sys.executable, "-m", "bench.noise_overhead", "--experiment", "smoke", "--quick",
                             "--every-examples", "320", "--data", str(synthetic_npz), "--repeat", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = {int(line.split()[0]): line.split() for line in lines if re.match(r"\s+\d+ ", line)}
    assert sorted(rows) == [64, 256]
    # The "on" side measured: at least at each of the 2 epoch ends of each of the 4 runs a row.
    assert all(int(row[-1]) >= 8 for row in rows.values())
    assert re.fullmatch(r"gradient noise overhead: -?\d+\.\d%", lines[-1])
    assert re.fullmatch(r"overhead \(wall\) of each of the 2 rounds: -?\d+\.\d%, -?\d+\.\d%", lines[-3])


@pytest.mark.slow
def test_make_bench_quick_runs_from_a_fresh_checkout(synthetic_npz):
    """`make bench QUICK=1` needs no trained grid (it trains both sides in temporary
    folders) and ends with the ratio; TensorFlow's start-up lines stay off the terminal."""
    result = subprocess.run(["make", "--no-print-directory", "bench", "QUICK=1", "EXPERIMENT=smoke",
                             f"DATA={synthetic_npz}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d\dx", lines[-1])
    assert any(line.startswith("compute floor: ") for line in lines)
    from trainer.manifest import cpu_name  # the ratio names its host, as run.json records it
    assert f"machine: {cpu_name()}, {os.cpu_count()} CPU threads" in lines
    assert any(line.startswith("ours ") and line.endswith("all runs complete with per-step losses: True")
               for line in lines)
    assert "cuInit" not in result.stderr and "oneDNN custom operations" not in result.stderr


def test_cv_interval_covers_the_true_cv_of_log_normal_cells():
    """`bench.noise_cv`'s interval for a cell's CV: over 400 cells of 9 log-normal values
    (σ = 0.2, CV ≈ 0.202) the nominal 95% covers the true CV in 90–99% of them, and a
    cell's interval widens as its runs get fewer."""
    import numpy as np

    from bench.noise_cv import cv_interval

    rng = np.random.default_rng(7)
    true = float(np.sqrt(np.expm1(0.2 ** 2)))
    hits = sum(low <= true <= high for low, high in (cv_interval(list(np.exp(rng.normal(5, 0.2, 9))))
                                                     for _ in range(400)))
    assert 0.90 <= hits / 400 <= 0.99
    values = list(np.exp(rng.normal(5, 0.2, 9)))
    few, many = cv_interval(values[:4]), cv_interval(values)
    assert few[1] - few[0] > many[1] - many[0] > 0
    assert np.isnan(cv_interval(values[:1])[0])
