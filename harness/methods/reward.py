"""Bradley–Terry reward model (seed): ``J_RM = -E log sigma(r(x, y_w) - r(x, y_l))``.

The reward model is a copy of the SFT model with a scalar head. The reward of a sequence is the
head's output at its last real token (``pooling: last``, InstructGPT, the default) or the mean of
the head's outputs over the response tokens (``pooling: mean``). On ``arith``, PPO against a
mean-pooled reward model lowered the gold reward (0.615 -> 0.41 on llama_small), so ``last`` stays
the default.
"""

from __future__ import annotations

import torch

from harness.config import RMConfig
from harness.methods.base import AlignmentModule
from harness.methods.losses import bradley_terry_loss, masked_mean, pairwise_accuracy
from harness.models.llama import ScalarHead


def pool_scores(scores: torch.Tensor, response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per-token scores [B, T] -> sequence rewards [B] over the response positions [B, T].

    last: the score at the last response token (the EOS when there is one); mean: their average.
    """
    mask = response_mask.float()
    if pooling == "mean":
        return masked_mean(scores, mask, dim=-1)
    if pooling != "last":
        raise ValueError(f"reward pooling {pooling!r}: must be 'last' or 'mean'")
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, -1).max(dim=1).values.clamp(min=0)
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
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr, _ = pair_rewards(self.rm, batch, self.cfg.pooling)
        b = rc.shape[0]
        self.log_dict({"val/loss": bradley_terry_loss(rc, rr), "val/rewards_acc":
                       pairwise_accuracy(rc, rr)}, on_step=False, on_epoch=True, batch_size=b)
