"""The gradient noise scale (McCandlish et al. 2018, App. A.1): the estimator, its 95%
interval, and the one measurement schedule both training engines follow.

With the weights held fixed, the gradients of k disjoint mini-batches of B_small examples
give |G_small|² (the mean of their squared norms) and |G_big|² (the squared norm of their
mean, a batch of B_big = k·B_small). Since E|G_B|² = |G|² + tr(Σ)/B:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and B_simple = tr(Σ)/|G|², taken as the ratio of bias-corrected exponential moving
averages of the two, because single estimates are noisy and |G|² can come out negative.
The |G|² estimate is the mean of the k(k−1) dot products g_i·g_j of distinct small-batch
gradients, so its sampling noise is set by B_big, hardly by the split into k batches; k
sets tr(Σ)'s k − 1 degrees of freedom. Measured on the lab grid, single |G|² estimates
at B_big = 512 have a relative spread of 0.9–1.5: at batch sizes ≤ 256 mostly
the gradient itself changing from step to step, at 512–1024 mostly the rows drawn (two
probe streams on the same training runs), and B_big = 4096 brought it only to 0.75–1.0.
Many measurements spread over training, not big ones, make B_simple repeatable: hence
the schedule in examples and β = 0.95 (`NoiseSettings`).

The interval (`b_simple_interval`): B_simple is a ratio of two weighted means, the EMA's
weights β^(n−i) over the n measurements so far. Each measurement draws fresh rows, so
given the weights the measurements are independent; the variances and covariance of the
two weighted means come from the weighted spread of the measurements themselves, with
Kish's effective count n_eff = (Σw)²/Σw² (→ (1+β)/(1−β), 39 at β = 0.95: the EMA's
effective window) and n_eff − 1 degrees of freedom. The interval is Fieller's: the ρ for
which tr(Σ) − ρ·|G|² (linear in the data, so a t statistic) is not rejected at 5%. It is
chosen over the delta method or a leave-one-out jackknife of the ratio because |G|² is
the noisy part: with single |G|² estimates of relative error above 1, symmetric
intervals around the ratio undercover (simulated with B_simple at 2–6·B_big, a
leave-one-out jackknife covered 88–92%, Fieller's 95–98% of the runs where it is
defined); Fieller's is asymmetric, exact for normal means, and unbounded exactly when
the averaged |G|² is not significantly positive.
Nothing is written then, nor with fewer than 3 measurements, nor when the averaged
|G|² ≤ 0. A bootstrap of a few dozen weighted points has the same small-sample trouble
and costs more. While B_simple drifts during training, the drift shows as extra spread
between measurements and widens the interval: it is an interval for the EMA's weighted
average over its window, not for the value at the last step.

The step's own gradient (the fused engine, at batch sizes B ≥ B_small: `PackedMLP.
takes_step_gradient` says why not below): there the probe runs inside the training
step, at the weights of the step's gradient g_T and before its update, so g_T (B rows of
the training batch, drawn independently of the probe's) is another unbiased estimate of
the same gradient, and C = g_T·G_big one of |G|² (E[X·Y] = E[X]·E[Y] for independent
X, Y, overlapping rows included). The probe's own A = mean of g_i·g_j has variance
≈ 2·tr(Σ²)/(k(k−1)·B_small²) where the noise dominates, C ≈ tr(Σ²)/(k·B_small·B): at
B = 1024 C is 5× less noisy. |G|² is then (1 − λ)·A + λ·C with λ = 2B/((k−1)·B_small + 2B)
(the inverse-variance weights of that regime; any fixed λ is unbiased), and tr(Σ) =
B_small·(|G_small|² − |G|²) as before (`probe_estimate`). Measured on the batch-norm half of
the 3-seed lab grid with two probe streams (bench.noise_cv --against): the estimator's
own error at batch 512 / 1024 went from 0.28 / 0.31 to 0.09 / 0.12 (log), at no cost (the
dot product was taken for the cosine anyway). With batch norm g_T's statistics are over
its B rows, the probe's over B_small, so C compares two slightly different gradients; the
cells' mean B_simple from C alone and from A alone differed less than A's own two
streams did (at batch 512: 1388–1599 against 1244–1646; at 1024: 1646–1756 against
1511–2228). The other engines probe between steps, after the update, and use A alone.

The per-example estimator (`estimator = "per_example"`, the fused engine's default for
runs without batch norm): in training steps the engine also returns mean |g_i|² over
(up to 256 of) the batch's examples and |G_B|² of the step's own gradient (B_small = 1,
B_big = the batch; for a dense layer
z = aW + b example i's gradient is a_iᵀδ_i and δ_i, so |g_i|² = (|a_i|² + 1)·|δ_i|²,
from tensors the step has anyway: Goodfellow 2015, "Efficient per-example gradient
computations"). Each step gives one (|G|², tr Σ) pair by the same formula; a measurement
is the mean of the pairs of the steps since the last one, so it spreads over the
every_examples examples trained on in between (the norms of a subset of them; the
fused engine says which) instead of the probe's k·B_small rows at one set of weights,
and costs no extra forward or backward pass. With batch norm an
example's gradient depends on the whole batch, so such runs take the probe: the
per-example terms of a batch-norm gradient (B·a_iᵀδ_i through the batch statistics) are
anti-correlated and put |G|² at or below 0 (measured on the lab grid; the README says
what else was tried). The schedule, the moving average and the interval below are the
same for both.

Written here because no maintained Keras/TensorFlow library measures it; the estimator
is a few lines of arithmetic. Only numpy (the t quantile too: `t_quantile`): the gradients
themselves are taken by the engines (`trainer.noise_probe`, `trainer.packed_model`), and
what is measured is logged by `trainer.events`; this module returns values and writes
nothing.
"""
from __future__ import annotations

