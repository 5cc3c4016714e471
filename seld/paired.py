"""Paired comparisons of study rows (Ray-free, pure numpy/scipy): differences within a seed and
within a test file, their 95 % intervals, and the verdict rule of the ablation tables.

Two rows of a study are *paired* when they share seeds (Stage 1 and Stage 2 of one training; two
variants trained with the same seed) and test files (always: one store). The difference of two
rows has far less noise than either row's own interval, so tables show it directly:

* **over seeds**: the Student-t interval of the per-seed differences d_s = A_s - B_s (a paired t
  interval; seeds present in both rows);
* **over test files**: the leave-one-file-out jackknife of the seed-mean difference
  mean_s [M(A_s) - M(B_s)], the same file left out of every run (the official metric's jackknife,
  :func:`seld.metrics.jackknife_intervals`, applied to a difference). It measures how much the
  difference depends on which clips are in the test set, not on training randomness.

Per-file counters travel in ``counters.npz`` files: a run's ``RUN/test_counters.npz`` (written at the
end of training) and a study's ``results/<study>/counters.npz`` (gathered from its runs, committed,
so ``--report-only`` recomputes the file intervals).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import integrate, optimize, stats

from seld.errors import DataError
from seld.metrics import N_COUNTERS, jackknife_from_partials, summary_metrics
from seld.runfolder import atomic_write

# Metrics compared, and whether a larger value is better.
HIGHER_IS_BETTER = {"f20": True, "doae_cd": False, "rde_cd": False}
VERDICTS = ("better", "no difference detected", "worse")
CLIPS_KEY = "clips"


@dataclass(frozen=True)
class PairedInterval:
    """A difference A - B: its estimate and 95 % interval; ``n``: seeds (or files) it rests on.
    ``lo``/``hi`` are NaN when the interval is undefined (one seed, one file)."""

    estimate: float
    lo: float
    hi: float
    n: int

    @property
    def defined(self) -> bool:
        return self.n > 0 and math.isfinite(self.lo) and math.isfinite(self.hi)


def paired_t(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedInterval:
    """Paired Student-t interval of A - B over the seeds both have (finite values only).

    Args:
        a, b: seed -> the row's metric for that seed.
    """
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    d = np.asarray([float(a[s]) - float(b[s]) for s in seeds], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedInterval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return PairedInterval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return PairedInterval(mean, mean - half, mean + half, n)


def paired_file_jackknife(counters_a: np.ndarray, counters_b: np.ndarray, metric: str,
                          level: float = 0.95) -> PairedInterval:
    """Leave-one-file-out jackknife of mean_s [M(A_s) - M(B_s)] for one metric.

    Args:
        counters_a, counters_b: (S, n_files, 13, K) per-file counters of the two rows for the same
            S seeds and the same files in the same order (:func:`seld.metrics.count_errors`).
        metric: "f20" | "doae_cd" | "rde_cd" | "dist_err_cd".
    Returns:
        The bias-corrected estimate and its interval (as the official jackknife); n = files.
    """
    a = np.asarray(counters_a, dtype=np.float64)
    b = np.asarray(counters_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != N_COUNTERS:
        raise ValueError(f"expected two (seeds, files, 13, {N_COUNTERS}) arrays of one shape, got "
                         f"{a.shape} and {b.shape}")
    n = a.shape[1]
    if n < 2:
        return PairedInterval(math.nan, math.nan, math.nan, n)

    def stat(tot_a: np.ndarray, tot_b: np.ndarray) -> np.ndarray:  # (S, ..., 13, K) -> (...)
        with np.errstate(invalid="ignore"):
            return np.mean(summary_metrics(tot_a)[metric] - summary_metrics(tot_b)[metric], axis=0)

    ta, tb = a.sum(axis=1), b.sum(axis=1)
    g = float(stat(ta, tb))
    partial = stat(ta[:, None] - a, tb[:, None] - b)  # (n,)
    jk = jackknife_from_partials(g, partial, 1 - level)
    return PairedInterval(jk["estimate"], jk["low"], jk["high"], n)


def verdict(seeds: PairedInterval, files: PairedInterval | None, higher_is_better: bool = True) -> str:
    """The ablation tables' verdict on A - B at 95 %.

    "better" when every defined interval (over seeds, over files) lies entirely on the good side of
    0, "worse" when every one lies entirely on the bad side, else "no difference detected". With a
    single seed only the file interval decides; with neither defined, "no difference detected".
    """
    ivs = [iv for iv in (seeds, files) if iv is not None and iv.defined]
    if not ivs:
        return VERDICTS[1]
    if all(iv.lo > 0 for iv in ivs):
        return VERDICTS[0] if higher_is_better else VERDICTS[2]
    if all(iv.hi < 0 for iv in ivs):
        return VERDICTS[2] if higher_is_better else VERDICTS[0]
    return VERDICTS[1]


# --- What the seeds can see ------------------------------------------------------------------------
# The minimum detectable effect of a paired t-test (two-sided, ALPHA) with POWER, from the observed
# per-seed differences' standard deviation. Exact: the power of the paired t-test is that of a
# noncentral t with n - 1 degrees of freedom and noncentrality delta * sqrt(n) / s_d (both tails).
ALPHA = 0.05
POWER = 0.80
MAX_SEEDS_SEARCHED = 1000  # seeds_for_effect returns None beyond this


def t_test_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` seeds when the true mean
    difference is ``effect`` and the per-seed differences have standard deviation ``sd``
    (noncentral t, both tails; NaN for n < 2)."""
    if n < 2 or not (math.isfinite(effect) and math.isfinite(sd)) or sd < 0:
        return math.nan
    df = n - 1
    crit = float(stats.t.isf(alpha / 2, df))
    if sd == 0:
        return 1.0 if effect != 0 else alpha
    nc = abs(effect) * math.sqrt(n) / sd
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isfinite(power):
        return power
    # scipy's nct returns NaN at 1-4 degrees of freedom with noncentralities above ~10, which a
    # well-separated comparison reaches: then P(|Z + nc| >= crit sqrt(V/df)), V ~ chi2(df),
    # integrated over V's quantiles q in (0, 1), where the integrand is bounded and smooth.
    def tails(q: float) -> float:
        edge = crit * math.sqrt(stats.chi2.ppf(q, df) / df)
        return float(stats.norm.cdf(nc - edge) + stats.norm.cdf(-nc - edge))

    return float(integrate.quad(tails, 0.0, 1.0, limit=200, epsabs=1e-11, epsrel=1e-10)[0])


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the two-sided paired t-test with ``n`` seeds detects with
    probability ``power`` at level ``alpha``, if the per-seed differences have standard deviation
    ``sd`` (the observed one: a plug-in estimate). Same unit as ``sd``; NaN for n < 2."""
    if n < 2 or not math.isfinite(sd) or sd < 0:
        return math.nan
    if sd == 0:
        return 0.0
    # Power grows with the effect; the normal approximation (z_{1-a/2} + z_{power}) s/sqrt(n) is
    # below the answer, so bracket upwards from it.
    lo = 0.0
    hi = (stats.norm.isf(alpha / 2) + stats.norm.ppf(power)) * sd / math.sqrt(n)
    while t_test_power(hi, sd, n, alpha) < power:
        lo, hi = hi, 2 * hi
    return float(optimize.brentq(lambda e: t_test_power(e, sd, n, alpha) - power, lo, hi, xtol=1e-10 * sd))


def seeds_for_effect(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seeds (>= 2) whose paired t-test detects a true difference ``effect`` with
    ``power`` at level ``alpha``, per-seed standard deviation ``sd``; None when more than
    MAX_SEEDS_SEARCHED would be needed (or ``sd`` is undefined)."""
    if not (math.isfinite(sd) and sd >= 0 and math.isfinite(effect)) or effect == 0:
        return None
    n_lo, n_hi = 1, 2  # invariant: n_lo seeds are not enough (one seed never is), n_hi may be
    while t_test_power(effect, sd, n_hi, alpha) < power:
        if n_hi >= MAX_SEEDS_SEARCHED:
            return None
        n_lo, n_hi = n_hi, min(2 * n_hi, MAX_SEEDS_SEARCHED)
    while n_hi - n_lo > 1:  # power rises with n: bisect to the first n that reaches it
        mid = (n_lo + n_hi) // 2
        if t_test_power(effect, sd, mid, alpha) >= power:
            n_hi = mid
        else:
            n_lo = mid
    return n_hi


