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

from dataclasses import dataclass

import torch

from harness.config import one_of
from harness.methods.losses import (
    masked_mean,
    rloo_advantages,
    rloo_policy_loss,
    sequence_kl_shaped_rewards,
)
from harness.methods.rl_base import GroupConfig, GroupModule, GroupStage
from harness.methods.rollout import minibatches, response_logprobs


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO: ``group_size`` (k) samples per prompt, leave-one-out baselines, no critic (the shared
    fields: :class:`~harness.methods.rl_base.GroupConfig`).

    ``beta``: the KL coefficient, as a per-token reward penalty summed over the response
    (``kl_penalty: reward``, RLOO's and TRL's original form) or a k3 term in the loss
    (``kl_penalty: loss``, as GRPO).
    """

    name: str = "rloo"
    beta: float = 0.05
    kl_penalty: str = "reward"      # reward | loss

    def check(self, prefix: str = "method") -> None:
        super().check(prefix)
        one_of(self, prefix, "kl_penalty", ("reward", "loss"))


class RLOOModule(GroupModule):
    """Thin Lightning shell: rollout -> leave-one-out advantages -> clipped REINFORCE updates."""

    cfg: RLOOConfig

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        ro = self.group_rollout(batch)
        in_reward = cfg.kl_penalty == "reward"
        rewards = (sequence_kl_shaped_rewards(ro.scores, ro.old_logp, ro.ref_logp, ro.mask, cfg.beta)
                   if in_reward else ro.scores)
        adv = rloo_advantages(rewards, cfg.group_size)
        opt, sched = self.optimizers(), self.lr_schedulers()
        stats_acc: dict[str, list[torch.Tensor]] = {}
        for _ in range(cfg.update_epochs):
            for idx in minibatches(len(ro), cfg.minibatch_size, self.generator):
                mask = ro.mask[idx]
                logp, ent, aux = response_logprobs(
                    self.policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len,
                    cfg.rollout.temperature, with_entropy=True, entropy_grad=False)
                pg, stats = rloo_policy_loss(logp, ro.old_logp[idx], ro.ref_logp[idx], adv[idx],
                                             mask, cfg.clip_eps, 0.0 if in_reward else cfg.beta)
                loss = self.checked("train/loss", pg + aux)
                self.step(loss, (opt, sched, cfg.optim))
                stats.update(loss=loss.detach(), entropy=masked_mean(ent, mask),
                             moe_aux_loss=aux.detach())
                self.accumulate(stats_acc, stats)
        self.tokens_trained += cfg.update_epochs * int(ro.attention_mask.sum())
        self.log_rollout(ro, adv, stats_acc, batch_idx)


class RLOOStage(GroupStage):
    name = "rloo"
    config = RLOOConfig
    module = RLOOModule
