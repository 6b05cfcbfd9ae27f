"""The leaderboard's statistics: pure functions of numbers and run records, no plotting, no I/O.

* :func:`t_quantile` — the Student-t quantile, exact (bisection on the regularized incomplete
  beta function), so the leaderboard needs no SciPy.
* :func:`summarize` — mean, sample standard deviation and the Student-t 95 % interval over seeds.
* :func:`distinct_seeds` — one sample per seed (the latest record by ``created``).
* :func:`paired_bootstrap` — the two-level (seeds, then prompts within seeds) paired bootstrap of
  a mean per-prompt difference, with a percentile interval and a two-sided p-value.
* :func:`sign_flip_test` — the exact sign-flip (permutation) test over per-seed mean differences.
* :func:`paired_t_test` — the paired t-test and interval over per-seed mean differences: what
  tests each pair (calibrated at the seed counts run, unlike a bootstrap of 3 seeds).
* :func:`holm` — Holm's step-down adjustment of a family of p-values: the adjusted p of the
  t-tests over the pairs of one table is what decides a leaderboard "✓".
* :func:`iqm`, :func:`probability_of_improvement`, :func:`stratified_bootstrap_interval` — the
  interquartile mean and P(X > Y) over seeds with stratified bootstrap intervals (Agarwal et al.
  2021, "Deep RL at the Edge of the Statistical Precipice"; rliable's estimators, on one task).
* :func:`round_to_ci` — a mean and half-width rounded to what the interval supports.
* :func:`kl_coefficient`, :func:`learning_rate`, :func:`platform_identity` — what a record says
  about its setting and the platform that computed it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "PairedResult",
    "SeedTest",
    "bootstrap_distribution",
    "distinct_seeds",
    "holm",
    "iqm",
    "kl_coefficient",
    "learning_rate",
    "mean_std",
    "paired_bootstrap",
    "paired_t_test",
    "platform_identity",
    "platform_label",
    "probability_of_improvement",
    "regularized_incomplete_beta",
    "round_to_ci",
    "sign_flip_test",
    "stratified_bootstrap_interval",
    "summarize",
    "t_cdf",
    "t_quantile",
]


# --------------------------------------------------------------------------- Student t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes ``betacf``)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), by its continued fraction (using the symmetry
    I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """The Student-t CDF: F(t) = 1 − ½·I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0, and F(−t) = 1 − F(t)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float | None) -> float:
    """The Student-t quantile t(p, ν): the t with F(t) = p, by bisection on :func:`t_cdf`
    (to ~1e-12). ``df=None`` or ``inf`` gives the normal quantile. E.g. t(0.975, 2) = 4.303."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df is None or math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- summaries
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean x̄ = Σx/n and sample standard deviation s = √(Σ(x − x̄)²/(n − 1)) (``ddof=1``);
    ``(None, None)`` for no values, ``(x̄, None)`` for one."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``{"mean", "std", "n", "ci_lo", "ci_hi", "half"}`` of ``values`` (one per seed).

    The interval is Student-t: x̄ ± t((1 + level)/2, n − 1)·s/√n, with ``half`` its half-width;
    for n < 2 the interval (and ``std``) is ``None``. Non-finite values make the summary ``nan``.
    """
    vals = [float(v) for v in values]
    mean, std = mean_std(vals)
    out: dict[str, Any] = {"mean": mean, "std": std, "n": len(vals),
                           "ci_lo": None, "ci_hi": None, "half": None}
    if std is not None and mean is not None and math.isfinite(std):
        half = t_quantile(0.5 + level / 2.0, len(vals) - 1) * std / math.sqrt(len(vals))
        out.update(ci_lo=mean - half, ci_hi=mean + half, half=half)
    return out