def paired_sd(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, int]:
    """(standard deviation of the per-seed differences A_s - B_s, seeds) over the seeds both have
    (NaN with fewer than 2)."""
    d = _differences(a, b, sorted(set(a) & set(b)))
    return (float(d.std(ddof=1)) if d.size >= 2 else math.nan), int(d.size)


def _differences(a: Mapping[int, float], b: Mapping[int, float], seeds: Sequence[int]) -> np.ndarray:
    return np.asarray([float(a[s]) - float(b[s]) for s in seeds
                       if s in a and s in b and _finite(a[s]) and _finite(b[s])], dtype=np.float64)


# --- Sequential seeds ---------------------------------------------------------------------------------
# A group-sequential paired t-test with one look per added seed and Lan-DeMets O'Brien-Fleming-type
# alpha spending (Lan & DeMets 1983, Biometrika 70:659; O'Brien & Fleming 1979): the two-sided error
# rate over all looks is alpha. The boundaries are on the t-statistic itself: under the null its
# joint distribution over the looks does not depend on the (unknown) variance, so each look's
# boundary is set so that the probability of first crossing there is exactly the alpha spent there
# (Jennison & Turnbull 1991, Biometrika 78:133, compute the same by numerical integration; here a
# fixed-seed simulation of 2^20 null studies). Converting z-boundaries to t at the same nominal
# level, the usual shortcut, is not accurate with 2-7 degrees of freedom (5.9 % instead of 5 % at
# looks 3..8). A comparison also stops, without a verdict, once it can no longer settle: its
# conditional power at the last look under the current estimate is below FUTILITY (stochastic
# curtailment, Lan, Simon & Halperin 1982); stopping without a verdict never adds false positives.
SPENDING = "Lan-DeMets O'Brien-Fleming-type alpha spending"
FUTILITY = 0.10
DEFAULT_MAX_SEEDS = 8
_CALIBRATION_STUDIES = 1 << 20
_CALIBRATION_SEED = 29
SequentialState = Literal["settled", "cannot settle", "max", "running"]


