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

import copy
from collections.abc import Callable

import torch

from harness.methods.config import planned_budget
from harness.methods.losses import (
    adaptive_kl_coef,
    check_finite,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_log_ratio,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_clipped_surrogate,
)
from harness.methods.optim import build_optimizer
from harness.methods.ppo import METHOD, PPOConfig
from harness.methods.rl_base import OnPolicyModule, OnPolicyStage
from harness.methods.rollout import minibatches, response_logprobs
from harness.models.llama import CausalLM, ScalarHead
from harness.stage import Fit, policy_from, scalar_head
from harness.util.distributed import world_size


def critic_values(critic: ScalarHead, ro_input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V(s_t) [B, N] for the states before each response token, and the critic's MoE aux loss."""
    scores, aux = critic(ro_input_ids, attention_mask)
    return scores[:, prompt_len - 1:prompt_len - 1 + n_new], aux


class PPOModule(OnPolicyModule):
    """Policy + critic (its own network) updated together from each rollout batch."""

    RESUME_ATTRS = (*OnPolicyModule.RESUME_ATTRS, "beta")  # the adaptive KL coefficient

    def __init__(self, policy: CausalLM, reference: CausalLM, critic: ScalarHead, tokenizer,
                 cfg: PPOConfig, score_fn: Callable, seed: int) -> None:
        super().__init__(policy, reference, tokenizer, cfg.optim,
                         cfg.n_iterations * planned_budget(cfg)["steps_per_batch"], cfg.rollout,
                         seed, ref_sync=cfg.ref_sync)
        self.critic = critic
        self.cfg = cfg
        self.score_fn = score_fn
        self.beta = cfg.beta

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
        with torch.no_grad(), self.region("value"):
            old_values, _ = critic_values(self.critic, ro.input_ids, ro.attention_mask,
                                          ro.prompt_len, n_new)
            old_values = old_values * ro.mask
        with torch.no_grad():
            rewards = kl_penalized_rewards(ro.scores, ro.old_logp, ro.ref_logp, ro.mask,
                                           self.beta)
            adv, returns = gae_advantages(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
            # under DDP: statistics and token counts of the global batch (every rank holds a
            # part), so a run on W ranks updates as the one-rank run at the same global batch
            reduction = self.reduction
            if cfg.whiten_advantages:
                adv = masked_whiten(adv, ro.mask, sum_fn=reduction.sum_fn)

        def minibatch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
            mask = ro.mask[idx]
            # without a bonus (ent_coef 0) the entropy is logged only: no gradient through it,
            # which would add exact zeros to the logits' gradient
            logp, ent, aux_p = response_logprobs(
                self.policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len,
                cfg.rollout.temperature, with_entropy=True, entropy_grad=cfg.ent_coef > 0)
            # token means over the minibatch (under DDP the global minibatch's tokens over the
            # world size: the ranks' k-th minibatches form it)
            agg, n_tok = reduction.normaliser("bnpo", mask)
            pg, stats = ppo_clipped_surrogate(logp, ro.old_logp[idx], adv[idx], mask,
                                              cfg.clip_eps, aggregation=agg, n_active=n_tok)
            entropy = masked_mean(ent, mask) if n_tok is None else masked_sum(ent, mask) / n_tok
            values, aux_c = critic_values(self.critic, ro.input_ids[idx], ro.attention_mask[idx],
                                          ro.prompt_len, n_new)
            vf, vstats = clipped_value_loss(values, old_values[idx], returns[idx], mask,
                                            cfg.value_clip, n_tokens=n_tok)
            loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * vf + aux_p + aux_c
            return loss, {**stats, **vstats, "pg_loss": pg.detach(), "value_loss": vf.detach(),
                          "entropy": entropy.detach(), "moe_aux_loss": (aux_p + aux_c).detach()}

        (opt_p, opt_c), (sched_p, sched_c) = self.optimizers(), self.lr_schedulers()
        extra = {"explained_var": [explained_variance(old_values, returns, ro.mask,
                                                      reduction.sum_fn)],
                 "beta": [torch.tensor(self.beta)]}  # the coefficient this batch was shaped with
        self.update(ro, adv[ro.mask.bool()], batch_idx, minibatch_loss,
                    lambda: minibatches(len(ro), cfg.minibatch_size, self.generator),
                    cfg.update_epochs, (opt_p, sched_p, cfg.optim),
                    (opt_c, sched_c, cfg.critic_optim), extra=extra)
        # minibatches partition the rollout: one host sync per rollout, not per minibatch
        self.tokens_trained += cfg.update_epochs * int(ro.attention_mask.sum())
        if cfg.adaptive_kl:
            kl_rows = (kl_log_ratio(ro.old_logp, ro.ref_logp) * ro.mask).sum(-1)
            observed_kl = float(kl_rows.mean() if reduction.sum_fn is None
                                else reduction.sum_fn(kl_rows.sum()) / (len(ro) * world_size()))
            self.beta = adaptive_kl_coef(self.beta, observed_kl, cfg.target_kl,
                                         cfg.kl_horizon, len(ro))


class PPOStage(OnPolicyStage, method=METHOD):
    """PPO on the cached reward model's scores (``reward_source=rm``) or the task's gold reward
    (``gold``); the critic starts from the reward model or the SFT base (``critic_start``)."""

    def build(self, ctx, cfg: PPOConfig, inputs) -> Fit:
        rm = inputs["rm"].model if "rm" in inputs else None
        sft = inputs["sft"].model
        lora = ctx.model_cfg.lora
        if cfg.critic_start == "rm":
            critic = copy.deepcopy(rm)
            if lora.r and lora.reward_and_critic:
                from harness.models.lora import add_lora

                add_lora(critic.backbone, lora)
        else:
            critic = scalar_head(sft, lora)
        policy, reference = policy_from(inputs, ctx.model_cfg.lora)
        module = PPOModule(policy, reference, critic, ctx.tokenizer, cfg,
                           self.scorer(ctx, cfg, inputs), ctx.seed)
        n = cfg.rollout.prompts_per_batch
        networks = {"policy": policy, "reference": reference, "critic": critic}
        if rm is not None:
            networks["reward_model"] = rm
        return Fit(module, ctx.prompt_loader(n, cfg.n_iterations), self.budget(cfg), model=policy,
                   networks=networks, trainable=[policy, critic])
