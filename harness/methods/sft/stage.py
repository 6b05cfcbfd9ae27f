"""Supervised fine-tuning: next-token cross-entropy on the response tokens only.

    L_SFT = - (1 / |R|) sum_{t in R} log pi_theta(y_t | y_<t, x)   (+ MoE auxiliary loss)

R is the set of response positions (prompt tokens carry the label -100 and are masked out).
"""

from __future__ import annotations

import torch

from harness.methods.base import AlignmentModule
from harness.methods.losses import masked_mean, token_logprobs
from harness.methods.sft import METHOD, SFTConfig
from harness.models.llama import CausalLM
from harness.stage import Budget, Fit, Stage
from harness.util.distributed import all_reduce_sum, world_size


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             global_tokens: torch.Tensor | None = None, world: int = 1,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of response tokens.

    logits: [B, T, V] for input positions; labels: [B, T] aligned with the inputs, -100 where
    masked. Position t predicts labels[t + 1]. Returns (loss, number of response tokens).

    Under DDP (``world`` ranks, ``global_tokens`` = response tokens of the global batch) the loss is
    ``world · Σ nll / global_tokens``: DDP averages the ranks' gradients, so the update is that of
    the mean over every token of the global batch, as in one process (each rank's own mean would
    weight a rank's tokens by its share of them; transformers' ``num_items_in_batch`` does the same).
    """
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    logps = token_logprobs(logits[:, :-1], targets, mask)
    if global_tokens is None or world == 1:
        return -masked_mean(logps, mask), mask.sum()
    return -(logps * mask).sum() * world / global_tokens.clamp(min=1.0), mask.sum()


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
        world = world_size()
        tokens = all_reduce_sum((batch["labels"][:, 1:] != -100).sum().float()) if world > 1 else None
        nll, n_tokens = sft_loss(out.logits, batch["labels"], tokens, world)
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


class SFTStage(Stage, method=METHOD):
    """The SFT base every other stage builds on: a fresh backbone trained on the demonstrations."""

    data = "sft"
    reference = None

    def needs(self, cfg: SFTConfig) -> tuple[str, ...]:
        return ()

    def untrained(self, ctx, cfg: SFTConfig) -> CausalLM | None:
        return None if cfg.enabled else ctx.new_policy()

    def build(self, ctx, cfg: SFTConfig, inputs) -> Fit:
        policy = ctx.new_policy()
        if ctx.model_cfg.lora.r:  # adapters on the (pretrained) backbone; saved merged
            from harness.models.lora import add_lora

            add_lora(policy, ctx.model_cfg.lora)
        return Fit(SFTModule(policy, cfg), ctx.datamodule("sft", cfg),
                   Budget(max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                          val_every=cfg.val_every),
                   model=policy, networks={"policy": policy}, trainable=[policy])
