"""Held-out preference accuracy: evaluation for data that has pairs but no gold reward.

For a pair (x, y_w, y_l) a model *prefers the chosen response* when it gives it more likelihood,
``log pi(y_w | x) > log pi(y_l | x)`` (summed over the response tokens; strict, so a tie counts as
wrong). ``eval/pref_accuracy`` is the share of held-out pairs a policy gets right, the same
definition as the lm-eval ``harness_<task>_pref`` task uses; ``eval/ref_pref_accuracy`` is the SFT
reference's. ``eval/reward_accuracy`` ranks by the implicit reward of the DPO paper instead,
``log pi(y|x) / pi_ref(y|x)`` (the beta-free margin ``[log pi/pi_ref](y_w) - [log pi/pi_ref](y_l)
> 0``), which is what DPO's ``train/rewards_acc`` measures on training pairs.
"""

from __future__ import annotations

import torch

from harness.methods.dpo.stage import pair_logps_table, prefers_chosen

__all__ = ["implicit_reward_correct", "pair_logps_table", "prefers_chosen"]


def implicit_reward_correct(policy: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per pair 1.0 when the implicit-reward margin (log-ratio of chosen minus rejected) is > 0.

    policy, reference: [N, 2] summed log-probs (chosen, rejected) under each model.
    """
    ratio = policy - reference
    return (ratio[:, 0] > ratio[:, 1]).float().tolist()
