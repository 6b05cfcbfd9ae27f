"""Bradley–Terry reward model (seed): ``J_RM = -E log sigma(r(x, y_w) - r(x, y_l))``.

The reward model is a copy of the SFT model with a scalar head. The reward of a sequence is the
head's output at its last real token (``pooling: last``, InstructGPT, the default) or the mean of
the head's outputs over the response tokens (``pooling: mean``); ``last`` is the default
(``results/FINDINGS.md`` has what mean pooling did to PPO on arith).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from harness.methods.base import AlignmentModule
from harness.methods.config import RMConfig
from harness.methods.losses import (
    bradley_terry_loss,
    last_valid_index,
    masked_mean,
    pairwise_accuracy,
)
from harness.models.hf import load_checkpoint, save_checkpoint
from harness.models.llama import ScalarHead
from harness.stage import Budget, Built, Fit, Stage, scalar_head

SCORE_HEAD_FILE = "score_head.pt"


def pool_scores(scores: torch.Tensor, response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per-token scores [B, T] -> sequence rewards [B] over the response positions [B, T].

    last: the score at the last response token (the EOS when there is one); mean: their average.
    """
    mask = response_mask.float()
    if pooling == "mean":
        return masked_mean(scores, mask, dim=-1)
    if pooling != "last":
        raise ValueError(f"reward pooling {pooling!r}: must be 'last' or 'mean'")
    last = last_valid_index(mask).clamp(min=0)
    return scores.gather(1, last[:, None]).squeeze(1)


def sequence_reward(rm: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    response_mask: torch.Tensor, pooling: str = "last",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) [B] from the scalar head pooled over the response; plus the MoE aux loss.

    input_ids / attention_mask / response_mask: [B, T]; response_mask marks response tokens.
    """
    scores, aux = rm(input_ids, attention_mask)
    return pool_scores(scores, response_mask, pooling), aux


def pair_rewards(rm: ScalarHead, batch: dict[str, torch.Tensor], pooling: str = "last"):
    """Rewards of the chosen and rejected sequences [B] each (right-padded, no mask needed)."""
    out = []
    aux_total = torch.zeros(())
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        r, aux = sequence_reward(rm, ids, None, labels != -100, pooling)
        out.append(r)
        aux_total = aux_total + aux
    return out[0], out[1], aux_total


class RewardModule(AlignmentModule):
    """Thin Lightning shell around :func:`bradley_terry_loss`."""

    def __init__(self, rm: ScalarHead, cfg: RMConfig) -> None:
        super().__init__(cfg.optim, cfg.max_steps)
        self.rm = rm
        self.cfg = cfg

    def trainable_modules(self):
        return [self.rm]

    def training_step(self, batch, batch_idx):
        rc, rr, aux = pair_rewards(self.rm, batch, self.cfg.pooling)
        loss = self.checked("train/loss", bradley_terry_loss(rc, rr) + aux)
        b = rc.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log("train/rewards_acc", pairwise_accuracy(rc, rr), prog_bar=True, on_step=True,
                 on_epoch=False, batch_size=b)
        self.log("train/rewards_margin", (rc - rr).mean().detach(), on_step=True, on_epoch=False,
                 batch_size=b)
        self.log_throughput(int(batch["chosen_attention_mask"].sum()
                                + batch["rejected_attention_mask"].sum()))
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr, _ = pair_rewards(self.rm, batch, self.cfg.pooling)
        b = rc.shape[0]
        self.log_dict({"val/loss": bradley_terry_loss(rc, rr), "val/rewards_acc":
                       pairwise_accuracy(rc, rr)}, on_step=False, on_epoch=True, batch_size=b)


def rm_scorer(rm: ScalarHead, pooling: str) -> Callable:
    """Sequence reward = the learned reward model's score pooled over the sampled response."""
    rm.eval()

    def score(prompts, responses, input_ids, attention_mask, prompt_len):
        rm.to(input_ids.device)  # not a submodule of the Lightning module: follow the policy
        response_mask = attention_mask.clone()
        response_mask[:, :prompt_len] = 0
        return sequence_reward(rm, input_ids, attention_mask, response_mask, pooling)[0]
    return score


def scorer_of(built: Built) -> Callable:
    """The rollout scorer of a finished reward-model stage (pooled as its config says)."""
    return rm_scorer(built.model, built.config.pooling)


class RewardStage(Stage):
    """The reward model, built on the SFT base and cached: PPO and ``reward_source=rm`` use it."""

    data = "pairs"
    name = "rm"
    config = RMConfig
    base = True
    produces_policy = False
    reference = None

    def build(self, ctx, cfg: RMConfig, inputs) -> Fit:
        rm = scalar_head(inputs["sft"].model, ctx.model_cfg.lora)
        return Fit(RewardModule(rm, cfg), ctx.datamodule("pairs", cfg),
                   Budget(max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                          val_every=cfg.val_every),
                   model=rm, networks={"reward_model": rm}, trainable=[rm],
                   sequences=2 * cfg.batch_size, layout=f"{cfg.batch_size} pairs")

    def sized(self, cfg: RMConfig, batch: int, n_batches: int) -> RMConfig:
        return replace(cfg, batch_size=max(1, batch // 2), max_steps=n_batches)

    def summary_metrics(self, metrics):
        out = super().summary_metrics(metrics)
        if "val/rewards_acc" in out:
            out["eval/rewards_acc"] = out["val/rewards_acc"]
        return out

    def save(self, model: ScalarHead, path: Path, tokenizer, resolved: dict) -> None:
        """The backbone as an HF folder (merged, its adapter in ``adapter/``, when it has LoRA
        adapters) plus ``score_head.pt`` for the scalar head."""
        from harness.models.lora import has_lora, merged, save_adapter

        backbone = model.backbone
        save_checkpoint(merged(backbone) if has_lora(backbone) else backbone, path,
                        tokenizer=tokenizer, resolved_config=resolved)
        if has_lora(backbone):
            save_adapter(backbone, path / "adapter")
        torch.save(model.score.state_dict(), path / SCORE_HEAD_FILE)

    def load(self, path: Path) -> ScalarHead:
        backbone, _, _ = load_checkpoint(path)
        rm = ScalarHead(backbone)
        rm.score.load_state_dict(torch.load(path / SCORE_HEAD_FILE, weights_only=True))
        return rm
