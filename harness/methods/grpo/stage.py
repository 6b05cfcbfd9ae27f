"""GRPO (DeepSeekMath, Shao et al. 2024): group-relative advantages, no critic.

For each prompt, G responses are sampled; each response's advantage is
``A_j = (R_j - mu) / (sigma + eps)`` over its group (or ``R_j - mu`` for Dr. GRPO). The loss is the
clipped surrogate over the response tokens plus ``beta * k3`` KL to the frozen reference:

    L = agg_t[ -min(c_t A, clip(c_t, 1 - eps, 1 + eps_high) A) + beta * KL_k3(pi || pi_ref)_t ]

with the aggregation ``agg`` chosen by ``loss_type`` (grpo: per sequence, then over the batch;
bnpo: over the minibatch's tokens; dapo: over the active tokens of the whole rollout batch, as DAPO
and TRL; dr_grpo: over B x max_new_tokens).
"""

from __future__ import annotations

from harness.methods.grpo import METHOD, GRPOConfig
from harness.methods.losses import (
    aggregate_loss,
    group_relative_advantages,
    kl_k3,
    ppo_clipped_surrogate,
)
from harness.methods.rl_base import GroupModule, GroupStage


class GRPOModule(GroupModule):
    """Thin Lightning shell: rollout -> group advantages -> clipped updates with a k3 KL penalty."""

    cfg: GRPOConfig

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        ro = self.group_rollout(batch)
        adv = group_relative_advantages(ro.scores, cfg.group_size, scale_rewards=cfg.scale_rewards)
        reduction = self.reduction
        # dapo: every minibatch divides by the active tokens of the whole rollout batch (under
        # DDP the global batch's, over the world size)
        n_active = reduction.share(ro.mask.sum()) if cfg.loss_type == "dapo" else None

        def policy_loss(idx, logp, mask):
            a = adv[idx, None].expand_as(logp)
            agg, n = reduction.normaliser(cfg.loss_type, mask, n_active)
            pg, stats = ppo_clipped_surrogate(logp, ro.old_logp[idx], a, mask, cfg.clip_eps,
                                              cfg.clip_eps_high, aggregation=agg,
                                              max_len=cfg.rollout.max_new_tokens, n_active=n)
            stats.update(pg_loss=pg.detach())
            if ro.ref_logp is None:  # beta = 0: no reference pass, no KL term (pg + 0 * KL = pg)
                return pg, stats
            kl = aggregate_loss(kl_k3(logp, ro.ref_logp[idx]), mask, agg,
                                max_len=cfg.rollout.max_new_tokens, n_active=n)
            stats.update(kl_k3_per_token=kl.detach())
            return pg + cfg.beta * kl, stats

        self.policy_update(ro, adv, batch_idx, policy_loss)


class GRPOStage(GroupStage, method=METHOD):
    module = GRPOModule