@dataclass(frozen=True)
class SequentialPlan:
    """``--seeds auto[:MAX]``: the seed order, how many of them every row trains first, and the test.

    Attributes:
        seeds: every seed a comparison may get, in the order they are added (the planned ones first).
        n_planned: seeds every row trains before the first look.
        alpha: two-sided error rate over all looks.
        futility: stop a comparison whose conditional power at the last look is below this.
        stopped_by_budget: the study stopped adding seeds because of --budget-device-hours.
    """

    seeds: tuple[int, ...]
    n_planned: int
    alpha: float = ALPHA
    futility: float = FUTILITY
    stopped_by_budget: bool = False

    def __post_init__(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sequential seeds {self.seeds}: a seed appears twice")
        if not 1 <= self.n_planned <= len(self.seeds) or len(self.seeds) < 2:
            raise ValueError(f"--seeds auto:{len(self.seeds)}: the maximum must be at least 2 and at least "
                             f"the {self.n_planned} planned seeds")
        if not 0 < self.alpha < 1 or not 0 <= self.futility < 1:
            raise ValueError(f"sequential plan: alpha {self.alpha} must be in (0, 1) and futility {self.futility} "
                             "in [0, 1)")

    @property
    def max_seeds(self) -> int:
        return len(self.seeds)

    @property
    def looks(self) -> tuple[int, ...]:
        """Seeds at each look: from the planned seeds (at least 2, a t-statistic needs them) to MAX."""
        return tuple(range(max(2, self.n_planned), self.max_seeds + 1))

    def boundaries(self) -> np.ndarray:
        """(looks,) |t| at or beyond which a look settles the comparison."""
        return t_boundaries(self.looks, self.alpha)


def write_plan(path: str | Path, plan: SequentialPlan) -> None:
    """Write a study's sequential plan (``results/<study>/sequential.json``): the report reads it to
    replay the looks, so ``--report-only`` gives the same tables."""
    import json

    info = {"method": f"group-sequential paired t-test, {SPENDING}, one look per seed",
            "seeds": list(plan.seeds), "n_planned": plan.n_planned, "alpha": plan.alpha,
            "futility": plan.futility, "stopped_by_budget": plan.stopped_by_budget}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")


def read_plan(path: str | Path) -> SequentialPlan | None:
    """The plan of :func:`write_plan`, or None when the study has none (fixed seeds)."""
    import json

    path = Path(path)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        return SequentialPlan(tuple(int(s) for s in info["seeds"]), int(info["n_planned"]),
                              float(info["alpha"]), float(info["futility"]), bool(info["stopped_by_budget"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a sequential plan written by seld ({e}); expected seeds, n_planned, "
                        "alpha, futility, stopped_by_budget") from None


def obf_spending(fraction: np.ndarray | float, alpha: float = ALPHA) -> np.ndarray:
    """Lan-DeMets O'Brien-Fleming-type spending: the two-sided error spent by information fraction
    ``fraction`` (seeds / MAX), 2 - 2 Phi(z_{1-alpha/2} / sqrt(fraction))."""
    return 2.0 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(np.asarray(fraction, dtype=np.float64)))


def t_boundaries(looks: Sequence[int], alpha: float = ALPHA) -> np.ndarray:
    """Two-sided boundaries on the paired t-statistic at each look (seeds ``looks``, increasing, from
    2): under the null the probability that |t| first reaches the boundary at look k is the O'Brien-
    Fleming-type spending between looks k-1 and k. The first look's boundary is exact (a t quantile);
    later ones are quantiles of 2^20 simulated null studies (fixed seed: the same numbers on every
    call; their error on the total alpha is about 2e-4)."""
    looks = tuple(int(n) for n in looks)
    if not looks or looks[0] < 2 or any(b <= a for a, b in zip(looks, looks[1:], strict=False)):
        raise ValueError(f"looks {looks}: expected increasing seed counts from 2")
    return np.asarray(_t_boundaries(looks, float(alpha)))


@functools.lru_cache(maxsize=16)
def _t_boundaries(looks: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    spent = np.diff(obf_spending(np.asarray(looks) / looks[-1], alpha), prepend=0.0)
    rng = np.random.default_rng(_CALIBRATION_SEED)
    n_sim = _CALIBRATION_STUDIES
    total, total_sq = np.zeros(n_sim), np.zeros(n_sim)
    alive = np.ones(n_sim, dtype=bool)
    bounds = []
    n = 0
    for k, n_k in enumerate(looks):
        while n < n_k:
            x = rng.standard_normal(n_sim)
            total += x
            total_sq += x * x
            n += 1
        if k == 0:
            b = float(stats.t.isf(spent[0] / 2, n_k - 1))
        else:
            t = np.abs(_t_stat(total, total_sq, n_k))[alive]
            r = int(round(spent[k] * n_sim))  # the r-th largest surviving |t| spends exactly spent[k]
            top = np.partition(t, t.size - r - 1)[t.size - r - 1:]
            b = float(0.5 * (top.min() + np.partition(top, 1)[1])) if r >= 1 else float(np.nextafter(t.max(), np.inf))
        bounds.append(b)
        alive &= np.abs(_t_stat(total, total_sq, n_k)) < b
    return tuple(bounds)


def _t_stat(total: np.ndarray, total_sq: np.ndarray, n: int) -> np.ndarray:
    mean = total / n
    var = np.maximum(total_sq - n * mean * mean, 0.0) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return mean / np.sqrt(var / n)


@dataclass(frozen=True)
class SequentialResult:
    """Where a comparison stands under a :class:`SequentialPlan`.

    Attributes:
        interval: the repeated confidence interval over seeds at its last look (mean -+ the look's
            boundary x s / sqrt(n): simultaneous 95 % coverage over all looks; it excludes 0
            whenever the look settles, and may also exclude 0 at a look that does not settle,
            when the file interval holds 0 and vetoes the verdict), or the plain paired interval
            before the first look.
        files: the file interval over the same seeds (None without counters).
        verdict: the tables' verdict on these intervals.
        state: "settled" (a boundary crossed), "cannot settle" (conditional power below the plan's
            futility), "max" (MAX seeds, unsettled) or "running" (it needs another seed).
    """

    interval: PairedInterval
    files: PairedInterval | None
    verdict: str
    state: SequentialState

    @property
    def n_seeds(self) -> int:
        return self.interval.n


def sequential_look(a: Mapping[int, float], b: Mapping[int, float], plan: SequentialPlan,
                    higher_is_better: bool = True,
                    files_at: Callable[[tuple[int, ...]], PairedInterval | None] | None = None) -> SequentialResult:
    """Replay the looks of comparison A - B over the plan's seeds that both rows have, in the plan's
    order (a missing seed ends the replay), and stop at the first look that settles or cannot.

    Args:
        a, b: seed -> the row's metric.
        files_at: the seeds of a look -> the file interval over them (both intervals must agree for
            a verdict, as in :func:`verdict`); None: seeds alone.
    """
    seeds: list[int] = []
    for s in plan.seeds:
        if not (s in a and s in b and _finite(a[s]) and _finite(b[s])):
            break
        seeds.append(s)
    d = _differences(a, b, seeds)
    bounds = dict(zip(plan.looks, plan.boundaries(), strict=True))
    if d.size < plan.looks[0]:  # before the first look: the plain interval of the seeds so far
        files = files_at(tuple(seeds)) if files_at is not None and seeds else None
        return SequentialResult(paired_t({s: a[s] for s in seeds}, {s: b[s] for s in seeds}), files,
                                VERDICTS[1], "running")
    for n in range(plan.looks[0], d.size + 1):
        x = d[:n]
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        half = float(bounds[n]) * sd / math.sqrt(n)
        rci = PairedInterval(mean, mean - half, mean + half, n)
        files = files_at(tuple(seeds[:n])) if files_at is not None else None
        v = verdict(rci, files, higher_is_better)
        if v != VERDICTS[1]:
            return SequentialResult(rci, files, v, "settled")
        if n == plan.max_seeds:
            return SequentialResult(rci, files, v, "max")
        if conditional_power(mean, sd, n, plan.max_seeds, bounds[plan.max_seeds]) < plan.futility:
            return SequentialResult(rci, files, v, "cannot settle")
    return SequentialResult(rci, files, v, "running")  # the last look neither settled nor stopped


def sequential_decisions(d: np.ndarray, plan: SequentialPlan) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sequential_look` on F20 over seeds alone (no file interval), for many comparisons at
    once: the replay that simulations of the rule use.

    Args:
        d: (n_comparisons, plan.max_seeds) per-seed differences A - B, in the plan's seed order.
    Returns:
        (sign, n_used): +1 better / -1 worse / 0 no verdict, and the seeds each comparison used.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != plan.max_seeds:
        raise ValueError(f"expected (comparisons, {plan.max_seeds}) differences, got {d.shape}")
    bounds = plan.boundaries()
    total, total_sq = np.cumsum(d, axis=1), np.cumsum(d * d, axis=1)
    sign = np.zeros(d.shape[0], dtype=np.int64)
    n_used = np.full(d.shape[0], plan.max_seeds, dtype=np.int64)
    alive = np.ones(d.shape[0], dtype=bool)
    for k, n in enumerate(plan.looks):
        mean = total[:, n - 1] / n
        sd = np.sqrt(np.maximum(total_sq[:, n - 1] - n * mean * mean, 0.0) / (n - 1))
        half = bounds[k] * sd / math.sqrt(n)
        hit = alive & ((mean - half > 0) | (mean + half < 0))
        sign[hit] = np.sign(mean[hit]).astype(np.int64)
        n_used[hit] = n
        alive &= ~hit
        if n < plan.max_seeds:
            stop = alive & (_conditional_power(mean, sd, n, plan.max_seeds, bounds[-1]) < plan.futility)
            n_used[stop] = n
            alive &= ~stop
    return sign, n_used


def conditional_power(mean: float, sd: float, n: int, n_max: int, bound_max: float) -> float:
    """Probability that the t-statistic at ``n_max`` seeds reaches ``bound_max`` if the true
    difference and standard deviation are the current ``mean`` and ``sd`` (normal approximation of
    the remaining seeds; intermediate looks ignored, which only lowers it)."""
    return float(_conditional_power(np.asarray([mean]), np.asarray([sd]), n, n_max, bound_max)[0])


def _conditional_power(mean: np.ndarray, sd: np.ndarray, n: int, n_max: int, bound_max: float) -> np.ndarray:
    m = n_max - n
    if m <= 0:
        return np.zeros_like(mean)
    edge = bound_max * sd * math.sqrt(n_max)  # |sum of n_max differences| needed, at this sd
    centre = mean * n_max
    spread = sd * math.sqrt(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        cp = stats.norm.sf((edge - centre) / spread) + stats.norm.cdf((-edge - centre) / spread)
    # No spread at all: a nonzero mean settles, a zero one never does.
    return np.where(sd > 0, cp, np.where(mean != 0, 1.0, 0.0))


@dataclass(frozen=True)
class SimulatedRule:
    """The sequential rule on ``n_studies`` simulated comparisons of true difference ``effect``
    (normal per-seed differences of standard deviation ``sd``), against fixed seed counts.

    Attributes:
        rate: share of comparisons with a better/worse verdict (the false-verdict rate at effect 0,
            else the power); ``rate_ci``: its 95 % Clopper-Pearson interval.
        mean_seeds: seeds a comparison used, on average.
        fixed_rate: fixed seed count -> share of paired t-tests (95 %) with a verdict.
    """

    effect: float
    sd: float
    n_studies: int
    rate: float
    rate_ci: tuple[float, float]
    mean_seeds: float
    fixed_rate: dict[int, float]


def simulate_rule(effect: float, sd: float, plan: SequentialPlan, n_studies: int, seed: int,
                  fixed: Sequence[int] = ()) -> SimulatedRule:
    """Simulate ``n_studies`` comparisons through :func:`sequential_decisions` and through fixed
    paired t-tests with each of ``fixed`` seeds (the same draws)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(effect, sd, size=(n_studies, plan.max_seeds))
    sign, n_used = sequential_decisions(d, plan)
    k = int(np.count_nonzero(sign))
    ci = stats.binomtest(k, n_studies).proportion_ci(0.95, method="exact")
    fixed_rate = {}
    for n in fixed:
        x = d[:, :n]
        t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
        fixed_rate[int(n)] = float(np.mean(np.abs(t) >= stats.t.isf(ALPHA / 2, n - 1)))
    return SimulatedRule(float(effect), float(sd), int(n_studies), k / n_studies, (float(ci.low), float(ci.high)),
                         float(n_used.mean()), fixed_rate)


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --- counters.npz ------------------------------------------------------------------------------------


def run_counters_key(variant: str, seed: int, prefix: str) -> str:
    """The key of one run's counters of one scored set in a study's counters.npz."""
    return f"{variant}|{int(seed)}|{prefix}"


def save_counters(path: str | Path, clips: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write per-file counters, clips in sorted order (atomic; compressed npz).

    Args:
        clips: the file (clip) names of the arrays' first axis, in the arrays' order.
        arrays: key -> (n_files, 13, K) counters.
    """
    clips = [str(c) for c in clips]
    order = np.argsort(np.asarray(clips, dtype=object), kind="stable")
    out = {CLIPS_KEY: np.asarray([clips[i] for i in order])}
    for key, arr in arrays.items():
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape[0] != len(clips):
            raise ValueError(f"{key}: counters of {arr.shape[0]} files for {len(clips)} clips")
        out[key] = arr[order]
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **out)


def load_counters(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(clips, key -> counters) of a counters.npz; a file that is not one is one DataError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable counters file ({e})") from None
    if CLIPS_KEY not in data:
        raise DataError(f"{path}: no '{CLIPS_KEY}' array; expected a counters file written by seld")
    clips = data.pop(CLIPS_KEY)
    for key, arr in data.items():
        if arr.ndim != 3 or arr.shape[0] != len(clips) or arr.shape[2] != N_COUNTERS:
            raise DataError(f"{path}: '{key}' has shape {arr.shape}; expected ({len(clips)}, 13, {N_COUNTERS})")
    return clips, data


def gather_study_counters(path: str | Path, runs: Sequence[tuple[str, int, Path]]) -> int:
    """Gather the runs' ``test_counters.npz`` into one study file (``results/<study>/counters.npz``).

    Args:
        runs: (variant, seed, run folder) of the study's finished runs; runs without the file
            (trained before it existed) are skipped.
    Returns:
        How many runs contributed. Nothing is written when none did. Runs scored on other clips
        than the first run (another store) are an error naming the run.
    """
    from seld.runfolder import TEST_COUNTERS

    clips_ref: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = {}
    n = 0
    for variant, seed, run_dir in runs:
        f = Path(run_dir) / TEST_COUNTERS
        if not f.is_file():
            continue
        clips, data = load_counters(f)
        if clips_ref is None:
            clips_ref = clips
        elif len(clips) != len(clips_ref) or not np.array_equal(clips, clips_ref):
            raise DataError(f"{f}: scored on other test clips than the study's other runs")
        for prefix, arr in sorted(data.items()):
            arrays[run_counters_key(variant, seed, prefix)] = arr
        n += 1
    if n:
        save_counters(path, [str(c) for c in clips_ref], arrays)
    return n


__all__ = ["ALPHA", "DEFAULT_MAX_SEEDS", "FUTILITY", "HIGHER_IS_BETTER", "POWER", "SPENDING", "VERDICTS",
           "PairedInterval", "SequentialPlan", "SequentialResult", "conditional_power", "gather_study_counters",
           "load_counters", "minimum_detectable_effect", "obf_spending", "paired_file_jackknife", "paired_sd",
           "paired_t", "read_plan", "run_counters_key", "save_counters", "seeds_for_effect", "sequential_decisions", "sequential_look", "simulate_rule", "SimulatedRule", "t_boundaries",
           "t_test_power", "verdict", "write_plan"]
