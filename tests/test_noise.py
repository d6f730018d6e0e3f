"""The gradient noise scale: the estimator on known distributions, the probe on a real
model with frozen weights, and the scalars a real training run logs."""
import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from contract.layout import NOISE_EPOCH_B_HIGH, NOISE_EPOCH_B_LOW
from contract.layout import NOISE_EPOCH_TAGS as EPOCH_TAGS
from contract.layout import NOISE_PREFIX as PREFIX
from contract.layout import NOISE_STEP_TAGS as STEP_TAGS
from contract.noise import (NoiseScaleEMA, NoiseSchedule, b_simple_interval, due_steps, probe_estimate, roughness,
                            two_batch_estimate)
from contract.spec import NoiseSettings


def test_two_batch_estimator_recovers_known_gradient_and_covariance():
    """Per-example gradients g ~ N(G, Σ) with |G|² = 4 and tr Σ = 200 (so B_simple = 50)."""
    rng = np.random.default_rng(0)
    d, b_small, k = 40, 16, 8
    b_big = k * b_small
    G = rng.normal(size=d)
    G *= 2.0 / np.linalg.norm(G)
    scales = rng.uniform(0.5, 1.5, size=d)
    scales *= math.sqrt(200.0 / np.sum(scales ** 2))  # Σ = diag(scales²), tr Σ = 200
    ema, singles = NoiseScaleEMA(beta=0.99), []
    for _ in range(3000):
        per_example = G + rng.normal(size=(b_big, d)) * scales
        small = per_example.reshape(k, b_small, d).mean(axis=1)
        g_small_sq = float(np.mean(np.sum(small ** 2, axis=1)))
        g_big_sq = float(np.sum(small.mean(axis=0) ** 2))
        g2, trace = two_batch_estimate(g_small_sq, g_big_sq, b_small, b_big)
        ema.update(g2, trace)
        singles.append((g2, trace))
    g2_mean, trace_mean = np.mean(singles, axis=0)
    # Unbiased: the mean of 3000 single estimates is within 5%; the EMA (β = 0.99, about
    # 100 measurements' memory) within 15%, as is the noise scale it gives.
    assert g2_mean == pytest.approx(4.0, rel=0.05) and trace_mean == pytest.approx(200.0, rel=0.05)
    assert ema.g2 == pytest.approx(4.0, rel=0.15) and ema.trace == pytest.approx(200.0, rel=0.15)
    assert ema.b_simple == pytest.approx(50.0, rel=0.15)


def test_ema_is_bias_corrected_and_undefined_until_g2_is_positive():
    ema = NoiseScaleEMA(beta=0.9)
    assert ema.b_simple is None and math.isnan(ema.g2)
    ema.update(-1.0, 10.0)
    assert ema.g2 == pytest.approx(-1.0) and ema.b_simple is None  # no scale from a negative |G|²
    ema.update(3.0, 10.0)
    # (0.9·0.1·(−1) + 0.1·3) / (1 − 0.81): bias-corrected, not pulled towards 0
    assert ema.g2 == pytest.approx((0.09 * -1 + 0.1 * 3) / 0.19)
    assert ema.b_simple == pytest.approx(10.0 / ema.g2)
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleEMA(beta=1.0)
    with pytest.raises(ValueError):
        two_batch_estimate(1.0, 1.0, 64, 64)


def simulated_measurements(rng, trials: int, n: int, *, d: int, k: int, b: int, b_simple: float,
                           cross_batch: int | None = None):
    """(|G|², tr Σ) estimates of `trials` × `n` measurements: k small batches of b
    examples whose per-example gradients are N(G, Σ), |G|² = 1, tr Σ = b_simple, Σ
    diagonal with a 1/i spectrum (effective dimension ≈ 8 for d = 20); with
    `cross_batch`, also an independent batch gradient of that many examples (the fused
    engine's step gradient) dotted with the big batch's (`probe_estimate`)."""
    lam = 1.0 / np.arange(1, d + 1)
    lam *= b_simple / lam.sum()
    G = rng.normal(size=d)
    G /= np.linalg.norm(G)
    small = G + rng.normal(size=(trials, n, k, d)) * np.sqrt(lam / b)  # the small batches' gradients
    small_sq = np.mean(np.sum(small ** 2, axis=-1), axis=-1)
    big_sq = np.sum(small.mean(axis=2) ** 2, axis=-1)
    if cross_batch is None:
        return two_batch_estimate(small_sq, big_sq, b, k * b)
    step = G + rng.normal(size=(trials, n, d)) * np.sqrt(lam / cross_batch)
    return probe_estimate(small_sq, big_sq, k, b, np.sum(step * small.mean(axis=2), axis=-1), cross_batch)


