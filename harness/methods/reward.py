"""Bradley–Terry reward model (seed): ``J_RM = -E log sigma(r(x, y_w) - r(x, y_l))``.

The reward model is a copy of the SFT model with a scalar head; the reward of a sequence is the
head's output at its last real token.
"""

from __future__ import annotations

import torch

from harness.config import RMConfig
from harness.methods.base import AlignmentModule
from harness.methods.losses import bradley_terry_loss, pairwise_accuracy
from harness.models.llama import ScalarHead


def sequence_reward(rm: ScalarHead, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, last_index: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) [B]: the scalar head at each row's last real token; plus the MoE aux loss."""
    scores, aux = rm(input_ids, attention_mask)
    return scores.gather(1, last_index[:, None]).squeeze(1), aux


def pair_rewards(rm: ScalarHead, batch: dict[str, torch.Tensor]):
    """Rewards of the chosen and rejected sequences [B] each (right-padded, no mask needed)."""
    out = []
    aux_total = torch.zeros(())
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        r, aux = sequence_reward(rm, ids, None, mask.sum(-1).long() - 1)
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
        rc, rr, aux = pair_rewards(self.rm, batch)
        loss = self.checked("train/loss", bradley_terry_loss(rc, rr) + aux)
        b = rc.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log("train/accuracy", pairwise_accuracy(rc, rr), prog_bar=True, on_step=True,
                 on_epoch=False, batch_size=b)
        self.log("train/reward_margin", (rc - rr).mean().detach(), on_step=True, on_epoch=False,
                 batch_size=b)
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr, _ = pair_rewards(self.rm, batch)
        b = rc.shape[0]
        self.log_dict({"val/loss": bradley_terry_loss(rc, rr), "val/accuracy":
                       pairwise_accuracy(rc, rr)}, on_step=False, on_epoch=True, batch_size=b)