import math

import numpy as np

from contract.layout import (NOISE_AT_BATCH, NOISE_B_SIMPLE, NOISE_COSINE, NOISE_EPOCH_AT_BATCH,
                             NOISE_EPOCH_B_HIGH, NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_COSINE,
                             NOISE_G2, NOISE_ROUGHNESS, NOISE_TAGS, NOISE_TRACE, noise_tag)
from contract.spec import PER_EXAMPLE, PROBE, NoiseSettings

# Tags the per-example estimator does not write: it has no big batch to take a cosine with.
_PROBE_ONLY = {NOISE_COSINE, NOISE_EPOCH_COSINE}

# The small batches' own random stream, seeded by the run's seed (and shifted by
# [gradient_noise] probe_seed): training's shuffles are left alone, and both engines draw
# the same rows.
_STREAM = 0x6E6F697365
INTERVAL_LEVEL = 0.95
INTERVAL_METHOD = "fieller"  # over the EMA-weighted measurements; see the module docstring
MIN_MEASUREMENTS = 3         # fewer: no interval
# run.json's "gradient_noise" keys for the last B_simple and its interval (None: undefined).
SUMMARY_B_SIMPLE, SUMMARY_LOW, SUMMARY_HIGH = NOISE_B_SIMPLE, NOISE_B_SIMPLE + "_low", NOISE_B_SIMPLE + "_high"


def two_batch_estimate(g_small_sq, g_big_sq, b_small, b_big):
    """(|G|², tr Σ) from E|G_B|² = |G|² + tr(Σ)/B at two batch sizes (numbers, or numpy
    arrays elementwise)."""
    if not (np.all(0 < np.asarray(b_small)) and np.all(np.asarray(b_small) < np.asarray(b_big))):
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    return g2, trace


def probe_estimate(small_sq, big_sq, batches: int, small_batch: int, cross=None, cross_batch=None):
    """(|G|², tr Σ) of one probe measurement: `batches` small batches of `small_batch`
    rows, |G_small|² and |G_big|²; with `cross` = g_T·G_big, the dot product of the big
    batch's gradient with an independent batch gradient of `cross_batch` rows at the same
    weights, |G|² also from it (module docstring). A non-finite cross is left out."""
    b_big = batches * small_batch
    if cross is None or cross_batch is None or not np.all(np.isfinite(cross)) or cross_batch < 1:
        return two_batch_estimate(small_sq, big_sq, small_batch, b_big)
    pairs = (batches * big_sq - small_sq) / (batches - 1)  # the mean of g_i·g_j, i ≠ j
    lam = 2 * cross_batch / ((batches - 1) * small_batch + 2 * cross_batch)
    g2 = (1 - lam) * pairs + lam * cross
    return g2, small_batch * (small_sq - g2)