def test_the_step_gradient_makes_the_probe_less_noisy_and_keeps_it_unbiased():
    """4 small batches of 128 at B_simple = 1500 (the lab grid's batch-norm runs at batch
    512-1024): 20,000 single measurements with and without a step gradient of 1024
    examples. Both estimate |G|² = 1 and tr Σ = 1500 without bias (mean within 5%); with the
    step's gradient |G|² is several times less noisy (4.3× lower variance here)."""
    kw = {"d": 20, "k": 4, "b": 128, "b_simple": 1500.0}
    alone = simulated_measurements(np.random.default_rng(3), 1, 20_000, **kw)
    both = simulated_measurements(np.random.default_rng(3), 1, 20_000, cross_batch=1024, **kw)
    for g2, trace in (alone, both):
        assert g2.mean() == pytest.approx(1.0, abs=0.05) and trace.mean() == pytest.approx(1500.0, rel=0.05)
    print(f"|G|² std: probe alone {alone[0].std():.2f}, with the step's gradient {both[0].std():.2f}")
    assert both[0].var() < alone[0].var() / 3
    g2, trace = probe_estimate(5.0, 2.0, 4, 128)  # no step gradient: the two-batch estimate
    assert (g2, trace) == two_batch_estimate(5.0, 2.0, 128, 512)
    assert probe_estimate(5.0, 2.0, 4, 128, math.nan, 1024) == (g2, trace)  # a diverged step: left out
    # λ = 2·1024 / (3·128 + 2·1024) on C = 1.5 against A = (4·2 − 5)/3 = 1
    lam = 2048 / (384 + 2048)
    assert probe_estimate(5.0, 2.0, 4, 128, 1.5, 1024)[0] == pytest.approx((1 - lam) * 1.0 + lam * 1.5)


@pytest.mark.parametrize("b_simple, resolved, cross_batch", [(300.0, True, None), (1000.0, False, None),
                                                             (1000.0, True, 1024)])
def test_interval_covers_the_true_noise_scale_95_percent_of_the_time(b_simple, resolved, cross_batch):
    """400 seeded runs of 25 measurements (k = 8 batches of 64, β = 0.9) of a Gaussian
    with known B_simple. At 300 (< B_big = 512) |G|² is resolved and every interval is
    defined; at 1000 single |G|² estimates have a relative error above 1 and some runs
    have none (|G|² not significantly positive: nothing logged), unless a step gradient of
    1024 examples is taken too (the fused engine at batch 1024)."""
    rng = np.random.default_rng((11 if resolved else 12) + (cross_batch or 0))
    g2, trace = simulated_measurements(rng, 400, 25, d=20, k=8, b=64, b_simple=b_simple, cross_batch=cross_batch)
    intervals = [b_simple_interval(g2[i], trace[i], beta=0.9) for i in range(400)]
    defined = [iv for iv in intervals if iv is not None]
    covered = sum(low <= b_simple <= high for low, high in defined)
    assert all(0 <= low <= high for low, high in defined)
    print(f"B_simple {b_simple:g}: {len(defined)} of 400 defined, {covered} cover it")
    if resolved:
        assert len(defined) == 400 and 0.90 <= covered / 400 <= 0.99
    else:
        assert 300 <= len(defined) < 400 and 0.90 <= covered / len(defined) <= 0.99
    # Each interval holds its own point estimate, the EMA's ratio.
    for i in range(5):
        ema = NoiseScaleEMA(0.9)
        for a, t in zip(g2[i], trace[i]):
            ema.update(a, t)
        if ema.interval() is not None:
            low, high = ema.interval()
            assert low <= ema.b_simple <= high and ema.interval() == intervals[i]


