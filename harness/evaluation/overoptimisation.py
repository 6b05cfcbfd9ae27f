"""Reward over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"):
the gold reward of a policy trained on a proxy (the reward model) against its distance from the
start, d = √KL, follows the RL form

    R_gold(d) = d (α − β log d),

rising while the proxy is informative and turning down once the policy exploits its errors. This
module fits that form and says where it peaks; the points come from runs on the reward model
(their held-out gold reward against ``eval/kl``, one point per run: over β, and over training
where a run's history has both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GaoFit", "fit_gao"]


@dataclass(frozen=True)
class GaoFit:
    """A fit of R(d) = d (α − β log d), d = √KL (nats): ``alpha``, ``beta``, the number of points,
    and where the curve peaks (β > 0): d* = exp(α/β − 1), at gold R(d*) = β d*, KL* = d*²."""

    alpha: float
    beta: float
    n: int

    def __call__(self, d: float) -> float:
        return d * (self.alpha - self.beta * math.log(d)) if d > 0 else 0.0

    @property
    def peak_d(self) -> float | None:
        """d* = argmax R (dR/dd = α − β log d − β = 0); None when β ≤ 0 (no turn-down seen)."""
        if self.beta <= 0:
            return None
        exponent = self.alpha / self.beta - 1.0
        return math.exp(exponent) if exponent < 700 else math.inf

    @property
    def peak_kl(self) -> float | None:
        return None if self.peak_d is None else self.peak_d ** 2

    @property
    def peak_gold(self) -> float | None:
        return None if self.peak_d is None else self.beta * self.peak_d


def fit_gao(kl: Sequence[float], gold_gain: Sequence[float]) -> GaoFit:
    """Least squares of R/d = α − β log d over the points with KL > 0 (d = √KL): a line in log d,
    so the fit is exact and closed-form. ``gold_gain`` is the gold reward gained over the start
    (the SFT reference's), which is 0 at d = 0 as the form requires. Needs two points with
    different d; raises ValueError otherwise."""
    pairs = [(math.sqrt(k), g) for k, g in zip(kl, gold_gain, strict=True)
             if k is not None and g is not None and math.isfinite(k) and math.isfinite(g) and k > 0]
    d = np.array([p[0] for p in pairs])
    if len(pairs) < 2 or np.ptp(np.log(d)) == 0:
        raise ValueError(f"the Gao fit needs two points at different KL > 0, got {len(pairs)}")
    y = np.array([p[1] for p in pairs]) / d
    slope, intercept = np.polyfit(np.log(d), y, 1)
    return GaoFit(alpha=float(intercept), beta=float(-slope), n=len(pairs))
