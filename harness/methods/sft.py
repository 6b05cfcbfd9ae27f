"""Supervised fine-tuning: next-token cross-entropy on the response tokens only.

    L_SFT = - (1 / |R|) sum_{t in R} log pi_theta(y_t | y_<t, x)   (+ MoE auxiliary loss)

R is the set of response positions (prompt tokens carry the label -100 and are masked out).
"""

from __future__ import annotations

import torch

from harness.config import SFTConfig
from harness.methods.base import AlignmentModule
from harness.methods.losses import masked_mean, token_logprobs
from harness.models.llama import CausalLM


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of response tokens.

    logits: [B, T, V] for input positions; labels: [B, T] aligned with the inputs, -100 where
    masked. Position t predicts labels[t + 1]. Returns (loss, number of response tokens).
    """
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    logps = token_logprobs(logits[:, :-1], targets, mask)
    return -masked_mean(logps, mask), mask.sum()


class SFTModule(AlignmentModule):
    """Thin Lightning shell around :func:`sft_loss` for a :class:`CausalLM` policy."""

    def __init__(self, policy: CausalLM, cfg: SFTConfig) -> None:
        super().__init__(cfg.optim, cfg.max_steps)
        self.policy = policy
        self.cfg = cfg

    def trainable_modules(self):
        return [self.policy]

    def training_step(self, batch, batch_idx):
        out = self.policy(batch["input_ids"])
        nll, n_tokens = sft_loss(out.logits, batch["labels"])
        loss = self.checked("train/loss", nll + out.aux_loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/nll", nll.detach(), on_step=True, on_epoch=False)
        self.log_moe(out)
        self.log_throughput(int(batch["attention_mask"].sum()))
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.policy(batch["input_ids"])
        nll, _ = sft_loss(out.logits, batch["labels"])
        self.log("val/loss", nll, prog_bar=True, on_step=False, on_epoch=True)