def test_per_example_interval_covers_the_true_noise_scale():
    """The per-example estimator end to end through NoiseSchedule: 400 seeded runs of 2
    epochs of 6,400 examples at batch 64, per-example gradients N(G, Σ) with |G|² = 1 and
    tr Σ = 300; each step gives mean |g_i|² and |G_B|², a measurement every 640 examples
    averages its 10 steps. The final 95% interval covers 300 in 90–99% of the runs where it
    is defined (nearly all)."""
    rng = np.random.default_rng(7)
    d, batch, examples, b_simple = 20, 64, 6400, 300.0
    lam = 1.0 / np.arange(1, d + 1)
    lam *= b_simple / lam.sum()
    G = rng.normal(size=d)
    G /= np.linalg.norm(G)
    settings = NoiseSettings(every_examples=640, beta=0.9)
    covered = defined = 0
    for _ in range(400):
        schedule = NoiseSchedule(settings, examples=examples, batch_size=batch, seed=0, estimator="per_example")
        step = 0
        for _ in range(2 * examples // batch // 10):  # chunks of 10 steps, each ending where one is due
            g = G + rng.normal(size=(10, batch, d)) * np.sqrt(lam)
            small, big = np.mean(np.sum(g ** 2, axis=-1), axis=1), np.sum(g.mean(axis=1) ** 2, axis=-1)
            schedule.add_steps(small[:, None], big[:, None], np.full(10, batch))
            step += 10
            assert schedule.due(step, epoch_end=step % 100 == 0)
            schedule.measure(step)
        interval = schedule.emas[0].interval()
        if interval is not None:
            defined += 1
            covered += interval[0] <= b_simple <= interval[1]
    summary = schedule.summary()
    assert summary["estimator"] == "per_example" and summary["measurements"] == 20
    assert "big_batch" not in summary and not any("cosine" in t for t in summary["tags"])
    print(f"per-example: {defined} of 400 defined, {covered} cover {b_simple:g}")
    assert defined >= 390 and 0.90 <= covered / defined <= 0.99  # undefined: |G|² not clearly above 0


def test_t_quantile_agrees_with_scipy():
    from scipy.special import stdtrit

    from contract.noise import t_quantile

    for df in (1.0, 1.98, 2.0, 3.7, 18.9, 200.0):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stdtrit(df, p), rel=1e-9)


def test_interval_is_left_out_where_it_is_undefined():
    assert b_simple_interval([1.0, 1.1], [100.0, 90.0], beta=0.9) is None  # two measurements
    assert b_simple_interval([-1.0, 0.5, 0.2], [100.0, 90.0, 95.0], beta=0.9) is None  # mean |G|² ≤ 0
    assert b_simple_interval([0.01, -0.5, 0.6, -0.1], [100.0, 90.0, 95.0, 99.0], beta=0.9) is None  # not > 0
    assert b_simple_interval([1.0, 1.1, 0.9], [100.0, 90.0, 95.0], beta=0.0) is None  # one effective
    low, high = b_simple_interval([1.0, 1.1, 0.9, 1.0], [100.0, 90.0, 95.0, 101.0], beta=0.9)
    assert 0 < low < 96 < high < 200
    # The schedule writes no interval until it is defined, and puts the last one in run.json.
    schedule = NoiseSchedule(NoiseSettings(every_examples=10, small_batch=4, batches=2), examples=100,
                             batch_size=10, seed=0)
    for step, (small, big) in enumerate([(2.0, 1.5), (2.1, 1.6), (1.9, 1.45), (2.0, 1.5)], start=1):
        schedule.plan(step)
        schedule.record(step, [small], [big], [0.5])
        epoch = schedule.epoch_values(0, 0.1)
        tags = {layout_tag: v for layout_tag, v in epoch.items() if v is not None}
        assert (PREFIX + "epoch_b_simple_low" in tags) == (step >= 3)
        assert (PREFIX + "epoch_b_simple_high" in tags) == (step >= 3)
    summary = schedule.summary()
    assert summary["b_simple_low"] <= summary["b_simple"] <= summary["b_simple_high"]
    assert summary["interval"]["level"] == 0.95 and summary["interval"]["method"] == "fieller"


