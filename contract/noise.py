"""The gradient noise scale (McCandlish et al. 2018, App. A.1): the estimator, and the
one measurement schedule both training engines follow.

With the weights held fixed, the gradients of k disjoint mini-batches of B_small examples
give |G_small|² (the mean of their squared norms) and |G_big|² (the squared norm of their
mean, a batch of B_big = k·B_small). Since E|G_B|² = |G|² + tr(Σ)/B:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and B_simple = tr(Σ)/|G|², taken as the ratio of bias-corrected exponential moving
averages of the two, because single estimates are noisy and |G|² can come out negative.

Written here because no maintained Keras/TensorFlow library measures it; the estimator
is a few lines of arithmetic. Only numpy: the gradients themselves are taken by the
engines (`trainer.noise_probe`, `trainer.packed_model`), and what is measured is logged
by `trainer.events`; this module returns values and writes nothing.
"""
from __future__ import annotations

import math

import numpy as np

from contract.layout import (NOISE_AT_BATCH, NOISE_B_SIMPLE, NOISE_COSINE, NOISE_EPOCH_AT_BATCH,
                             NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_COSINE, NOISE_G2, NOISE_ROUGHNESS,
                             NOISE_TAGS, NOISE_TRACE, noise_tag)
from contract.spec import NoiseSettings

# The small batches' own random stream, seeded by the run's seed: training's shuffles
# are left alone, and both engines draw the same rows.
_STREAM = 0x6E6F697365


def two_batch_estimate(g_small_sq: float, g_big_sq: float, b_small: int, b_big: int) -> tuple[float, float]:
    """(|G|², tr Σ) from E|G_B|² = |G|² + tr(Σ)/B at two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    return g2, trace


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of |G|² and tr Σ, and their ratio."""

    def __init__(self, beta: float):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.n = 0
        self._g2 = self._trace = 0.0

    def update(self, g2: float, trace: float) -> None:
        self.n += 1
        self._g2 = self.beta * self._g2 + (1 - self.beta) * g2
        self._trace = self.beta * self._trace + (1 - self.beta) * trace

    @property
    def g2(self) -> float:
        return self._g2 / (1 - self.beta ** self.n) if self.n else math.nan

    @property
    def trace(self) -> float:
        return self._trace / (1 - self.beta ** self.n) if self.n else math.nan

    @property
    def b_simple(self) -> float | None:
        """tr Σ / |G|², or None while the averaged |G|² is not positive (no scale defined)."""
        g2, trace = self.g2, self.trace
        if not (self.n and g2 > 0 and math.isfinite(trace)):
            return None
        return trace / g2


def roughness(losses: np.ndarray) -> float:
    """Standard deviation of step-to-step loss differences (ddof 1): how choppy a curve is."""
    d = np.diff(np.asarray(losses, dtype=float))
    return float(np.std(d, ddof=1)) if len(d) > 1 else math.nan


def check_examples(settings: NoiseSettings, examples: int) -> None:
    """ValueError when the training set is too small for the probe's big batch."""
    if settings.big_batch > examples:
        raise ValueError(f"[gradient_noise] needs batches × small_batch = {settings.big_batch} "
                         f"training examples, the data has {examples}")


class NoiseSchedule:
    """When to measure, on which rows, and what each measurement gives, for the `members`
    runs that train on one data order (one for the Keras engine, a pack for the fused).

    A measurement is due at the first step at or after each multiple of `every` that an
    engine asks about (with several steps per call, the end of that call), and at each
    epoch end, at most once per step. Each member keeps its own moving average. Values
    come back as {full tag: value}, None where there is no value (the writers skip it).
    """

    def __init__(self, settings: NoiseSettings, *, examples: int, batch_size: int, seed: int,
                 members: int = 1):
        check_examples(settings, examples)
        self.settings, self.examples, self.batch_size = settings, examples, batch_size
        self.rng = np.random.default_rng([seed, _STREAM])
        self.emas = [NoiseScaleEMA(settings.beta) for _ in range(members)]
        self.measurements = [0] * members
        self.next_due = settings.every
        self.last: list[dict] = [{} for _ in range(members)]  # the latest measurement per member
        self.last_step: int | None = None

    def plan(self, step: int, epoch_end: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """The probe's rows if a measurement is due at `step`: the small batches
        [k, B_small] and one batch of the run's size; else None."""
        if step == self.last_step or (step < self.next_due and not epoch_end):
            return None
        s = self.settings
        rows = self.rng.choice(self.examples, size=s.big_batch, replace=False)
        one = self.rng.choice(self.examples, size=min(self.batch_size, self.examples), replace=False)
        return rows.reshape(s.batches, s.small_batch).astype(np.int32), one.astype(np.int32)

    def record(self, step: int, small_sq, big_sq, cosine, alive: list[bool] | None = None) -> list[dict]:
        """The measurement at `step` (per member |G_small|², |G_big|², cosine): per member
        the `gradient/` step tags to log at `step` ({} for a member that is not alive)."""
        s = self.settings
        out = []
        for j, ema in enumerate(self.emas):
            if alive is not None and not alive[j]:
                out.append({})
                continue
            g2, trace = two_batch_estimate(float(small_sq[j]), float(big_sq[j]), s.small_batch, s.big_batch)
            ema.update(g2, trace)
            self.measurements[j] += 1
            self.last[j] = {NOISE_G2: g2, NOISE_TRACE: trace, NOISE_B_SIMPLE: ema.b_simple,
                            NOISE_AT_BATCH: ema.trace / self.batch_size, NOISE_COSINE: float(cosine[j])}
            out.append({noise_tag(t): v for t, v in self.last[j].items()})
        self.last_step = step
        if step >= self.next_due:
            self.next_due = (step // s.every + 1) * s.every
        return out

    def epoch_values(self, member: int, roughness_value: float) -> dict:
        """The `gradient/` epoch tags of `member` (logged at the epoch index), from the
        measurement at the epoch's end."""
        m = self.last[member]
        if not m:
            return {}
        return {noise_tag(NOISE_EPOCH_AT_BATCH): m[NOISE_AT_BATCH], noise_tag(NOISE_EPOCH_COSINE): m[NOISE_COSINE],
                noise_tag(NOISE_ROUGHNESS): roughness_value, noise_tag(NOISE_EPOCH_B_SIMPLE): m[NOISE_B_SIMPLE]}

    def summary(self, member: int = 0) -> dict:
        """For run.json: the settings, how many measurements were taken, the tags."""
        return {**self.settings.to_dict(), "measurements": self.measurements[member], "tags": list(NOISE_TAGS)}
