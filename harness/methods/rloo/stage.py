"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024, "Back to Basics"): k samples per prompt,
each one's baseline the mean reward of the other k - 1, no critic.

Per rollout batch (k = ``group_size`` samples per prompt):

    R_i = score_i - beta * sum_t log(pi_old / pi_ref)_t       (kl_penalty: reward, the default)
    R_i = score_i                                             (kl_penalty: loss)
    A_i = R_i - 1/(k-1) sum_{j != i} R_j                      (:func:`rloo_advantages`)
    L   = 1/B sum_i sum_t -min(c_t A_i, clip(c_t) A_i)  [+ beta KL_k3 per token, kl_penalty: loss]

(:func:`~harness.methods.losses.rloo_policy_loss`). With one pass over one minibatch the ratio is
1 and this is REINFORCE on the sequence log-probability; more passes are clipped as in PPO.
"""

from __future__ import annotations

from harness.methods.losses import (
    rloo_advantages,
    rloo_policy_loss,
    sequence_kl_shaped_rewards,
)
from harness.methods.rl_base import GroupModule, GroupStage
from harness.methods.rloo import METHOD, RLOOConfig


class RLOOModule(GroupModule):
    """Thin Lightning shell: rollout -> leave-one-out advantages -> clipped REINFORCE updates."""

    cfg: RLOOConfig

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        ro = self.group_rollout(batch)
        in_reward = cfg.kl_penalty == "reward"
        ref = ro.ref_logp  # None at beta = 0: the KL term is 0 wherever it sits
        rewards = (sequence_kl_shaped_rewards(ro.scores, ro.old_logp, ref, ro.mask, cfg.beta)
                   if in_reward and ref is not None else ro.scores)
        adv = rloo_advantages(rewards, cfg.group_size)

        def policy_loss(idx, logp, mask):
            return rloo_policy_loss(logp, ro.old_logp[idx], None if ref is None else ref[idx],
                                    adv[idx], mask, cfg.clip_eps, 0.0 if in_reward else cfg.beta)

        self.policy_update(ro, adv, batch_idx, policy_loss)


class RLOOStage(GroupStage, method=METHOD):
    module = RLOOModule