@pytest.mark.parametrize("examples", [60000, 54000, 12345])
def test_every_batch_size_gets_the_same_measurements_per_epoch(examples):
    counts = {bs: len(due_steps(12_800, examples, bs)) for bs in (32, 64, 128, 256, 512, 1024)}
    assert len(set(counts.values())) == 1, counts
    assert counts[64] == -(-examples // 12_800)  # ⌈examples / every⌉: the multiples below it, and the end
    steps = due_steps(12_800, 60000, 1024)
    assert steps == (13, 25, 38, 50, 59)  # the first step at or after 12800·m examples, and the epoch's end
    assert due_steps(100_000, 60000, 64) == (938,)  # more than an epoch: epoch ends only


def test_roughness_is_the_std_of_step_differences():
    assert roughness([1.0, 2.0, 1.0, 2.0]) == pytest.approx(np.std([1, -1, 1], ddof=1))
    assert math.isnan(roughness([1.0, 2.0]))


@pytest.fixture(scope="module")
def frozen_model():
    """A small MLP trained a little on the synthetic data, then held fixed."""
    import keras

    from tests.conftest import synthetic_arrays
    from trainer.models import build_model
    from trainer.noise_probe import GradientProbe
    from contract.spec import RunSpec

    data = synthetic_arrays(n_train=1200, n_test=10, seed=3)
    x = (data["x_train"].astype("float32") / 255.0).reshape(-1, 784)[:, ::4]  # 196 inputs
    y = data["y_train"].astype("int64")
    spec = RunSpec(hidden=(16,), activation="tanh", batch_size=32, seed=1)
    keras.utils.set_random_seed(1)
    model = build_model(spec, input_shape=(196,), classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=spec.loss)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=True)
    return model, GradientProbe(model, spec.loss), x, y


def test_probe_agrees_with_regression_on_one_over_b_and_with_per_example_gradients(frozen_model):
    model, probe, x, y = frozen_model
    before = [w.numpy().copy() for w in model.weights]
    rng = np.random.default_rng(7)
    n = len(x)
    # 1. Per-example gradients of the whole training set: the exact |G|² and tr Σ.
    per_example = np.stack([probe.gradient(x[i:i + 1], y[i:i + 1]) for i in range(n)])
    full = per_example.mean(axis=0)
    exact_g2 = float(full @ full)
    exact_trace = float(np.mean(np.sum((per_example - full) ** 2, axis=1)))
    # 2. Mean |G_B|² over many batches (drawn without replacement) is linear in 1/B.
    sizes = np.array([4, 8, 16, 32, 64])
    mean_sq = []
    for b in sizes:
        sq = [np.sum(probe.gradient(x[idx], y[idx]) ** 2)
              for idx in (rng.choice(n, size=b, replace=False) for _ in range(150))]
        mean_sq.append(np.mean(sq))
    # Sampling without replacement from n examples: E|G_B|² = |G|² + tr Σ·(n−B)/((n−1)B),
    # linear in 1/B with slope tr Σ·n/(n−1) and intercept |G|² − tr Σ/(n−1).
    slope, intercept = np.polyfit(1.0 / sizes, mean_sq, 1)
    fitted = slope / sizes + intercept
    r2 = 1 - np.sum((mean_sq - fitted) ** 2) / np.sum((mean_sq - np.mean(mean_sq)) ** 2)
    reg_trace = slope * (n - 1) / n
    reg_g2 = intercept + reg_trace / (n - 1)
    # 3. The two-batch estimate, averaged over measurements (k = 8 batches of 8).
    singles = []
    for _ in range(100):
        idx = rng.choice(n, size=64, replace=False)
        one = rng.choice(n, size=32, replace=False)
        small_sq, big_sq, cosine = probe.measure(x[idx].reshape(8, 8, -1), y[idx].reshape(8, 8),
                                                 x[one], y[one])
        assert -1.0 <= cosine <= 1.0
        singles.append(two_batch_estimate(small_sq, big_sq, 8, 64))
    two_g2, two_trace = np.mean(singles, axis=0)
    print(f"R² of mean |G_B|² on 1/B: {r2:.4f}; |G|²: per-example {exact_g2:.4g}, regression "
          f"{reg_g2:.4g}, two-batch {two_g2:.4g}; tr Σ: {exact_trace:.4g}, {reg_trace:.4g}, {two_trace:.4g}")
    assert r2 > 0.95
    for estimate in (reg_g2, two_g2):
        assert estimate == pytest.approx(exact_g2, rel=0.30)
    for estimate in (reg_trace, two_trace):
        assert estimate == pytest.approx(exact_trace, rel=0.30)
    assert two_trace / two_g2 == pytest.approx(exact_trace / exact_g2, rel=0.30)
    # Held fixed: measuring changed no weight (batch-norm statistics included).
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))