def round_to_ci(mean: float, half: float | None) -> tuple[str, str | None]:
    """``mean`` and ``half`` as text, rounded to what the interval supports: the half-width keeps
    two significant digits and the mean gets the same decimals, d = 1 − ⌊log₁₀ half⌋ (e.g.
    0.5123 ± 0.03456 → ``("0.512", "0.035")``; 1234 ± 123 → ``("1230", "120")``). Without a
    usable half-width (None, 0, non-finite) the mean keeps three decimals below 10, two below
    100, one below 10⁴, none above, and the half-width is ``None`` (or ``"0"`` for 0)."""
    if not math.isfinite(mean):
        return str(mean), None
    if half is None or not math.isfinite(half) or half <= 0:
        a = abs(mean)
        d = 3 if a < 10 else 2 if a < 100 else 1 if a < 10_000 else 0
        return f"{mean:.{d}f}", ("0" if half == 0 else None)
    d = 1 - math.floor(math.log10(half))
    if round(half, d) >= 10 ** (2 - d):  # 0.0995 rounds up to 0.10: one decimal fewer
        d -= 1
    if d >= 0:
        return f"{mean:.{d}f}", f"{half:.{d}f}"
    step = 10 ** (-d)
    return f"{round(mean / step) * step:.0f}", f"{round(half / step) * step:.0f}"


