"""The gradient noise scale, measured during training (McCandlish et al. 2018, App. A.1).

With the weights held fixed, the gradients of k disjoint mini-batches of B_small examples
give |G_small|² (the mean of their squared norms) and |G_big|² (the squared norm of their
mean, a batch of B_big = k·B_small). Since E|G_B|² = |G|² + tr(Σ)/B:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and B_simple = tr(Σ)/|G|², taken as the ratio of bias-corrected exponential moving
averages of the two, because single estimates are noisy and |G|² can come out negative.

Written here because no maintained Keras/TensorFlow library measures it; the estimator
is a few lines of arithmetic. This module needs only numpy (the report imports it); the
measurement during training is in `trainer.noise_probe`.
"""
from __future__ import annotations

import math

import numpy as np

PREFIX = "gradient/"
# Tags in train/: measured every K steps and at each epoch end, at the global step...
STEP_TAGS = ("G2", "trace_sigma", "b_simple", "noise_at_batch", "cosine")
# ...and the epoch-end values again at step = epoch index (like epoch_loss), plus roughness.
EPOCH_TAGS = ("epoch_b_simple", "epoch_noise_at_batch", "epoch_cosine", "loss_roughness")


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
