"""The critical batch size from training curves (report/critical.py) and the "Gradient
noise" section built on synthetic logs whose answers are known in advance."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from report import critical as crit

BATCHES = [64, 128, 256, 512, 1024]


def noisy_steps(s_min, e_min, seeds=5, noise=0.03, seed=0):
    """batch → steps of each seed: S = S_min + E_min/B, times (1 + noise·z)."""
    rng = np.random.default_rng(seed)
    return {b: list((s_min + e_min / b) * (1 + noise * rng.standard_normal(seeds))) for b in BATCHES}


def test_fit_recovers_s_min_and_e_min_and_its_bootstrap_covers_them():
    s_min, e_min = 200.0, 50_000.0  # B_crit = 250
    c = crit.critical(noisy_steps(s_min, e_min), target=0.5)
    assert c.fitted and c.batch == BATCHES and c.resamples == crit.RESAMPLES
    assert c.s_min == pytest.approx(s_min, rel=0.05) and c.e_min == pytest.approx(e_min, rel=0.05)
    assert c.b_crit == pytest.approx(250, rel=0.10)
    for ci, true in ((c.s_min_ci, s_min), (c.e_min_ci, e_min), (c.b_crit_ci, 250.0)):
        assert ci.low < true < ci.high
    # The intervals are informative, not everything: a 30% error is outside them.
    assert not c.s_min_ci.low < 1.3 * s_min < c.s_min_ci.high
    assert not c.e_min_ci.low < 0.7 * e_min < c.e_min_ci.high
    # The per-batch estimates are the seeds' mean steps and examples (E = S·B).
    steps = noisy_steps(s_min, e_min)
    assert c.steps[64].mean == pytest.approx(np.mean(steps[64])) and c.steps[64].n == 5
    assert c.examples[1024].mean == pytest.approx(np.mean(steps[1024]) * 1024)
    # Seeded: the same data give the same intervals.
    again = crit.critical(noisy_steps(s_min, e_min), target=0.5)
    assert (again.b_crit_ci.low, again.b_crit_ci.high) == (c.b_crit_ci.low, c.b_crit_ci.high)


def test_fit_is_exact_on_an_exact_curve_and_vectorised_over_draws():
    b = np.array(BATCHES, dtype=float)
    s_min, e_min = crit.fit_pareto(b, 30 + 6000 / b)
    assert s_min == pytest.approx(30, rel=1e-9) and e_min == pytest.approx(6000, rel=1e-9)
    rows = np.vstack([30 + 6000 / b, 10 + 9000 / b])
    s, e = crit.fit_pareto(b, rows)
    np.testing.assert_allclose(s, [30, 10], rtol=1e-9)
    np.testing.assert_allclose(e, [6000, 9000], rtol=1e-9)
    np.testing.assert_allclose(crit.critical_batch(s, e), [200, 900], rtol=1e-9)


def test_critical_batch_edge_cases():
    assert crit.critical_batch(-5.0, 1000.0) == math.inf  # no floor on the steps: perfect scaling
    assert crit.critical_batch(50.0, -10.0) == 0.0        # steps do not fall with the batch
    assert math.isnan(crit.critical_batch(-1.0, -1.0))
    # Fewer than 3 batch sizes: no fit; one seed: a fit but no interval.
    two = crit.critical({64: [100.0, 110.0], 128: [60.0, 70.0]}, 1.0)
    assert not two.fitted and math.isnan(two.b_crit)
    one = crit.critical({b: [30 + 6000 / b] for b in BATCHES}, 1.0)
    assert one.fitted and one.b_crit == pytest.approx(200) and not one.b_crit_ci.defined
    # Infinite draws give an open bound, not NaN.
    ci = crit.percentile_interval([1.0] * 90 + [math.inf] * 10)
    assert ci.low == 1.0 and ci.high == math.inf


def test_zhang_batch_on_a_known_curve():
    # S = S_min + E_min/B with B_crit = 1000: E(B)/E(64) = (B + 1000)/(64 + 1000).
    b = np.array(BATCHES, dtype=float)
    steps = 20 + 20_000 / b
    ratio = (b + 1000) / (64 + 1000)
    assert ratio[2] < 1.2 < ratio[3]  # crosses between 256 and 512
    t = (1.2 - ratio[2]) / (ratio[3] - ratio[2])
    expected = 2 ** (8 + t)
    assert crit.zhang_batch(b, steps) == pytest.approx(expected, rel=1e-12)
    # Close to what the continuous curve gives, 1.2·B0 + 0.2·B_crit = 276.8.
    assert crit.zhang_batch(b, steps) == pytest.approx(1.2 * 64 + 0.2 * 1000, rel=0.03)
    # Perfect linear scaling never exceeds it: beyond the largest batch.
    assert crit.zhang_batch(b, 6400 / b) == math.inf
    # Row by row over draws, the same answers.
    np.testing.assert_allclose(crit.zhang_batch(b, np.vstack([steps, 6400 / b])), [expected, math.inf])
    # A curve that is already 20% over at the second batch size: between 64 and 128.
    assert 64 < crit.zhang_batch(b, 100 + 0 / b) < 128


@pytest.mark.parametrize("low, high, batch, verdict", [
    (300, 400, 128, crit.NOISE_DOMINATED),   # all of it above 2·128
    (256, 400, 128, crit.NOT_RESOLVED),      # touches 2·B: not clear of the band
    (300, math.inf, 128, crit.NOISE_DOMINATED),
    (10, 30, 128, crit.DIMINISHING),         # all of it below 128/2
    (10, 64, 128, crit.NOT_RESOLVED),
    (100, 200, 128, crit.NOT_RESOLVED),      # inside the band
    (math.nan, math.nan, 128, crit.NOT_RESOLVED),
    (-50, 30, 128, crit.DIMINISHING),        # a t-interval may reach below zero
])
def test_verdict_rule(low, high, batch, verdict):
    assert crit.verdict(low, high, batch) == verdict


def test_target_levels_are_reached_by_construction():
    assert crit.round_up(0.4091196) == 0.41 and crit.round_up(0.41) == 0.41 and crit.round_up(1234.5) == 1240
    levels = crit.target_levels(0.4091196)
    assert levels == [0.41, 0.469, 0.537, 0.615]  # 0.41·1.5^(k/3), the lowest rounded up first
    assert crit.target_levels(0.41, count=1) == [0.41]
    # Capped by the lowest first-step loss: only levels below it (no run starts reached).
    capped = crit.target_levels(0.41, ceiling=0.5)
    assert capped[0] == 0.41 and len(capped) == 3 and all(x < 0.5 for x in capped)
    assert crit.target_levels(2.34, ceiling=2.3) == [2.34]
    scalars = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "split": "train", "tag": "step_loss",
                            "step": [1, 2, 3] * 2, "value": [2.5, 1.0, 0.5, 2.2, 1.5, 0.9]})
    assert crit.loss_range(scalars, {"a": 1024, "b": 1024}) == (pytest.approx(1.2), 2.2)  # windows of 2 steps


def test_windowed_reach_matches_a_hand_count():
    steps = np.arange(1, 9)
    losses = np.array([3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    w = crit.windowed_loss(steps, losses, 1024)  # window of 2 steps
    assert crit.first_reach(steps, w, 0.96) == 4   # (1.0 + 0.9)/2 = 0.95; step 3 has 1.5
    assert crit.first_reach(steps, w, 0.4) is None
    scalars = pd.DataFrame({"run": "r", "split": "train", "tag": "step_loss", "step": steps, "value": losses})
    table = crit.reach_table(scalars, {"r": 1024}, [0.96, 0.4])
    assert table["steps"].iloc[0] == 4 and table["examples"].iloc[0] == 4 * 1024
    assert math.isnan(table["steps"].iloc[1])


# --- synthetic step-loss curves whose steps to a loss follow S = S_min + E_min/B ----------

S_MIN, E_MIN = 300.0, 200_000.0  # at progress u = 1 (loss 1.0); B_crit = 667


def curve_loss(step, batch, scale):
    """2/(1 + u) with progress u = step / (scale·(S_MIN + E_MIN/B)): the loss L is reached at
    u = 2/L − 1, so at S = u·scale·(S_MIN + E_MIN/B) steps."""
    return 2.0 / (1.0 + step / (scale * (S_MIN + E_MIN / batch)))


def synthetic_scalars(seeds=(0, 1, 2), bn=(False,), noise=0.01):
    rows, runs = [], []
    rng = np.random.default_rng(1)
    for b in BATCHES:
        for on in bn:
            for seed in seeds:
                run = f"bs={b},bn={'on' if on else 'off'},seed={seed}"
                scale = 1 + 0.03 * rng.standard_normal()
                total = int(2.2 * (S_MIN + E_MIN / b))  # past u = 2 (loss 0.67)
                steps = np.arange(1, total + 1)
                loss = curve_loss(steps, b, scale) * (0.9 if on else 1.0) + noise * rng.standard_normal(total)
                rows.append(pd.DataFrame({"run": run, "split": "train", "tag": "step_loss", "step": steps,
                                          "value": loss}))
                runs.append({"run": run, "batch_size": b, "batch_norm": on, "seed": seed, "scale": scale})
    return pd.concat(rows, ignore_index=True), pd.DataFrame(runs)


def test_end_to_end_from_step_losses_recovers_the_curve():
    scalars, runs = synthetic_scalars()
    table = crit.reach_table(scalars, dict(zip(runs["run"], runs["batch_size"])), [1.0, 0.8])
    for target, u in ((1.0, 1.0), (0.8, 1.5)):
        t = table[table["target"] == target]
        assert t["steps"].notna().all()
        c = crit.critical({b: g["steps"].tolist() for b, g in t.groupby("batch_size")}, target)
        # The trailing window lags by about half a window (≈1,000 examples at any batch).
        assert c.s_min == pytest.approx(u * S_MIN, rel=0.05)
        assert c.e_min == pytest.approx(u * E_MIN, rel=0.05)
        assert c.b_crit == pytest.approx(E_MIN / S_MIN, rel=0.08)
        assert c.b_crit_ci.low < E_MIN / S_MIN < c.b_crit_ci.high
        assert c.zhang == pytest.approx(1.2 * 64 + 0.2 * E_MIN / S_MIN, rel=0.10)


# --- the section, on in-memory logs -----------------------------------------------------------

def synthetic_logs(tmp_path: Path, *, intervals: bool):
    """Logs of the synthetic curves with BN off/on, 3 seeds, epoch-end B_simple (and its
    logged interval when `intervals`): B_simple = 4·B for BN off, B/8 for BN on, ±5%."""
    from contract.layout import COMPLETE
    from report.load import Logs

    scalars, runs = synthetic_scalars(bn=(False, True))
    extra, manifests = [], {}
    for r in runs.itertuples():
        value = (4.0 * r.batch_size if not r.batch_norm else r.batch_size / 8) * (1 + 0.05 * (r.seed - 1))
        final = int(scalars[scalars["run"] == r.run]["step"].max())
        for tag, v, step in (("b_simple", value * 0.8, final // 2), ("b_simple", value, final)):
            extra.append({"run": r.run, "split": "train", "tag": f"gradient/{tag}", "step": step, "value": v})
        for epoch, v in ((0, value * 0.8), (1, value)):
            extra.append({"run": r.run, "split": "train", "tag": "gradient/epoch_b_simple", "step": epoch, "value": v})
            if intervals:
                extra += [{"run": r.run, "split": "train", "tag": "gradient/epoch_b_simple_low", "step": epoch,
                           "value": 0.9 * v},
                          {"run": r.run, "split": "train", "tag": "gradient/epoch_b_simple_high", "step": epoch,
                           "value": 1.1 * v}]
        manifests[r.run] = {"spec": {"batch_size": int(r.batch_size), "batch_norm": bool(r.batch_norm)},
                            "gradient_noise": {"every": 100, "batches": 8, "small_batch": 64, "big_batch": 512,
                                               "beta": 0.9, "measurements": 2}}
    scalars = pd.concat([scalars, pd.DataFrame(extra)], ignore_index=True)
    table = runs.drop(columns="scale").assign(status=COMPLETE, initializer="he_normal")
    return Logs(logdir=tmp_path, experiment={}, runs=table, specs={}, scalars=scalars, manifests=manifests)


@pytest.mark.parametrize("intervals", [False, True])
def test_section_on_synthetic_logs(tmp_path, intervals):
    from report import gradient
    from report.build import Builder

    logs = synthetic_logs(tmp_path, intervals=intervals)
    b = Builder(logs)
    gradient.add_section(b)
    tables = {t.key: t for t in b.doc.tables}
    assert set(tables) == {"gradient_noise", "steps_to_target", "critical_batch"}
    (sec,) = b.doc.sections
    figures = [blk for blk in sec.blocks if blk["kind"] == "figure"]
    assert len(figures) == 2  # B_simple over training (one initializer) and the Pareto figure
    text = " ".join(blk["text"] for blk in sec.blocks if blk["kind"] == "paragraph")
    # Summary: the logged final B_simple per cell, and the verdict its interval gives.
    summary = tables["gradient_noise"].frame()
    assert len(summary) == len(BATCHES) * 2
    s = logs.scalars
    for row in summary.itertuples():
        runs = logs.runs[(logs.runs["batch_size"] == row.batch_size) & (logs.runs["batch_norm"] == row.batch_norm)]
        logged = [s[(s["run"] == r) & (s["tag"] == "gradient/epoch_b_simple") & (s["step"] == 1)]["value"].iloc[0]
                  for r in runs["run"]]
        assert row.b_simple_mean == pytest.approx(np.mean(logged)) and row.b_simple_n == 3
        assert row.verdict == (crit.NOISE_DOMINATED if not row.batch_norm else crit.DIMINISHING)
    assert f"{len(BATCHES)} of {2 * len(BATCHES)} settings have noise-dominated steps" in text
    columns = tables["gradient_noise"].columns
    assert ("Logged 95% intervals" in columns) == intervals
    if intervals:
        row = tables["gradient_noise"].rows[0]
        first = logs.runs[(logs.runs["batch_size"] == 64) & ~logs.runs["batch_norm"]]["run"].iloc[0]
        final = s[(s["run"] == first) & (s["tag"] == "gradient/epoch_b_simple") & (s["step"] == 1)]["value"].iloc[0]
        assert row[columns.index("Logged 95% intervals")].startswith(
            f"[{gradient.num(0.9 * final)}, {gradient.num(1.1 * final)}]")
    # Steps to each target: the windowed first reach of each run, mean over seeds.
    targets = sorted(tables["steps_to_target"].frame()["target_loss"].unique())
    assert len(targets) == crit.TARGETS and "evenly spaced in log loss" in text
    steps = tables["steps_to_target"].frame()
    for row in steps.sample(6, random_state=0).itertuples():
        runs = logs.runs[(logs.runs["batch_size"] == row.batch_size) & (logs.runs["batch_norm"] == row.batch_norm)]
        expected = [crit.steps_to_target(s, r, row.batch_size, row.target_loss) for r in runs["run"]]
        assert row.steps_mean == pytest.approx(np.mean(expected)) and row.runs_reached == 3
    # B_crit per target and BN setting: the synthetic curves' E_MIN/S_MIN for both.
    fits = tables["critical_batch"].frame()
    assert len(fits) == 2 * len(targets)
    for row in fits.itertuples():
        assert row.b_crit == pytest.approx(E_MIN / S_MIN, rel=0.10)
        assert row.b_crit_low < row.b_crit < row.b_crit_high
        bs_runs = logs.runs[logs.runs["batch_norm"] == row.batch_norm]["run"]
        finals = [s[(s["run"] == r) & (s["tag"] == "gradient/epoch_b_simple") & (s["step"] == 1)]["value"].iloc[0]
                  for r in bs_runs]
        assert row.b_simple_mean == pytest.approx(np.mean(finals)) and row.b_simple_n == 15
    assert "B_crit at the lowest target" in text


def test_section_without_gradient_tags_says_how_to_turn_it_on(tmp_path):
    from report import gradient
    from report.build import Builder

    logs = synthetic_logs(tmp_path, intervals=False)
    logs.scalars = logs.scalars[~logs.scalars["tag"].str.startswith("gradient/")]
    b = Builder(logs)
    gradient.add_section(b, level=2)
    (sec,) = b.doc.sections
    assert sec.level == 2 and not b.doc.tables
    assert [blk["kind"] for blk in sec.blocks] == ["paragraph"]
    assert "[gradient_noise] enabled = true" in sec.blocks[0]["text"]