def test_probe_leaves_batch_norm_statistics_alone():
    import keras

    from trainer.models import build_model
    from trainer.noise_probe import GradientProbe
    from contract.spec import RunSpec

    spec = RunSpec(hidden=(8,), batch_norm=True, seed=0)
    model = build_model(spec, input_shape=(12,), classes=3)
    before = [w.numpy().copy() for w in model.weights]
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 2.0, size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    GradientProbe(model, spec.loss).measure(x.reshape(4, 16, 12), y.reshape(4, 16), x[:8], y[:8])
    assert any("moving" in w.path for w in model.weights)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
    # The same batch through a training-mode call does move them: the check can fail.
    model(x, training=True)
    assert not all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
    del keras


@pytest.mark.slow
def test_smoke_runs_log_finite_gradient_noise_scalars(smoke):
    from tbparse import SummaryReader

    code, exp_dir, exp = smoke
    assert code == 0
    for spec in exp.runs:
        run_dir = exp_dir / exp.run_name(spec)
        manifest = json.loads((run_dir / "run.json").read_text())
        settings = manifest["gradient_noise"]
        assert settings["every_examples"] == exp.gradient_noise.every_examples
        assert settings["measurements"] == spec.epochs * settings["measurements_per_epoch"]
        assert {"b_simple", "b_simple_low", "b_simple_high", "interval"} <= set(settings)
        df = SummaryReader(str(run_dir / "train")).tensors
        grad = df[df["tag"].str.startswith(PREFIX)]
        assert np.isfinite(grad["value"]).all()
        tags = set(grad["tag"].str.removeprefix(PREFIX))
        # B_simple may be undefined; its interval is, after the one measurement of a smoke run.
        interval = {NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH}
        assert settings["b_simple_low"] is None and not tags & interval
        # The fused engine's default: per-example norms (no cosine) without batch norm, the probe with it.
        per_example = not spec.uses_batch_norm
        assert settings["estimator"] == ("per_example" if per_example else "probe")
        assert ("small_batch" in settings) is not per_example
        cosines = {"cosine", "epoch_cosine"} if per_example else set()
        assert {t.removeprefix(PREFIX) for t in settings["tags"]} == set(STEP_TAGS + EPOCH_TAGS) - cosines
        assert set(STEP_TAGS) - {"b_simple"} - cosines <= tags and not tags & cosines
        assert set(EPOCH_TAGS) - {"epoch_b_simple"} - interval - cosines <= tags
        for tag in set(EPOCH_TAGS[1:]) - interval - cosines:
            assert sorted(grad.loc[grad["tag"] == PREFIX + tag, "step"]) == list(range(spec.epochs))
        # The in-graph roughness is the std of the logged step losses' differences, epoch by epoch.
        steps_per_epoch = manifest["steps"] // manifest["epochs_completed"]
        losses = df[df["tag"] == "step_loss"].sort_values("step")["value"].to_numpy()
        logged = grad[grad["tag"] == PREFIX + "loss_roughness"].sort_values("step")["value"].to_numpy()
        expected = [roughness(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch])
                    for e in range(spec.epochs)]
        np.testing.assert_allclose(logged, expected, rtol=1e-4)


# --- the report's "Gradient noise" section ------------------------------------------------

