"""Shared shell of the on-policy methods (PPO, GRPO): manual optimisation over rollout batches.

One Lightning training step = one rollout batch: sample, score, then several optimiser steps over
minibatches of it. Lightning's epoch is the configured number of rollout batches.
"""

from __future__ import annotations

import time

import torch

from harness.config import OptimConfig, RolloutConfig
from harness.methods.base import AlignmentModule
from harness.methods.losses import kl_log_ratio, masked_mean
from harness.methods.rollout import Rollout, make_rollout
from harness.models.llama import CausalLM
from harness.seeding import generator


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the reference policy and the reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class OnPolicyModule(AlignmentModule):
    """Holds the policy, the frozen reference, the tokenizer and a seeded sampling generator.

    ``seed`` is the run's seed; the sampler draws from its ``rollout`` stream.
    """

    def __init__(self, policy: CausalLM, reference: CausalLM, tokenizer, optim: OptimConfig,
                 total_steps: int, rollout: RolloutConfig, seed: int, samples_every: int = 10,
                 ) -> None:
        super().__init__(optim, total_steps)
        self.automatic_optimization = False
        self.policy = policy
        self.reference = freeze(reference)
        self.tokenizer = tokenizer
        self.rollout_cfg = rollout
        self.samples_every = samples_every
        #: the sampler's and the minibatch order's stream (``harness.seeding``, stream "rollout")
        self.generator = generator(seed, "rollout")
        self._t_iter: float | None = None

    def trainable_modules(self):
        return [self.policy]

    def rollout(self, prompts: list[str], max_len: int, score_fn) -> Rollout:
        """Sample and score one rollout batch from the policy; counts its generated tokens."""
        ro = make_rollout(self.policy, self.reference, self.tokenizer, prompts, self.rollout_cfg,
                          max_len, score_fn, self.generator)
        self.tokens_generated += int(ro.mask.sum())
        self.gen_seconds += ro.gen_s
        return ro

    def step(self, opt, sched, loss: torch.Tensor) -> None:
        """zero_grad -> backward -> clip -> optimiser step -> scheduler step."""
        opt.zero_grad()
        self.manual_backward(loss)
        if self.optim_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip,
                                gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    @staticmethod
    def accumulate(acc: dict[str, list[torch.Tensor]], stats: dict) -> None:
        """Collect one minibatch's statistics; ``log_rollout`` logs their mean per rollout batch."""
        for k, v in stats.items():
            acc.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32))

    def log_rollout(self, ro: Rollout, adv: torch.Tensor, stats: dict[str, list[torch.Tensor]],
                    iteration: int) -> None:
        """Log the DESIGN.md metric names for one rollout batch and the update made from it."""
        now = time.perf_counter()
        k1 = kl_log_ratio(ro.old_logp, ro.ref_logp)
        metrics = {
            "train/reward": ro.scores.mean(),
            "train/reward_std": ro.scores.std() if len(ro) > 1 else torch.zeros(()),
            # KL(pi_old || pi_ref): the sequence-level k1 sum (nats per response), as eval/kl
            "train/kl": (k1 * ro.mask).sum(-1).mean(),
            "train/kl_per_token": masked_mean(k1, ro.mask),
            "train/response_len": ro.mask.sum(-1).mean(),
            "train/adv_mean": adv.mean(),
            "train/adv_std": adv.std() if adv.numel() > 1 else torch.zeros(()),
        }
        for k, vs in stats.items():
            metrics[f"train/{k}"] = torch.stack(vs).mean()
        if self._t_iter is not None:
            tokens = float(ro.attention_mask.sum())
            metrics["train/tokens_per_s"] = torch.tensor(tokens / max(now - self._t_iter, 1e-9))
        self._t_iter = now
        self.log_dict({k: v.float() for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=len(ro))
        self.log("reward", metrics["train/reward"], prog_bar=True, on_step=True, logger=False,
                 batch_size=len(ro))
        if iteration % self.samples_every == 0:
            self.log_samples(ro, iteration)

    def log_samples(self, ro: Rollout, iteration: int, n: int = 8) -> None:
        """Sample generations as a W&B table (``train/samples``), when the logger has tables."""
        logger = self.logger
        if logger is None or not hasattr(logger, "log_table"):
            return
        rows = [[iteration, p, r, float(s)] for p, r, s in
                zip(ro.prompts[:n], ro.responses[:n], ro.scores[:n].tolist(), strict=True)]
        logger.log_table("train/samples", columns=["iteration", "prompt", "response", "reward"],
                         data=rows)
