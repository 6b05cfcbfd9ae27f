"""The leaderboard's statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.evaluation.stats import (
    bootstrap_distribution,
    distinct_seeds,
    iqm,
    kl_coefficient,
    learning_rate,
    mean_std,
    paired_bootstrap,
    paired_t_test,
    platform_identity,
    platform_label,
    probability_of_improvement,
    regularized_incomplete_beta,
    round_to_ci,
    sign_flip_test,
    stratified_bootstrap_interval,
    summarize,
    t_cdf,
    t_quantile,
)


# --------------------------------------------------------------------------- Student t
@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262),
                                              (30, 2.042), (120, 1.980)])
def test_t_quantile_table_values(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_closed_forms() -> None:
    # df=1 is Cauchy: t(p) = tan(π(p − ½)); df=2: t(p) = (2p − 1)/√(2p(1 − p))
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                 rel=1e-9)
    assert t_quantile(0.5, 5) == 0.0
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.975, None) == pytest.approx(1.959964, abs=1e-6)
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-10)
    # I_x(1, 1) = x and I_x(a, 1) = x^a
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)
    assert regularized_incomplete_beta(2.5, 1, 0.4) == pytest.approx(0.4 ** 2.5)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_summarize_by_hand() -> None:
    # 0.5, 0.7, 0.9: mean 0.7, s = 0.2, half = 4.303 · 0.2 / √3 = 0.49687
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3
    assert s["half"] == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-6)
    assert s["ci_lo"] == pytest.approx(0.7 - s["half"]) and s["ci_hi"] == pytest.approx(0.7 + s["half"])
    # two seeds: 12.706 · |a − b|/√2 / √2 = 12.706 · |a − b| / 2
    assert summarize([1.0, 2.0])["half"] == pytest.approx(12.7062 / 2, rel=1e-4)
    one = summarize([0.9])
    assert one == {"mean": 0.9, "std": None, "n": 1, "ci_lo": None, "ci_hi": None, "half": None}
    assert summarize([])["mean"] is None
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))


def test_round_to_ci() -> None:
    assert round_to_ci(0.51234, 0.03456) == ("0.512", "0.035")
    assert round_to_ci(12.345, 1.234) == ("12.3", "1.2")
    assert round_to_ci(1234.0, 123.0) == ("1230", "120")
    assert round_to_ci(0.5, 0.0995) == ("0.50", "0.10")  # the half-width rounds up a decade
    assert round_to_ci(0.5, None) == ("0.500", None)
    assert round_to_ci(0.5, 0.0) == ("0.500", "0")
    assert round_to_ci(327.8, None) == ("327.8", None)


# --------------------------------------------------------------------------- records
def _r(seed: int | None, created: str, run_id: str, status: str = "ok") -> dict:
    return {"seed": seed, "created": created, "run_id": run_id, "status": status}


def test_distinct_seeds_latest_wins() -> None:
    recs = [_r(0, "2026-01-02T00:00:00+00:00", "b"), _r(0, "2026-01-01T00:00:00+00:00", "a"),
            _r(1, "2026-01-01T00:00:00+00:00", "c"),
            _r(0, "2026-01-03T00:00:00+00:00", "d", status="failed")]
    kept, dropped = distinct_seeds(recs)
    assert [r["run_id"] for r in kept] == ["d", "c"]  # by seed; seed 0's latest (even failed)
    assert sorted(r["run_id"] for r in dropped) == ["a", "b"]
    # without a seed every record is its own sample
    kept, dropped = distinct_seeds([_r(None, "x", "e"), _r(None, "x", "f")])
    assert len(kept) == 2 and not dropped


def test_setting_and_platform() -> None:
    ppo = {"config": {"method": {"kl_coef": 0.5, "beta": 9.0, "optim": {"lr": 1e-4}}}}
    dpo = {"config": {"method": {"beta": 0.1, "optim": {"lr": 5e-6}}}}
    assert kl_coefficient(ppo) == 0.5 and kl_coefficient(dpo) == 0.1
    assert learning_rate(ppo) == 1e-4 and learning_rate(dpo) == 5e-6
    assert kl_coefficient({}) is None and learning_rate({"config": {"method": {}}}) is None
    cpu = {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX512", "threads": 2,
           "gpu": None, "python": "3.11.7", "env": {"ATEN_CPU_CAPABILITY": "avx2"}}
    other_threads = {**cpu, "threads": 16, "python": "3.12.0", "processor": "other"}
    assert platform_identity(cpu) == platform_identity(other_threads)
    assert platform_identity(cpu) != platform_identity({**cpu, "cpu_capability": "AVX2"})
    assert platform_identity(cpu) != platform_identity({**cpu, "env": {}})
    assert platform_identity(None) is None
    assert platform_label(platform_identity(cpu)) == \
        "torch 2.13.0+cpu, cpu AVX512 (ATEN_CPU_CAPABILITY=avx2)"
    gpu = {"torch": "2.13.0", "device": "cuda", "cpu_capability": "AVX512", "gpu": "NVIDIA H200"}
    assert platform_label(platform_identity(gpu)) == "torch 2.13.0, cuda NVIDIA H200"


# --------------------------------------------------------------------------- paired tests
def test_bootstrap_identical_methods() -> None:
    a = np.random.default_rng(1).random((3, 50))
    r = paired_bootstrap(a, a.copy(), n_boot=2000)
    assert r.mean_diff == 0.0 and r.ci_lo == 0.0 and r.ci_hi == 0.0
    assert r.p_value == 1.0 and r.sign_flip_p == 1.0
    assert (r.n_seeds, r.n_prompts, r.n_boot) == (3, 50, 2000)


def test_bootstrap_always_better() -> None:
    b_count = 10_000
    r = paired_bootstrap(np.ones((3, 200)), np.zeros((3, 200)), n_boot=b_count)
    assert r.mean_diff == 1.0 and (r.ci_lo, r.ci_hi) == (1.0, 1.0)
    assert r.p_value == pytest.approx(2 / (b_count + 1))  # the +1 correction's floor
    assert r.p_value < 2 / b_count + 1e-12
    assert r.sign_flip_p == pytest.approx(0.25)  # 2 of 2^3 sign patterns reach |ΣD|


def test_bootstrap_is_deterministic_and_chunked() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random((4, 30)), rng.random((4, 30))
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    # the chunk size changes how the draws are laid out, not their distribution
    x = bootstrap_distribution(a, b, n_boot=4000, seed=7, max_chunk=120)
    y = bootstrap_distribution(a, b, n_boot=4000, seed=7)
    assert abs(x.mean() - y.mean()) < 0.01
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.zeros(3))


def _freq(stats: np.ndarray) -> dict[float, float]:
    values, counts = np.unique(np.round(stats, 9), return_counts=True)
    return {float(v): c / stats.size for v, c in zip(values, counts, strict=True)}


def test_bootstrap_exact_distribution_seed_level() -> None:
    # two seeds with per-seed differences 0 and 1 (constant over their 2 prompts): the seed
    # resample (s1, s2) ∈ {00, 01, 10, 11} gives Δ* = 0, ½, ½, 1 w.p. ¼ each; the prompt level
    # changes nothing. P(Δ* ≤ 0) = ¼, P(Δ* ≥ 0) = 1, so p = 2·¼ = ½. A one-level bootstrap of the
    # 4 pooled cells would instead give Binomial(4, ½)/4 (P(Δ* = 0) = 1/16).
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    stats = bootstrap_distribution(a, np.zeros_like(a), n_boot=40_000)
    freq = _freq(stats)
    assert set(freq) == {0.0, 0.5, 1.0}
    for value, prob in {0.0: 0.25, 0.5: 0.5, 1.0: 0.25}.items():
        assert freq[value] == pytest.approx(prob, abs=0.01)
    r = paired_bootstrap(a, np.zeros_like(a), n_boot=40_000)
    assert r.mean_diff == 0.5 and (r.ci_lo, r.ci_hi) == (0.0, 1.0)
    assert r.p_value == pytest.approx(0.5, abs=0.02)


def test_bootstrap_exact_distribution_prompt_level() -> None:
    # one seed, prompts with differences 0 and 1: Δ* = mean of 2 draws ∈ {0, ½, 1} w.p. ¼, ½, ¼
    a = np.array([[0.0, 1.0]])
    freq = _freq(bootstrap_distribution(a, np.zeros_like(a), n_boot=40_000))
    for value, prob in {0.0: 0.25, 0.5: 0.5, 1.0: 0.25}.items():
        assert freq[value] == pytest.approx(prob, abs=0.01)
    # two identical seeds [0, 1]: Δ* = (X1 + X2)/2 with Xk the mean of 2 draws → Binomial(4, ½)/4
    a = np.array([[0.0, 1.0], [0.0, 1.0]])
    freq = _freq(bootstrap_distribution(a, np.zeros_like(a), n_boot=40_000))
    for k, prob in enumerate((1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)):
        assert freq[k / 4] == pytest.approx(prob, abs=0.01)


def test_sign_flip_by_hand() -> None:
    # D = (1, 2, 3): |Σε D| over the 8 patterns = 6, 0, 2, 4, 4, 2, 0, 6 → ≥ 6 in 2 → p = 0.25
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # D = (1, −1, 3): |ΣD| = 3; sums 3, 5, −3, −1, 1, 3, −5, −3 → |·| ≥ 3 in 6 → p = 0.75
    assert sign_flip_test([1.0, -1.0, 3.0]) == pytest.approx(0.75)
    assert sign_flip_test([]) is None
    assert sign_flip_test([1.0] * 20) is None


# --------------------------------------------------------------------------- across seeds
def test_iqm_by_hand_and_against_scipy() -> None:
    # 8 values: drop the 2 lowest and 2 highest, mean of (3, 4, 5, 6) = 4.5
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == 4.5
    assert iqm([0.2, 0.9, 0.6]) == pytest.approx(1.7 / 3)  # 3 values: floor(0.75) = 0 cut
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 5, 10, 11, 40):
        x = rng.random(n)
        assert iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25))


def test_probability_of_improvement_by_hand_and_as_mann_whitney() -> None:
    # x = (1, 2), y = (1, 0): pairs 1>1 tie (½), 1>0, 2>1, 2>0 -> (0.5 + 3) / 4
    assert probability_of_improvement([1, 2], [1, 0]) == 0.875
    assert probability_of_improvement([0.5] * 3, [0.5] * 4) == 0.5
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 10) / 4, rng.integers(0, 5, 7) / 4  # with ties
    u = scipy_stats.mannwhitneyu(x, y, alternative="greater").statistic
    assert probability_of_improvement(x, y) == pytest.approx(u / (10 * 7))


def test_the_stratified_bootstrap_resamples_each_sample_alone() -> None:
    x = [0.2, 0.4, 0.6, 0.8, 1.0]
    lo, hi = stratified_bootstrap_interval([x], iqm, n_boot=2000, seed=0)
    assert 0.2 <= lo < iqm(x) < hi <= 1.0
    assert stratified_bootstrap_interval([x], iqm, n_boot=2000, seed=0) == (lo, hi)  # seeded
    # a constant sample has a point interval; two samples apart give P(X > Y) = 1 in every replicate
    assert stratified_bootstrap_interval([[0.5] * 4], iqm, n_boot=100) == (0.5, 0.5)
    assert stratified_bootstrap_interval([[0.9, 0.8], [0.1, 0.2, 0.3]], probability_of_improvement,
                                         n_boot=200) == (1.0, 1.0)


def test_the_paired_t_test_by_hand() -> None:
    # D = (0.1, 0.2, 0.3): mean 0.2, s 0.1, se 0.1/sqrt(3); t(0.975, 2) = 4.302653
    t = paired_t_test([0.1, 0.2, 0.3])
    assert t.mean == pytest.approx(0.2) and t.n == 3
    half = 4.302653 * 0.1 / 3 ** 0.5
    assert (t.ci_lo, t.ci_hi) == (pytest.approx(0.2 - half, abs=1e-6), pytest.approx(0.2 + half, abs=1e-6))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert t.p_value == pytest.approx(scipy_stats.ttest_1samp([0.1, 0.2, 0.3], 0).pvalue, rel=1e-6)
    assert paired_t_test([0.05]).p_value is None  # one seed: no test
    assert paired_t_test([0.1, 0.1]).p_value == 0.0 and paired_t_test([0.0, 0.0]).p_value == 1.0