# --------------------------------------------------------------------------- records
def distinct_seeds(records: Iterable[Mapping[str, Any]]
                   ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """One record per seed: ``(kept, dropped)``.

    Repeated records of a seed are one sample, the latest by ``created`` (ISO-8601 text; ties go
    to the larger ``run_id``), whatever its status; the others are ``dropped``. A record without a
    seed is its own sample. ``kept`` is sorted by seed.
    """
    by_seed: dict[Any, list[Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        seed = rec.get("seed")
        key = ("seed", seed) if seed is not None else ("record", i)
        by_seed.setdefault(key, []).append(rec)
    kept, dropped = [], []
    for recs in by_seed.values():
        recs = sorted(recs, key=lambda r: (str(r.get("created") or ""), str(r.get("run_id"))))
        kept.append(recs[-1])
        dropped.extend(recs[:-1])
    kept.sort(key=lambda r: (r.get("seed") is None, str(type(r.get("seed"))), r.get("seed") or 0,
                             str(r.get("run_id"))))
    return kept, dropped


def _method_cfg(record: Mapping[str, Any]) -> Mapping[str, Any]:
    method = (record.get("config") or {}).get("method")
    return method if isinstance(method, Mapping) else {}


def kl_coefficient(record: Mapping[str, Any]) -> float | None:
    """The method's KL coefficient, ``config.method.beta`` (every method), or ``kl_coef`` in PPO
    records written before the field was renamed; ``None`` when neither is a number."""
    cfg = _method_cfg(record)
    for key in ("kl_coef", "beta"):
        value = cfg.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def learning_rate(record: Mapping[str, Any]) -> float | None:
    """The method's learning rate ``config.method.optim.lr`` (``None`` when absent)."""
    optim = _method_cfg(record).get("optim")
    value = optim.get("lr") if isinstance(optim, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


_IDENTITY_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def platform_identity(platform: Mapping[str, Any] | None) -> tuple | None:
    """What must match for two results to share their numerics: (torch, device, cpu_capability,
    gpu, the kernel-selecting env variables ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS).
    ``None`` for a record without a platform."""
    if not isinstance(platform, Mapping) or not platform:
        return None
    env = platform.get("env") or {}
    env_items = tuple(sorted((str(k), str(v)) for k, v in env.items() if k in _IDENTITY_ENV)) \
        if isinstance(env, Mapping) else ()
    return (platform.get("torch"), platform.get("device"), platform.get("cpu_capability"),
            platform.get("gpu"), env_items)


def platform_label(identity: tuple | None) -> str:
    """A platform identity as text, e.g. ``torch 2.13.0+cpu, cpu AVX512`` or
    ``torch 2.13.0, cuda NVIDIA H200``."""
    if identity is None:
        return "unknown platform"
    torch, device, capability, gpu, env = identity
    text = f"torch {torch}, {device}"
    text += f" {gpu}" if gpu else ""
    text += f" {capability}" if capability and not gpu else ""
    if env:
        text += " (" + ", ".join(f"{k}={v}" for k, v in env) + ")"
    return text


# --------------------------------------------------------------------------- paired tests
@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of methods A and B: the mean of d[s, i] = A[s, i] − B[s, i]."""

    mean_diff: float
    ci_lo: float
    ci_hi: float
    p_value: float
    n_seeds: int
    n_prompts: int
    n_boot: int
    sign_flip_p: float | None = None


def paired_bootstrap(a: Any, b: Any, n_boot: int = 10_000, seed: int = 0, level: float = 0.95,
                     max_chunk: int = 4_000_000) -> PairedResult:
    """Two-level (hierarchical) paired bootstrap of the mean difference Δ = mean_{s,i} d[s, i],
    d[s, i] = a[s, i] − b[s, i] for seed s and prompt i (arrays of shape (seeds, prompts)).

    Each of the ``n_boot`` replicates resamples S seeds with replacement, then P prompts with
    replacement within each resampled seed — the same prompt indices for both methods, which is
    what makes it paired — and takes Δ* = mean of the resampled d. The interval is the percentile
    interval [q_{(1−level)/2}, q_{(1+level)/2}] of the Δ*; the two-sided p-value is
    p = min(1, 2·min(P⁺(Δ* ≤ 0), P⁺(Δ* ≥ 0))), with the +1 correction P⁺(E) = (1 + #E)/(B + 1)
    so that p ≥ 2/(B + 1) is never reported as 0. numpy's Generator seeded with ``seed`` makes
    the result deterministic. The exact sign-flip p over seeds (:func:`sign_flip_test`) is added.
    """
    d = _differences(a, b)
    n_seeds, n_prompts = d.shape
    stats = bootstrap_distribution(a, b, n_boot=n_boot, seed=seed, max_chunk=max_chunk)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    below = (1 + int((stats <= 0).sum())) / (n_boot + 1)
    above = (1 + int((stats >= 0).sum())) / (n_boot + 1)
    return PairedResult(mean_diff=float(d.mean()), ci_lo=float(lo), ci_hi=float(hi),
                        p_value=min(1.0, 2 * min(below, above)), n_seeds=n_seeds,
                        n_prompts=n_prompts, n_boot=n_boot,
                        sign_flip_p=sign_flip_test(d.mean(axis=1)))


def _differences(a: Any, b: Any) -> np.ndarray:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"need arrays of shape (seeds, prompts), got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("per-prompt rewards must be finite")
    return d


def bootstrap_distribution(a: Any, b: Any, n_boot: int = 10_000, seed: int = 0,
                           max_chunk: int = 4_000_000) -> np.ndarray:
    """The ``n_boot`` replicates Δ*_b of :func:`paired_bootstrap`: per replicate, seeds
    s*_1..s*_S drawn with replacement, then per drawn seed prompts i*_1..i*_P with replacement,
    Δ*_b = (1/SP)·Σ_k Σ_j d[s*_k, i*_kj]. Drawn in chunks of at most ``max_chunk`` indices."""
    d = _differences(a, b)
    n_seeds, n_prompts = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, max_chunk // (n_seeds * n_prompts))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        seeds = rng.integers(0, n_seeds, size=(m, n_seeds))
        prompts = rng.integers(0, n_prompts, size=(m, n_seeds, n_prompts))
        stats[start:start + m] = d[seeds[:, :, None], prompts].mean(axis=(1, 2))
    return stats


def sign_flip_test(diffs: Sequence[float], max_exact: int = 16) -> float | None:
    """Exact two-sided sign-flip (permutation) test of per-seed mean differences D_s: under the
    null each D_s is symmetric about 0, so p = #{ε ∈ {±1}^S : |Σ ε_s D_s| ≥ |Σ D_s|} / 2^S
    (with a 1e-12 tolerance). The smallest attainable p is 2/2^S (0.25 for three seeds).
    ``None`` for no seeds or more than ``max_exact`` of them."""
    x = np.asarray(diffs, dtype=float)
    if x.size == 0 or x.size > max_exact:
        return None
    observed = abs(x.sum())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))
    return float((np.abs(signs @ x) >= observed - 1e-12).mean())


# --------------------------------------------------------------------------- across seeds (rliable)
def iqm(values: Sequence[float]) -> float:
    """The interquartile mean (Agarwal et al. 2021): the mean of the values left after dropping
    the ⌊n/4⌋ smallest and the ⌊n/4⌋ largest (``scipy.stats.trim_mean(x, 0.25)``, rliable's
    ``aggregate_iqm`` on one task). Robust to a seed that does not take off, and uses half the
    data, unlike the median."""
    x = np.sort(np.asarray(values, dtype=float))
    if x.size == 0:
        raise ValueError("the IQM of no values")
    cut = int(0.25 * x.size)
    return float(x[cut:x.size - cut].mean())


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X > Y) = 1/(n m) Σ_i Σ_j ([x_i > y_j] + ½[x_i = y_j]): the chance that a seed of X scores
    above a seed of Y (ties half), the Mann–Whitney U statistic over n·m (Agarwal et al. 2021;
    rliable's ``probability_of_improvement`` on one task)."""
    a, b = np.asarray(x, dtype=float)[:, None], np.asarray(y, dtype=float)[None, :]
    if a.size == 0 or b.size == 0:
        raise ValueError("P(X > Y) needs values of both")
    return float(((a > b) + 0.5 * (a == b)).mean())


def stratified_bootstrap_interval(samples: Sequence[Sequence[float]], statistic, n_boot: int = 10_000,
                                  seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of ``statistic(*resampled)`` where each sample (one method's
    per-seed scores on one task: rliable's stratum) is resampled with replacement on its own,
    ``n_boot`` times, with numpy's Generator seeded by ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(s, dtype=float) for s in samples]
    picks = [rng.integers(0, a.size, size=(n_boot, a.size)) for a in arrays]
    stats = np.array([statistic(*(a[p[k]] for a, p in zip(arrays, picks, strict=True)))
                      for k in range(n_boot)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class SeedTest:
    """The paired t-test over per-seed mean differences D_s (s = 1..S): the mean D̄, its
    Student-t interval D̄ ± t(0.975, S − 1)·s_D/√S, and the two-sided p = 2(1 − F_t(|D̄|/(s_D/√S)))."""

    mean: float
    ci_lo: float | None
    ci_hi: float | None
    p_value: float | None
    n: int


def paired_t_test(diffs: Sequence[float], level: float = 0.95) -> SeedTest:
    """:class:`SeedTest` of the per-seed differences: calibrated at any number of seeds >= 2 when
    the D_s are roughly normal (the seeds are the unit of replication; the prompts of one seed
    are not independent draws of the method). One seed: no interval, no p. Differences that are
    all equal: a zero-width interval, and p 0 (unless they are all 0: p 1)."""
    d = [float(v) for v in diffs]
    mean, std = mean_std(d)
    if mean is None:
        raise ValueError("a t-test of no differences")
    if std is None:
        return SeedTest(mean, None, None, None, len(d))
    if std == 0:
        return SeedTest(mean, mean, mean, 1.0 if mean == 0 else 0.0, len(d))
    se = std / math.sqrt(len(d))
    half = t_quantile(0.5 + level / 2.0, len(d) - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(mean) / se, len(d) - 1))
    return SeedTest(mean, mean - half, mean + half, min(1.0, max(0.0, p)), len(d))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of one family of tests (Holm 1979), in the input order.

    With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted
    p̃_(k) = min(1, max_{j <= k} (m − j + 1)·p_(j)); rejecting every p̃ < α keeps the chance of
    any false claim in the family at most α, whatever the tests' dependence. ``None`` (a test
    that gave no p) stays ``None`` and does not count in m. Ties keep their input order (the
    running max makes the result the same either way).
    """
    index = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m = len(index)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for k, i in enumerate(index):
        running = max(running, min(1.0, (m - k) * float(p_values[i])))
        out[i] = running
    return out
