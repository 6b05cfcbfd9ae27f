"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
``OnlineDPOTrainer``): DPO on pairs the current policy samples, ranked by the reward source.

Per rollout batch (k = ``group_size`` responses to each prompt, sampled from pi_theta):

    (y_w, y_l) = (argmax_j R_j, argmin_j R_j)  per prompt, if max R > min R   (:func:`online_pairs`)
    h          = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)
    L          = mean over the pairs of -log sigma(beta h)            (:func:`dpo_loss`)

The reference log-probabilities come from the rollout's reference pass (the same numbers a
GRPO rollout computes), the policy's from a forward over the chosen and rejected rows only. It
puts DPO on the online methods' footing: the same prompts, responses and reward calls as GRPO and
RLOO at the same budget; offline DPO (:mod:`harness.methods.dpo.stage`) stays the pairs' method.
"""

from __future__ import annotations

import torch

from harness.methods.losses import dpo_loss, online_pairs, pairwise_accuracy
from harness.methods.online_dpo import METHOD, OnlineDPOConfig
from harness.methods.rl_base import GroupModule, GroupStage
from harness.methods.rollout import minibatches, response_logprobs


class OnlineDPOModule(GroupModule):
    """Thin Lightning shell: rollout -> best/worst pairs -> DPO updates against the reference."""

    cfg: OnlineDPOConfig

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        ro = self.group_rollout(batch)
        chosen, rejected, valid = online_pairs(ro.scores, cfg.group_size)
        valid = valid.float()
        reduction = self.reduction
        ref = (ro.ref_logp * ro.mask).sum(-1)  # [B] sequence log-probs under the reference

        def minibatch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
            w = valid[idx]
            # the minibatch's pairs (the global minibatch's under DDP, whose ranks average their
            # gradients: each divides its sum by the global count over the world size)
            n = reduction.share(w.sum())
            if not n > 0:  # only ties: no preference to learn from (every rank agrees)
                return None
            rows = torch.cat((chosen[idx], rejected[idx]))
            logp, _, aux = response_logprobs(self.policy, ro.input_ids[rows],
                                             ro.attention_mask[rows], ro.prompt_len,
                                             cfg.rollout.temperature)
            seq = (logp * ro.mask[rows]).sum(-1)
            b = len(idx)
            losses, rc, rr = dpo_loss(seq[:b], seq[b:], ref[chosen[idx]], ref[rejected[idx]],
                                      cfg.beta, cfg.label_smoothing, cfg.loss_type)
            self.tokens_trained += int(ro.attention_mask[rows].sum())
            kept = w.bool()
            self.pairs_seen += int(kept.sum())
            stats = {"moe_aux_loss": aux.detach()}
            if kept.any():
                stats.update(rewards_chosen=rc[kept].mean(), rewards_rejected=rr[kept].mean(),
                             rewards_margin=(rc - rr)[kept].mean(),
                             rewards_acc=pairwise_accuracy(rc[kept], rr[kept]))
            return (losses * w).sum() / n + aux, stats

        self.update(ro, None, batch_idx, minibatch_loss,
                    lambda: minibatches(len(chosen), cfg.minibatch_size, self.generator),
                    cfg.update_epochs, (self.optimizers(), self.lr_schedulers(), cfg.optim),
                    extra={"pair_frac": [valid.mean()]})


class OnlineDPOStage(GroupStage, method=METHOD):
    module = OnlineDPOModule