def test_windowed_loss_and_steps_to_target():
    import pandas as pd

    from report.gradient import default_target, steps_to_target, windowed_loss

    losses = np.array([4.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(windowed_loss(np.arange(1, 7), losses, batch_size=1024),  # window 2
                               [4.0, 3.5, 2.5, 1.5, 1.0, 1.0])
    scalars = pd.DataFrame({"run": "a", "split": "train", "tag": "step_loss", "step": np.arange(1, 7),
                            "value": losses})
    assert steps_to_target(scalars, "a", 1024, 1.5) == 4
    assert steps_to_target(scalars, "a", 1024, 0.5) is None
    assert default_target(scalars, {"a": 1024}) == 1.0


def test_report_without_measurements_says_so(fixture_logs, tmp_path):
    from report.cli import main

    out = tmp_path / "out"
    assert main(["--logdir", str(fixture_logs), "--out", str(out), "--format", "html"]) == 0
    html = (out / "report.html").read_text()
    assert "Gradient noise" in html and "without measuring the gradient noise scale" in html


@pytest.mark.slow
def test_report_gradient_section_holds_the_logged_numbers(smoke, tmp_path):
    import pandas as pd

    from report import critical
    from report.cli import main
    from report.gradient import steps_to_target
    from report.load import load_logs

    code, exp_dir, exp = smoke
    assert code == 0
    out = tmp_path / "out"
    assert main(["--logdir", str(exp_dir), "--out", str(out), "--template", "task"]) == 0
    html = (out / "report.html").read_text()
    assert "Gradient noise" in html and "B_simple over training" in html
    # The method names where the step's own gradient served (batch 256 ≥ B_small = 128 with
    # batch norm) and where not (64): as the runs' manifests count it.
    assert ("At batch size 256 the probe ran inside the training step" in html
            and "at 64 the probe ran after the update and used its batches alone" in html)
    logs = load_logs(exp_dir)
    crossed = {m["spec"]["batch_size"]: m["gradient_noise"]["with_step_gradient"] > 0
               for m in logs.manifests.values() if m["gradient_noise"]["estimator"] == "probe"}
    assert crossed == {64: False, 256: True}
    s = logs.scalars
    runs = {(r.initializer, r.batch_size, r.batch_norm): exp.run_name(r) for r in exp.runs}  # one seed each

    def logged(run, tag):
        df = s[(s["run"] == run) & (s["tag"] == PREFIX + tag)].sort_values("step")
        return df[np.isfinite(df["value"])]

    # One summary table, a row per initializer × batch × BN: the run's last logged B_simple
    # and the verdict its logged interval gives (none logged: not resolved).
    (summary_csv,) = (out / "tables").glob("*_gradient_noise.csv")
    summary = pd.read_csv(summary_csv)
    assert len(summary) == len(exp.runs)
    for row in summary.itertuples():
        run = runs[row.initializer, row.batch_size, row.batch_norm]
        values = logged(run, "epoch_b_simple")
        if values.empty:
            assert math.isnan(row.b_simple_mean) and row.verdict == "—"
            continue
        assert row.b_simple_mean == pytest.approx(values["value"].iloc[-1]) and row.b_simple_n == 1
        step = values["step"].iloc[-1]
        bounds = [logged(run, t) for t in ("epoch_b_simple_low", "epoch_b_simple_high")]
        low, high = (float(b[b["step"] == step]["value"].iloc[0]) if (b["step"] == step).any() else math.nan
                     for b in bounds)
        assert row.verdict == critical.verdict(low, high, row.batch_size)
    # Steps to each target (the default levels): the windowed first reach of each run.
    (target_csv,) = (out / "tables").glob("*_steps_to_target.csv")
    df = pd.read_csv(target_csv)
    finals = {exp.run_name(r): r.batch_size for r in exp.runs}
    highest_final, lowest_first = critical.loss_range(s, finals)
    levels = critical.target_levels(highest_final, ceiling=lowest_first)
    assert sorted(df["target_loss"].unique()) == levels and len(df) == len(exp.runs) * len(levels)
    for row in df.itertuples():
        run = runs[row.initializer, row.batch_size, row.batch_norm]
        steps = steps_to_target(s, run, row.batch_size, row.target_loss)
        assert steps is not None and row.runs_reached == 1  # every level is reached by construction
        assert row.steps_mean == steps and row.examples_mean == steps * row.batch_size
    # Two batch sizes: too few to fit S = S_min + E_min/B, and the report says so.
    assert not list((out / "tables").glob("*_critical_batch.csv"))
    assert "No critical batch size: the fit needs at least 3 batch sizes" in html
    assert main(["--logdir", str(exp_dir), "--out", str(tmp_path / "none"), "--target-loss", "1e-9",
                 "--format", "html"]) == 0
    assert "not reached" in (tmp_path / "none" / "report.html").read_text()
    (given,) = (tmp_path / "none" / "tables").glob("*_steps_to_target.csv")
    assert (pd.read_csv(given)["target_loss"] == 1e-9).all()


def test_bad_target_loss_is_refused(fixture_logs, tmp_path, capsys):
    from report.cli import main

    assert main(["--logdir", str(fixture_logs), "--out", str(tmp_path), "--target-loss", "-1"]) == 2
    assert "--target-loss -1.0 is not valid" in capsys.readouterr().err


# --- when the trainer measures, and what it refuses ----------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[gradient_noise]\nevery = 200\n", ["[gradient_noise] every", "every_examples = 12800", "examples"]),
    ("[gradient_noise]\nevery_examples = 0\n", ["[gradient_noise] every_examples", "positive integer"]),
    ("[gradient_noise]\nsmall_batch = 0\n", ["[gradient_noise] small_batch", "positive integer"]),
    ("[data]\nlimit = 1000\nvalidation = 0.5\n[gradient_noise]\nbatches = 16\nsmall_batch = 64\n"
     "estimator = 'probe'\n",
     ["[gradient_noise]", "16 × 64 = 1024", "500 training examples left by [data] limit = 1000", "NOISE=0"]),
    ("[gradient_noise]\nestimator = 'per-example'\n",
     ["[gradient_noise] estimator", "'per-example' is not valid", "did you mean 'per_example'",
      "valid values: auto, per_example, probe"]),
    ("[run]\narchitecture = 'cnn'\n[gradient_noise]\nestimator = 'per_example'\n",
     ["[gradient_noise] estimator", '"per_example" needs the fused engine', "the compiled engine",
      'estimator = "probe", or "auto"']),
    ("[run]\nbatch_size = 1\n[gradient_noise]\nestimator = 'per_example'\n",
     ["[gradient_noise] estimator", "at least 2 examples"]),
    ("[grid]\nbatch_norm = [false, true]\n[gradient_noise]\nestimator = 'per_example'\n",
     ["[gradient_noise] estimator", "needs models without batch norm", 'estimator = "auto"']),
])
def test_noise_settings_that_cannot_work_are_refused_at_load(text, expected, tmp_path, capsys):
    from trainer.cli import main

    path = tmp_path / "exp.toml"
    path.write_text(text)
    assert main(["--experiment", str(path), "--logdir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (tmp_path / "logs").exists()


def test_a_limit_below_the_probe_is_refused_naming_every_fix(tmp_path, capsys):
    """`make train EXPERIMENT=smoke LIMIT=500`: its batch-norm runs take the probe, so it
    is refused before the data is read. Runs without batch norm (per-example norms) need
    no rows of their own: the same limit loads for them."""
    from trainer.cli import main
    from trainer.spec import load_experiment

    path = tmp_path / "plain.toml"
    path.write_text("[data]\nlimit = 500\n[grid]\nbatch_size = [64, 256]\n")
    assert load_experiment(str(path)).uses_probe is False
    assert main(["--experiment", "smoke", "--limit", "500", "--logdir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    for piece in ("--limit 500 (LIMIT= with make)", "at least 512", "[gradient_noise] batches or small_batch",
                  "NOISE=0", "--no-gradient-noise"):
        assert piece in err, (piece, err)
    assert not (tmp_path / "logs").exists()
    # Without the probe the same limit is fine as far as loading goes.
    exp = load_experiment("smoke", limit=500, gradient_noise=False)
    assert not exp.gradient_noise.enabled


@pytest.mark.slow
def test_data_smaller_than_the_probe_is_refused_before_any_folder(tmp_path, synthetic_npz, capsys):
    from trainer.cli import main

    path = tmp_path / "big.toml"
    path.write_text("[data]\nvalidation = 'test'\n[run]\nepochs = 1\n[gradient_noise]\nbatches = 8\nsmall_batch = 256\n"
                    "estimator = 'probe'\n")
    assert main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert "8 × 256 = 2048" in err and "1200 training examples of the data" in err and "NOISE=0" in err
    assert not (tmp_path / "logs").exists()


def _gradient_steps(run_dir):
    from tbparse import SummaryReader

    df = SummaryReader(str(run_dir / "train")).tensors
    return {tag.removeprefix(PREFIX): sorted(g["step"]) for tag, g in df.groupby("tag") if tag.startswith(PREFIX)}


@pytest.mark.slow
@pytest.mark.parametrize("engine, estimator", [("fused", "auto"), ("fused", "probe"), ("keras", "auto")])
def test_measurements_fall_on_the_steps_the_examples_give(engine, estimator, tmp_path, synthetic_npz):
    """1200 examples at batch 64 (19 steps an epoch), every 320 examples: due at steps 5,
    10, 15 and 19 of each epoch. The fused engine measures inside its chunks of 8 steps; Keras,
    called back every 8 steps, measures at the first callback at or after each. The
    per-example estimator's measurements (the fused engine's runs without batch norm, by
    default) fall on the same steps, without a cosine."""
    from trainer.cli import main

    path = tmp_path / f"{engine}.toml"
    path.write_text(textwrap.dedent(f"""
        [data]
        validation = "test"
        [run]
        hidden = [16]
        epochs = 2
        batch_size = 64
        [grid]
        batch_norm = [false, true]
        [execution]
        steps_per_execution = 8
        engine = "{engine}"
        [gradient_noise]
        every_examples = 320
        batches = 4
        small_batch = 32
        estimator = "{estimator}"
    """))
    assert main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(tmp_path)]) == 0
    want = [5, 10, 15, 19, 24, 29, 34, 38] if engine == "fused" else [8, 16, 19, 27, 35, 38]
    for run in sorted(p for p in (tmp_path / engine).iterdir() if p.is_dir() and not p.name.startswith(".")):
        steps = _gradient_steps(run)
        assert steps["G2"] == want and steps["epoch_b_simple"] == [0, 1]
        manifest = json.loads((run / "run.json").read_text())
        if engine == "fused" and estimator == "auto" and not manifest["spec"]["batch_norm"]:
            assert "cosine" not in steps and manifest["gradient_noise"]["estimator"] == "per_example"
        else:  # the probe's training-size batch is taken at epoch ends only
            assert steps["cosine"] == [19, 38] and manifest["gradient_noise"]["estimator"] == "probe"
        assert manifest["gradient_noise"]["measurements"] == len(want)
        assert manifest["gradient_noise"]["measurements_per_epoch"] == 4
        assert manifest["steps"] == 38


@pytest.mark.slow
def test_no_gradient_noise_trains_without_the_probe_and_switching_retrains(tmp_path, synthetic_npz, capsys):
    from trainer.cli import main

    args = ["--experiment", "smoke", "--data", str(synthetic_npz), "--logdir", str(tmp_path)]
    assert main(args + ["--no-gradient-noise"]) == 0
    runs = sorted(p for p in (tmp_path / "smoke").iterdir() if p.is_dir() and not p.name.startswith("."))
    for run in runs:
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["config"]["gradient_noise"]["enabled"] is False and "gradient_noise" not in manifest
        assert _gradient_steps(run) == {}
    capsys.readouterr()
    assert main(args) == 0  # the probe back on: a different config, so every run trains again
    out = capsys.readouterr().out
    assert "skipped" not in out and out.count(": complete") == len(runs)
    for run in runs:
        assert json.loads((run / "run.json").read_text())["config"]["gradient_noise"]["enabled"] is True
        assert _gradient_steps(run)["G2"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("already complete, skipped") == len(runs)


@pytest.mark.slow
def test_another_probe_seed_retrains_only_the_probe_runs_and_the_bench_splits_the_spread(smoke, synthetic_npz, tmp_path,
                                                                                         capsys):
    """`[gradient_noise] probe_seed = 1` on the trained smoke grid: the 4 per-example runs
    (no probe rows) are reused, the 4 batch-norm runs retrain with the same training and
    other probe rows; `bench.noise_cv --against` then finds no estimator error in the
    per-example cells and some in the probe's, and refuses a folder against itself."""
    from bench import noise_cv
    from trainer.cli import main

    code, logdir, _ = smoke
    assert code == 0
    shutil.copytree(logdir, tmp_path / "logs" / "smoke")
    path = tmp_path / "smoke.toml"
    path.write_text((Path(__file__).parents[1] / "experiments" / "smoke.toml").read_text() + "\n[gradient_noise]\nprobe_seed = 1\n")
    capsys.readouterr()
    assert main(["--experiment", str(path), "--data", str(synthetic_npz),
                 "--logdir", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == 4 and out.count(": complete") == 4
    changed = 0
    for run in sorted(p for p in logdir.iterdir() if (p / "run.json").exists()):
        before = json.loads((run / "run.json").read_text())
        after = json.loads((tmp_path / "logs" / "smoke" / run.name / "run.json").read_text())
        # The same training (to float rounding: the batch-norm runs now train in a pack of their own).
        assert after["final"]["loss"] == pytest.approx(before["final"]["loss"], rel=1e-6)
        probe = before["spec"]["batch_norm"]
        assert ("probe_seed" in after["config"]["gradient_noise"]) == probe
        changed += after["gradient_noise"]["b_simple"] != before["gradient_noise"]["b_simple"]
    assert changed == 4
    assert noise_cv.main(["--logdir", str(logdir), "--against", str(tmp_path / "logs" / "smoke")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    errors = dict(zip(("off 64", "off 256", "on 64", "on 256"), lines[-1].split(":")[1].split(";")[0].split()))
    assert errors["off 64"] == errors["off 256"] == "0.00" and float(errors["on 64"]) > 0
    assert noise_cv.main(["--logdir", str(logdir), "--against", str(logdir)]) == 2
    assert "same probe_seed" in capsys.readouterr().err
