"""Gao et al.'s over-optimisation form, fitted (harness/evaluation/overoptimisation.py)."""

from __future__ import annotations

import math

import pytest

from harness.evaluation.overoptimisation import fit_gao


def test_the_fit_recovers_known_parameters_and_the_peak():
    alpha, beta = 0.6, 0.25
    kls = [0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    gains = [math.sqrt(k) * (alpha - beta * math.log(math.sqrt(k))) for k in kls]
    fit = fit_gao(kls, gains)
    assert (fit.alpha, fit.beta, fit.n) == (pytest.approx(alpha), pytest.approx(beta), 9)
    # dR/dd = 0 at d* = exp(alpha/beta - 1) = exp(1.4); R(d*) = beta d*
    assert fit.peak_d == pytest.approx(math.exp(1.4)) and fit.peak_kl == pytest.approx(math.exp(2.8))
    assert fit.peak_gold == pytest.approx(beta * math.exp(1.4))
    assert fit(fit.peak_d) == pytest.approx(fit.peak_gold)
    assert fit(fit.peak_d * 1.1) < fit.peak_gold > fit(fit.peak_d * 0.9)


def test_noise_leaves_the_fit_near_and_a_curve_that_never_turns_has_no_peak():
    import numpy as np

    rng = np.random.default_rng(0)
    kls = np.linspace(0.1, 20, 40)
    d = np.sqrt(kls)
    gains = d * (0.5 - 0.2 * np.log(d)) + rng.normal(0, 0.01, d.size)
    fit = fit_gao(kls, gains)
    assert fit.alpha == pytest.approx(0.5, abs=0.03) and fit.beta == pytest.approx(0.2, abs=0.03)
    rising = fit_gao([1.0, 4.0, 9.0], [0.1, 0.2 * (1 + math.log(2)), 0.3 * (1 + math.log(3))])
    assert rising.beta < 0 and rising.peak_d is None and rising.peak_gold is None
    with pytest.raises(ValueError, match="two points at different KL"):
        fit_gao([0.0, 1.0], [0.0, 0.1])
