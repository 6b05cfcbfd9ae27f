"""How the tests compare two runs that compute the same thing in a different order (one process
against two DDP ranks, a half batch against a whole one): what "the same" may mean on any CPU.

The rule, for every metric the runs log:

* A **continuous** metric (a loss, a mean log-probability, a KL, a reward-model score) is a sum
  taken in another order, so it agrees to float rounding: ``tol`` (default 1e-5) absolute.
* A metric that **counts threshold decisions** (a clip fraction counts tokens whose ratio or
  value left the clip range, an accuracy pairs whose margin is positive, a gold reward or win rate
  prompts whose greedy answer is right or better) is not continuous: a decision whose two sides
  sit within rounding of each other flips with the last bit of a sum, and that differs between
  CPUs' kernels (seen: one token of 128 at the value clip's edge on an AMD EPYC, not on an Intel
  Xeon). Such a metric may differ by at most ``flips`` (default 2) decisions out of the ``n`` it
  counts: ``|a - b| <= flips / n``, plus the rounding allowance. ``DECISIONS`` says what each
  one counts; the test says how many of those there are.

A decision that flips also changes what follows from it (the update after a flipped clip, the
rest of a flipped greedy answer), so two runs can still part by more than rounding; with a few
hundred decisions whose margins spread over O(0.1), a flip inside the last bits (~1e-7) is rare,
and the continuous rule keeps catching real differences (a wrong normaliser moves a loss by
percents, not 1e-5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import pytest

DECISIONS: dict[str, str] = {
    "train/clip_frac": "tokens",  # |ratio - 1| past the clip range, the clipped term active
    "train/value_clip_frac": "tokens",  # |V - V_old| past the value clip, the clipped error larger
    "train/rewards_acc": "pairs",  # DPO: implicit reward margin > 0
    "val/rewards_acc": "pairs",
    "eval/gold_reward": "prompts",  # arith / courier: a greedy answer right or not
    "eval/gold_accuracy": "prompts",
    "eval/ref_gold_reward": "prompts",
    "eval/ref_gold_accuracy": "prompts",
    "eval/win_rate": "prompts",  # the policy's gold against the reference's, ties half
}
"""Metrics that count threshold decisions, and what they count."""

_LOOKS_LIKE_A_COUNT = re.compile(r"(acc|clip_frac|win_rate|gold_reward)")


def assert_runs_agree(one: Mapping[str, float], two: Mapping[str, float], keys: Iterable[str],
                      counts: Mapping[str, int], *, tol: float = 1e-5, flips: int = 2) -> None:
    """Assert ``one[k]`` and ``two[k]`` agree for every key under the module's rule.

    ``counts``: how many decisions each kind of ``DECISIONS`` counts in these runs (``{"tokens":
    512, "prompts": 8}``); a key whose name looks like a count (an accuracy, a clip fraction, a
    win rate, a gold reward) but is not in ``DECISIONS`` is an error, so a new count is classified
    rather than compared to 1e-5 by default.
    """
    for k in keys:
        kind = DECISIONS.get(k)
        if kind is None and _LOOKS_LIKE_A_COUNT.search(k):
            raise AssertionError(f"{k} looks like a count of threshold decisions: add it to "
                                 f"tests/agreement.py's DECISIONS")
        if kind is None:
            assert two[k] == pytest.approx(one[k], abs=tol), k
        else:
            n = counts[kind]
            assert abs(one[k] - two[k]) <= flips / n + tol, \
                f"{k}: {one[k]} vs {two[k]}, more than {flips} of {n} {kind} apart"