def ema_weights(n: int, beta: float) -> np.ndarray:
    """The bias-corrected EMA's weights on n measurements, oldest first, summing to 1."""
    w = beta ** np.arange(n - 1, -1, -1, dtype=float)
    return w / w.sum()


def b_simple_interval(g2s, traces, beta: float, level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
    """Fieller's `level` interval for the ratio of the EMA-weighted means of `traces` and
    `g2s` (the module docstring says why), or None where it is undefined: fewer than
    MIN_MEASUREMENTS, under 2 effective measurements, a weighted |G|² ≤ 0, or one not
    significantly above 0 (the interval would be unbounded). The low end is at least 0."""
    g, t = np.asarray(g2s, dtype=float), np.asarray(traces, dtype=float)
    n = len(g)
    if n < MIN_MEASUREMENTS or len(t) != n or not (np.isfinite(g).all() and np.isfinite(t).all()):
        return None
    p = ema_weights(n, beta)
    s2 = float(p @ p)
    n_eff = 1.0 / s2
    g_mean, t_mean = float(p @ g), float(p @ t)
    if n_eff < 2 or not g_mean > 0:
        return None
    # Variances of the weighted means: Σp(x − x̄)(y − ȳ)/(1 − Σp²) estimates the spread of
    # one measurement, Σp² times that the weighted mean's.
    dg, dt = g - g_mean, t - t_mean
    scale = s2 / (1 - s2)
    v_gg, v_tt, v_gt = (scale * float(p @ (a * b)) for a, b in ((dg, dg), (dt, dt), (dg, dt)))
    q2 = t_quantile(0.5 + level / 2, n_eff - 1) ** 2
    # {ρ : (t̄ − ρ·ḡ)² ≤ q²·(v_tt − 2ρ·v_gt + ρ²·v_gg)} = {ρ : aρ² − 2bρ + c ≤ 0}
    a = g_mean * g_mean - q2 * v_gg
    if not a > 0:
        return None
    b = t_mean * g_mean - q2 * v_gt
    c = t_mean * t_mean - q2 * v_tt
    root = math.sqrt(max(b * b - a * c, 0.0))
    return max((b - root) / a, 0.0), (b + root) / a


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for 0.5 < p < 1 and any real df ≥ 1 (numpy only: the contract
    imports no scipy): bisection on the CDF, the density integrated by Simpson's rule
    (agrees with scipy.special.stdtrit to ≈1e-9)."""
    if not (0.5 < p < 1 and df >= 1):
        raise ValueError(f"need 0.5 < p < 1 and df ≥ 1, got {p}, {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # F(x) − ½ for x ≥ 0
        u = np.linspace(0.0, x, 2001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
        return float((f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()) * (x / 2000) / 3)

    low, high = 0.0, 1.0
    while cdf(high) < p - 0.5:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p - 0.5 else (low, mid)
    return (low + high) / 2


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of |G|² and tr Σ, their ratio, and the
    ratio's interval (`b_simple_interval`, from the measurements kept)."""

    def __init__(self, beta: float):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.n = 0
        self._g2 = self._trace = 0.0
        self.g2s: list[float] = []
        self.traces: list[float] = []

    def update(self, g2: float, trace: float) -> None:
        self.n += 1
        self._g2 = self.beta * self._g2 + (1 - self.beta) * g2
        self._trace = self.beta * self._trace + (1 - self.beta) * trace
        self.g2s.append(g2)
        self.traces.append(trace)

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

    @property
    def effective_measurements(self) -> float:
        """Kish's effective number of measurements under the EMA's weights."""
        return 1.0 / float(np.sum(ema_weights(self.n, self.beta) ** 2)) if self.n else 0.0

    def interval(self, level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
        """The `level` interval of `b_simple` (None where undefined)."""
        return b_simple_interval(self.g2s, self.traces, self.beta, level)


def roughness(losses: np.ndarray) -> float:
    """Standard deviation of step-to-step loss differences (ddof 1): how choppy a curve is."""
    d = np.diff(np.asarray(losses, dtype=float))
    return float(np.std(d, ddof=1)) if len(d) > 1 else math.nan


def check_examples(settings: NoiseSettings, examples: int) -> None:
    """ValueError when the training set is too small for the probe's big batch."""
    if settings.big_batch > examples:
        raise ValueError(f"[gradient_noise] needs batches × small_batch = {settings.big_batch} "
                         f"training examples, the data has {examples}")


def due_steps(every_examples: int, examples: int, batch_size: int) -> tuple[int, ...]:
    """The steps of an epoch (1 … ⌈examples / batch⌉) at which a measurement is due: the
    first at which the epoch has seen m·every_examples examples, for each m ≥ 1 with
    m·every_examples < examples, and the last."""
    steps = math.ceil(examples / batch_size)
    due = {math.ceil(m * every_examples / batch_size) for m in range(1, -(-examples // every_examples))}
    return tuple(sorted(due | {steps}))


class NoiseSchedule:
    """When to measure, on which rows, and what each measurement gives, for the `members`
    runs that train on one data order (one for the Keras engine, a pack for the fused).

    Measurements are counted in examples, not steps, so that every batch size gets the
    same number per epoch: one at the first step at which the epoch has seen another
    `every_examples` examples (steps ⌈m·every_examples / batch⌉ of the epoch, m = 1, 2, …
    while m·every_examples is less than the epoch), and one at each epoch end; at most one
    per step. The fused engine measures at exactly these steps, inside its chunks of
    steps (`due_in`); the compiled engine cuts its chunks there (`steps_to_due`); the
    Keras engine, asked once per execution of `steps_per_execution` steps, measures at the first execution end at or after each
    (several due within one execution give one measurement). Each member keeps its own
    moving average and measurements. Values come back as {full tag: value}, None where
    there is no value (the writers skip it).

    `estimator`: one for every member, or a list of one per member (a pack of the fused
    engine measures its members without batch norm per example and the others with the
    probe). Per-example members get their steps' values through `add_steps`.
    """

    def __init__(self, settings: NoiseSettings, *, examples: int, batch_size: int, seed: int,
                 members: int = 1, estimator: str | list[str] = PROBE):
        self.estimators = [estimator] * members if isinstance(estimator, str) else list(estimator)
        if len(self.estimators) != members or not set(self.estimators) <= {PER_EXAMPLE, PROBE}:
            raise ValueError(f"estimator must be {PER_EXAMPLE!r} or {PROBE!r} for each of the {members} members, "
                             f"got {estimator!r}")
        if PROBE in self.estimators:
            check_examples(settings, examples)
        if settings.every_examples <= 0 or batch_size <= 0:
            raise ValueError(f"every_examples and batch_size must be positive, got "
                             f"{settings.every_examples}, {batch_size}")
        # Per member, since the last measurement (per-example estimator): the sums of the
        # steps' |G|² and tr Σ estimates, and how many steps gave one.
        self._block = np.zeros((members, 3))
        self.settings, self.examples, self.batch_size = settings, examples, batch_size
        self.steps_per_epoch = math.ceil(examples / batch_size)
        self.due_in_epoch = due_steps(settings.every_examples, examples, batch_size)
        self.rng = np.random.default_rng([seed, _STREAM + settings.probe_seed])
        self.emas = [NoiseScaleEMA(settings.beta) for _ in range(members)]
        self.measurements = [0] * members
        self.crossed = [0] * members  # measurements that took the step's own gradient too
        self.next_due = self.due_in_epoch[0]
        self.last: list[dict] = [{} for _ in range(members)]  # the latest measurement per member
        self.last_step: int | None = None

    def due_after(self, step: int) -> int:
        """The first global step after `step` at which a measurement is due."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch * self.steps_per_epoch + next(d for d in self.due_in_epoch if d > within)

    def steps_to_due(self, step: int) -> int:
        """How many steps after `step` the next measurement is due (at least 1): the most
        steps an engine may run before it asks `plan` again to measure on time."""
        return max(1, self.next_due - step)

    def due_in(self, start: int, stop: int) -> list[int]:
        """The steps in (start, stop] at which measurements fall, in order (for an engine
        that measures inside its chunks of steps; an epoch's last step is always one)."""
        out, step = [], self.next_due
        while step <= stop:
            if step > start and step != self.last_step:
                out.append(step)
            step = self.due_after(step)
        return out

    def due(self, step: int, epoch_end: bool = False) -> bool:
        """Whether a measurement is due at `step` (and not yet taken there)."""
        return step != self.last_step and (step >= self.next_due or epoch_end)

    def plan(self, step: int, epoch_end: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """The probe's rows if a measurement is due at `step`: the small batches
        [k, B_small], and the rows of one batch of the run's size for the cosine, at an
        epoch's end only (no rows at the other measurements: a batch of 1024 costs twice
        the small batches; engines skip it and give a NaN cosine); else None."""
        if not self.due(step, epoch_end):
            return None
        if PROBE not in self.estimators:
            raise ValueError("the per-example estimator takes no probe rows: use add_steps and measure")
        s = self.settings
        rows = self.rng.choice(self.examples, size=s.big_batch, replace=False)
        one = np.zeros(0, np.int32)
        if epoch_end or step % self.steps_per_epoch == 0:
            one = self.rng.choice(self.examples, size=min(self.batch_size, self.examples), replace=False)
        return rows.reshape(s.batches, s.small_batch).astype(np.int32), one.astype(np.int32)

    def add_steps(self, small_sq, big_sq, counts) -> None:
        """Per-example estimator: training steps' mean |g_i|² and |G_B|² ([steps, members])
        over batches of counts[i] examples, added to the measurement under way. A batch of
        one example gives no estimate (and a non-finite value none: the step diverged)."""
        small, big = np.asarray(small_sq, dtype=float), np.asarray(big_sq, dtype=float)
        b = np.asarray(counts, dtype=float)[:, None]
        ok = (b > 1) & np.isfinite(small) & np.isfinite(big)
        g2, trace = two_batch_estimate(small, big, 1, np.where(ok, b, 2.0))
        self._block += np.stack([np.where(ok, g2, 0.0).sum(0), np.where(ok, trace, 0.0).sum(0), ok.sum(0)], axis=1)

    def measure(self, step: int, alive: list[bool] | None = None, probe=None) -> list[dict]:
        """The measurement at `step`: for per-example members the mean of the steps added
        since the last one, for probe members `probe` = (|G_small|², |G_big|², cosine) per
        member as `record` takes them, optionally with (g_T·G_big per member, g_T's rows):
        the step's own gradient at the probe's weights (`probe_estimate`); as `record` (a
        per-example member whose steps gave no estimate: {})."""
        block, self._block = self._block, np.zeros_like(self._block)
        pairs, cosines, crossed = [], [], [False] * len(self.estimators)
        for j, estimator in enumerate(self.estimators):
            if estimator == PER_EXAMPLE:
                pairs.append((block[j, 0] / block[j, 2], block[j, 1] / block[j, 2]) if block[j, 2] else None)
                cosines.append(None)
            else:
                cross = (probe[3][j], probe[4]) if len(probe) > 3 else (None, None)
                pairs.append(self._probe_pair(probe[0][j], probe[1][j], *cross))
                cosines.append(probe[2][j] if probe[2] is not None else None)
                crossed[j] = cross[0] is not None and bool(np.isfinite(cross[0]))
        out = self._update(step, pairs, cosines, alive)
        for j, took in enumerate(crossed):  # counted only where the measurement went into the average
            self.crossed[j] += took and bool(out[j])
        return out

    def _probe_pair(self, small_sq, big_sq, cross=None, cross_batch=None) -> tuple[float, float]:
        s = self.settings
        return probe_estimate(float(small_sq), float(big_sq), s.batches, s.small_batch,
                              None if cross is None else float(cross), cross_batch)

    def record(self, step: int, small_sq, big_sq, cosine=None, alive: list[bool] | None = None) -> list[dict]:
        """The probe's measurement at `step` (per member |G_small|², |G_big|², cosine;
        cosine None or NaN where `plan` gave no batch for it): per member the `gradient/`
        step tags to log at `step` ({} for a member that is not alive)."""
        if PER_EXAMPLE in self.estimators:
            raise ValueError("per-example members are measured with measure()")
        pairs = [self._probe_pair(a, b) for a, b in zip(small_sq, big_sq)]
        return self._update(step, pairs, list(cosine) if cosine is not None else [None] * len(pairs), alive)

    def _update(self, step: int, pairs: list, cosines: list, alive: list[bool] | None) -> list[dict]:
        """Each member's (|G|², tr Σ) (None: no estimate) into its moving average; the
        step tags per member."""
        out = []
        for j, ema in enumerate(self.emas):
            if (alive is not None and not alive[j]) or pairs[j] is None:
                out.append({})
                continue
            g2, trace = (float(v) for v in pairs[j])
            ema.update(g2, trace)
            self.measurements[j] += 1
            self.last[j] = {NOISE_G2: g2, NOISE_TRACE: trace, NOISE_B_SIMPLE: ema.b_simple,
                            NOISE_AT_BATCH: ema.trace / self.batch_size,
                            NOISE_COSINE: _finite(cosines[j])}
            out.append({noise_tag(t): v for t, v in self.last[j].items()
                        if self.estimators[j] == PROBE or t not in _PROBE_ONLY})
        self.last_step = step
        self.next_due = self.due_after(step)
        return out

    def epoch_values(self, member: int, roughness_value: float) -> dict:
        """The `gradient/` epoch tags of `member` (logged at the epoch index), from the
        measurement at the epoch's end, with the 95% interval of B_simple where it is
        defined (`NoiseScaleEMA.interval`)."""
        m = self.last[member]
        if not m:
            return {}
        low, high = self.emas[member].interval() or (None, None)
        values = {NOISE_EPOCH_AT_BATCH: m[NOISE_AT_BATCH], NOISE_EPOCH_COSINE: m[NOISE_COSINE],
                  NOISE_ROUGHNESS: roughness_value, NOISE_EPOCH_B_SIMPLE: m[NOISE_B_SIMPLE],
                  NOISE_EPOCH_B_LOW: low, NOISE_EPOCH_B_HIGH: high}
        return {noise_tag(t): v for t, v in values.items()
                if self.estimators[member] == PROBE or t not in _PROBE_ONLY}

    def summary(self, member: int = 0) -> dict:
        """For run.json: the settings, how many measurements were taken (for the probe also
        how many took the step's own gradient too), the last B_simple with its 95% interval
        (None where undefined), the interval's method, the tags."""
        ema = self.emas[member]
        low, high = ema.interval() or (None, None)
        estimator = self.estimators[member]
        probe_only = ("small_batch", "batches", "big_batch", "probe_seed") if estimator == PER_EXAMPLE else ()
        settings = {k: v for k, v in self.settings.to_dict().items() if k not in probe_only}
        crossed = {"with_step_gradient": self.crossed[member]} if estimator == PROBE else {}
        return {**settings, "estimator": estimator, "measurements": self.measurements[member], **crossed,
                "measurements_per_epoch": len(self.due_in_epoch),
                SUMMARY_B_SIMPLE: _finite(ema.b_simple), SUMMARY_LOW: _finite(low), SUMMARY_HIGH: _finite(high),
                "interval": {"level": INTERVAL_LEVEL, "method": INTERVAL_METHOD,
                             "effective_measurements": _finite(ema.effective_measurements)},
                "tags": [t for t in NOISE_TAGS if estimator == PROBE
                         or t not in {noise_tag(short) for short in _PROBE_ONLY}]}


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
