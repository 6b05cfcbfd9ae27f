"""DPO (Rafailov et al. 2023), as in the seed: a classification loss on preference pairs.

    L_DPO = -log sigma( beta [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)] )

The reference log-probabilities of every pair are computed once before training
(:func:`reference_logps`) and looked up by example index; the reference model is not run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from harness.config import OptimConfig, in_range, one_of, positive
from harness.methods.base import AlignmentModule
from harness.methods.losses import dpo_loss, pairwise_accuracy, sequence_logprobs, token_logprobs
from harness.models.llama import CausalLM
from harness.stage import Budget, Fit, Stage, policy_from


@dataclass
class DPOConfig:
    """DPO on the task's preference pairs against the frozen SFT reference.

    ``beta``: the KL coefficient (the temperature of the implicit reward); ``label_smoothing`` > 0
    is conservative DPO; ``loss_type``: sigmoid (DPO) or ipo.
    """

    name: str = "dpo"
    max_steps: int = 300
    batch_size: int = 32
    max_len: int = 128
    overflow: str = "truncate"      # truncate | skip
    val_every: int = 100
    beta: float = 0.5
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"      # sigmoid | ipo
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))

    def check(self, prefix: str = "method") -> None:
        positive(self, prefix, "max_steps", "batch_size", "max_len", "val_every", "beta")
        one_of(self, prefix, "overflow", ("truncate", "skip"))
        in_range(self, prefix, "label_smoothing", 0.0, 0.5, closed_hi=False)
        one_of(self, prefix, "loss_type", ("sigmoid", "ipo"))
        self.optim.check(f"{prefix}.optim")


def pair_logps(model: CausalLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs of chosen and rejected [B] each, in one forward over 2B rows.

    batch: ``chosen_input_ids`` / ``chosen_labels`` and ``rejected_*`` [B, T*] (labels -100 on
    prompt and padding). Returns (chosen [B], rejected [B], MoE aux loss).
    """
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_lab, r_lab = batch["chosen_labels"], batch["rejected_labels"]
    t = max(c_ids.shape[1], r_ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

    ids = torch.cat((pad(c_ids, 0), pad(r_ids, 0)))
    labels = torch.cat((pad(c_lab, -100), pad(r_lab, -100)))[:, 1:]
    out = model(ids)
    mask = (labels != -100).float()
    seq = sequence_logprobs(token_logprobs(out.logits[:, :-1].float(), labels, mask), mask)
    b = c_ids.shape[0]
    return seq[:b], seq[b:], out.aux_loss


@torch.no_grad()
def reference_logps(reference: CausalLM, loader, n_examples: int) -> torch.Tensor:
    """Reference log-probs of every pair once: [n_examples, 2] (chosen, rejected), by ``index``."""
    reference.eval()
    table = torch.full((n_examples, 2), float("nan"))
    for batch in tqdm(loader, desc="DPO reference log-probs", leave=False):
        c, r, _ = pair_logps(reference, batch)
        table[batch["index"], 0] = c.float().cpu()
        table[batch["index"], 1] = r.float().cpu()
    if torch.isnan(table).any():
        raise RuntimeError("DPO reference cache: some pairs were not scored")
    return table


class DPOModule(AlignmentModule):
    """Thin Lightning shell around :func:`harness.methods.losses.dpo_loss`."""

    def __init__(self, policy: CausalLM, ref_table: torch.Tensor, cfg: DPOConfig,
                 val_ref_table: torch.Tensor | None = None) -> None:
        """ref_table / val_ref_table: [n, 2] reference log-probs of the train / validation pairs."""
        super().__init__(cfg.optim, cfg.max_steps)
        self.policy = policy
        self.register_buffer("ref_table", ref_table, persistent=False)
        self.register_buffer("val_ref_table", val_ref_table, persistent=False)
        self.cfg = cfg

    def trainable_modules(self):
        return [self.policy]

    def _losses(self, batch, table: torch.Tensor | None = None):
        pc, pr, aux = pair_logps(self.policy, batch)
        ref = (self.ref_table if table is None else table)[batch["index"]]
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.cfg.beta,
                                  self.cfg.label_smoothing, self.cfg.loss_type)
        return losses.mean(), rc, rr, aux

    def training_step(self, batch, batch_idx):
        loss, rc, rr, aux = self._losses(batch)
        total = self.checked("train/loss", loss + aux)
        b = rc.shape[0]
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({"train/rewards_chosen": rc.mean(), "train/rewards_rejected": rr.mean(),
                       "train/rewards_acc": pairwise_accuracy(rc, rr),
                       "train/rewards_margin": (rc - rr).mean()},
                      on_step=True, on_epoch=False, batch_size=b)
        if aux.requires_grad:
            self.log("train/moe_aux_loss", aux.detach(), on_step=True, on_epoch=False, batch_size=b)
        self.log_throughput(int(batch["chosen_attention_mask"].sum()
                                + batch["rejected_attention_mask"].sum()))
        return total

    def validation_step(self, batch, batch_idx):
        if self.val_ref_table is None:
            return
        loss, rc, rr, _ = self._losses(batch, self.val_ref_table)
        b = rc.shape[0]
        self.log_dict({"val/loss": loss, "val/rewards_acc": pairwise_accuracy(rc, rr)},
                      on_step=False, on_epoch=True, batch_size=b)


class DPOStage(Stage):
    """DPO from the SFT base: the reference log-probabilities of every pair are computed first."""

    data = "pairs"
    name = "dpo"
    config = DPOConfig

    def build(self, ctx, cfg: DPOConfig, inputs) -> Fit:
        dm = ctx.datamodule("pairs", cfg)
        dm.setup("fit")
        sft = inputs["sft"].model
        table = reference_logps(sft, dm.reference_dataloader("train"), dm.n_train)
        val_table = reference_logps(sft, dm.reference_dataloader("validation"),
                                    dm.n_examples("validation"))
        policy, reference = policy_from(inputs, ctx.model_cfg.lora)
        return Fit(DPOModule(policy, table, cfg, val_table), dm,
                   Budget(max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                          val_every=cfg.val_every),
                   model=policy, networks={"policy": policy, "reference": reference},
                   trainable=[policy], sequences=2 * cfg.batch_size,
                   layout=f"{cfg.batch_size} pairs")

    def sized(self, cfg: DPOConfig, batch: int, n_batches: int) -> DPOConfig:
        return replace(cfg, batch_size=max(1, batch // 2), max_steps=n_batches)
