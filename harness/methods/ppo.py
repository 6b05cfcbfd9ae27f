"""PPO for language models (InstructGPT; "Secrets of RLHF", Zheng et al. 2023), as in the seed.

Per rollout batch:
    r_t   = -beta (log pi_old - log pi_ref)_t  (+ RM score at the last response token)
    A_t   = GAE(gamma, lambda) over the critic's V(s_t), whitened over the batch
    L     = -min(c_t A_t, clip(c_t, 1-eps, 1+eps) A_t)            (clipped surrogate)
            - w_ent * H(pi_theta)                                   (entropy bonus)
            + w_vf * 0.5 max((V-R)^2, (clip(V, V_old +- c) - R)^2) (clipped value loss)
            + MoE auxiliary losses
and several epochs of minibatch updates; beta fixed or adapted (Ziegler et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.config import PPOConfig
from harness.methods.losses import (
    adaptive_kl_coef,
    check_finite,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_log_ratio,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_clipped_surrogate,
)
from harness.methods.optim import build_optimizer
from harness.methods.rl_base import OnPolicyModule
from harness.methods.rollout import minibatches, response_logprobs
from harness.models.llama import CausalLM, ScalarHead


def critic_values(critic: ScalarHead, ro_input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V(s_t) [B, N] for the states before each response token, and the critic's MoE aux loss."""
    scores, aux = critic(ro_input_ids, attention_mask)
    return scores[:, prompt_len - 1:prompt_len - 1 + n_new], aux


class PPOModule(OnPolicyModule):
    """Policy + critic (its own network) updated together from each rollout batch."""

    def __init__(self, policy: CausalLM, reference: CausalLM, critic: ScalarHead, tokenizer,
                 cfg: PPOConfig, score_fn: Callable, seed: int) -> None:
        n_mb = max(1, -(-cfg.rollout.prompts_per_batch // cfg.minibatch_size))
        super().__init__(policy, reference, tokenizer, cfg.optim,
                         cfg.n_iterations * cfg.ppo_epochs * n_mb, cfg.rollout, seed)
        self.critic = critic
        self.cfg = cfg
        self.score_fn = score_fn
        self.kl_coef = cfg.kl_coef

    def configure_optimizers(self):
        pol = build_optimizer([self.policy], self.cfg.optim, self.max_steps)
        cri = build_optimizer([self.critic], self.cfg.critic_optim, self.max_steps)
        return [pol["optimizer"], cri["optimizer"]], [pol["lr_scheduler"], cri["lr_scheduler"]]

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        self.policy.eval()  # deterministic MoE routing keeps pi/pi_old ratios meaningful
        self.critic.eval()
        ro = self.rollout(list(batch), cfg.max_len, self.score_fn)
        check_finite("train/reward", ro.scores)
        n_new = ro.mask.shape[1]
        with torch.no_grad():
            old_values, _ = critic_values(self.critic, ro.input_ids, ro.attention_mask,
                                          ro.prompt_len, n_new)
            old_values = old_values * ro.mask
            rewards = kl_penalized_rewards(ro.scores, ro.old_logp, ro.ref_logp, ro.mask,
                                           self.kl_coef)
            adv, returns = gae_advantages(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = masked_whiten(adv, ro.mask)
        (opt_p, opt_c), (sched_p, sched_c) = self.optimizers(), self.lr_schedulers()
        stats_acc: dict[str, list[torch.Tensor]] = {}
        for _ in range(cfg.ppo_epochs):
            for idx in minibatches(len(ro), cfg.minibatch_size, self.generator):
                mask = ro.mask[idx]
                logp, ent, aux_p = response_logprobs(
                    self.policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len,
                    cfg.rollout.temperature, with_entropy=True)
                pg, stats = ppo_clipped_surrogate(logp, ro.old_logp[idx], adv[idx], mask,
                                                  cfg.clip_eps, aggregation="token")
                entropy = masked_mean(ent, mask)
                values, aux_c = critic_values(self.critic, ro.input_ids[idx],
                                              ro.attention_mask[idx], ro.prompt_len, n_new)
                vf, vstats = clipped_value_loss(values, old_values[idx], returns[idx], mask,
                                                cfg.value_clip)
                loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * vf + aux_p + aux_c
                self.checked("train/loss", loss)
                opt_p.zero_grad()
                opt_c.zero_grad()
                self.manual_backward(loss)
                for opt, oc in ((opt_p, cfg.optim), (opt_c, cfg.critic_optim)):
                    if oc.grad_clip:
                        self.clip_gradients(opt, gradient_clip_val=oc.grad_clip,
                                            gradient_clip_algorithm="norm")
                    opt.step()
                sched_p.step()
                sched_c.step()
                stats.update(vstats)
                stats.update(loss=loss.detach(), pg_loss=pg.detach(), value_loss=vf.detach(),
                             entropy=entropy.detach(), moe_aux_loss=(aux_p + aux_c).detach())
                self.accumulate(stats_acc, stats)
        # minibatches partition the rollout: one host sync per rollout, not per minibatch
        self.tokens_trained += cfg.ppo_epochs * int(ro.attention_mask.sum())
        observed_kl = float((kl_log_ratio(ro.old_logp, ro.ref_logp) * ro.mask).sum(-1).mean())
        stats_acc["explained_var"] = [explained_variance(old_values, returns, ro.mask)]
        stats_acc["kl_coef"] = [torch.tensor(self.kl_coef)]
        if cfg.adaptive_kl:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, observed_kl, cfg.target_kl,
                                            cfg.kl_horizon, len(ro))
        self.log_rollout(ro, adv[ro.mask.bool()], stats_acc, batch_idx)
