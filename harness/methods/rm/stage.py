"""Bradley–Terry reward model (seed): ``J_RM = -E log sigma(r(x, y_w) - r(x, y_l))``.

The reward model is a copy of the SFT model with a scalar head. The reward of a sequence is the
head's output at its last real token (``pooling: last``, InstructGPT, the default) or the mean of
the head's outputs over the response tokens (``pooling: mean``); ``last`` is the default
(``results/FINDINGS.md`` has what mean pooling did to PPO on arith).

What the stage hands on (``rm.keep``, ``rm.norm_samples``): the checkpoint with the best
validation pair accuracy, normalised, ``r' = (r - mu) / sigma`` folded into its score head with mu
and sigma the mean and std of its scores of responses the SFT policy samples, so that a rollout's
rewards mean the same in every seed (Huang et al. 2024, "The N+ implementation details of RLHF with PPO";
TRL's ``PPOTrainer`` whitens per batch instead). It also measures the SFT policy's own likelihood
pair accuracy on the same validation pairs (``eval/sft_pair_acc``): a reward model no better than
that adds nothing the policy does not know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.methods.base import AlignmentModule
from harness.methods.losses import (
    bradley_terry_loss,
    last_valid_index,
    masked_mean,
    pairwise_accuracy,
)
from harness.methods.rm import METHOD, RMConfig
from harness.models.hf import load_checkpoint, save_checkpoint
from harness.models.llama import ScalarHead
from harness.stage import Budget, Built, Fit, Stage, scalar_head

SCORE_HEAD_FILE = "score_head.pt"

log = logging.getLogger(__name__)


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


def moments(scores: torch.Tensor) -> tuple[float, float]:
    """(mean, population std) of scores [N]; a std below 1e-6 (a constant reward model) is
    returned as 1.0, so that normalising only shifts."""
    mean, std = float(scores.mean()), float(scores.std(correction=0))
    if not std > 1e-6:
        log.warning("reward model: its scores of the SFT policy's responses do not vary (std "
                    "%.3g); normalisation only shifts them", std)
        std = 1.0
    return mean, std


@torch.no_grad()
def sft_score_moments(rm: ScalarHead, policy, tokenizer, prompts: Sequence[str],
                      max_new_tokens: int, max_len: int, pooling: str,
                      generator: torch.Generator, batch_size: int = 64) -> tuple[float, float]:
    """Mean and std of the reward model's raw scores of responses ``policy`` samples, one per
    prompt, at temperature 1 and ``max_new_tokens`` long, as a rollout samples them."""
    from harness.config import RolloutConfig
    from harness.methods.rollout import make_rollout

    cfg = RolloutConfig(prompts_per_batch=batch_size, max_new_tokens=max_new_tokens)
    raw = rm_scorer(rm, pooling)
    scores = [make_rollout(policy, None, tokenizer, prompts[i:i + batch_size], cfg, max_len, raw,
                           generator).scores for i in range(0, len(prompts), batch_size)]
    return moments(torch.cat(scores).float().cpu())


@torch.no_grad()
def fold_normalisation(rm: ScalarHead, mean: float, std: float) -> None:
    """Make the score head give ``(r - mean) / std``: ``w <- w / std``, ``b <- (b - mean) / std``.

    Both poolings are affine in the per-token scores, so every sequence reward is normalised the
    same way, and a PPO critic copied from the reward model starts on the rewards' scale (Huang et
    al. 2024 adjust the reward head's gain and bias alike)."""
    rm.score.weight.div_(std)
    rm.score.bias.sub_(mean).div_(std)


class RewardModule(AlignmentModule):
    """Thin Lightning shell around :func:`bradley_terry_loss`; keeps the best validated checkpoint
    (``keep: best``) and, once trained, runs ``finish(rm) -> metrics`` (the normalisation and the
    SFT policy's pair accuracy, :meth:`RewardStage.build`)."""

    RESUME_ATTRS = (*AlignmentModule.RESUME_ATTRS, "best", "last_val")

    def __init__(self, rm: ScalarHead, cfg: RMConfig,
                 finish: Callable[[ScalarHead], dict[str, float]] | None = None) -> None:
        super().__init__(cfg.optim, cfg.max_steps)
        self.rm = rm
        self.cfg = cfg
        self.finish = finish
        #: (val/rewards_acc, step, weights on the CPU) of the best validated checkpoint so far
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        #: (val/rewards_acc, step) of the latest validation
        self.last_val: tuple[float, int] | None = None
        self.finished: dict[str, float] = {}

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
        self.pairs_seen += b
        return loss

    def validation_step(self, batch, batch_idx):
        rc, rr, _ = pair_rewards(self.rm, batch, self.cfg.pooling)
        b = rc.shape[0]
        self.log_dict({"val/loss": bradley_terry_loss(rc, rr), "val/rewards_acc":
                       pairwise_accuracy(rc, rr)}, on_step=False, on_epoch=True, batch_size=b)

    def on_validation_end(self) -> None:
        """After each validation (its epoch metrics reduced over the ranks, so every rank makes
        the same choice): remember the checkpoint if its pair accuracy is the best so far."""
        acc = self.trainer.callback_metrics.get("val/rewards_acc")
        if self.trainer.sanity_checking or acc is None:
            return
        acc, step = float(acc), self.global_step
        self.last_val = (acc, step)
        if self.best is None or acc > self.best[0]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.rm.state_dict().items()}
            self.best = (acc, step, state)

    def on_train_end(self) -> None:
        if self.cfg.keep == "best" and self.best is not None:
            self.rm.load_state_dict(self.best[2])
        if self.finish is not None:
            self.finished = self.finish(self.rm)

    def final_metrics(self) -> dict[str, float]:
        """The kept checkpoint's validation pair accuracy (``val/rewards_acc``) and step, the last
        validation's, and what ``finish`` measured."""
        out = {**super().final_metrics(), **self.finished}
        if self.last_val is not None:
            out["val/last_rewards_acc"] = self.last_val[0]
            kept = self.best if self.cfg.keep == "best" and self.best is not None else self.last_val
            out["val/rewards_acc"], out["train/kept_step"] = kept[0], float(kept[1])
        return out


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


class RewardStage(Stage, method=METHOD):
    """The reward model, built on the SFT base and cached: PPO and ``reward_source=rm`` use it."""

    data = "pairs"
    produces_policy = False
    reference = None

    def build(self, ctx, cfg: RMConfig, inputs) -> Fit:
        sft = inputs["sft"].model
        rm = scalar_head(sft, ctx.model_cfg.lora)

        def finish(trained: ScalarHead) -> dict[str, float]:
            return finish_reward_model(trained, sft, ctx, cfg)

        return Fit(RewardModule(rm, cfg, finish), ctx.datamodule("pairs", cfg),
                   Budget(max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                          val_every=cfg.val_every),
                   model=rm, networks={"reward_model": rm}, trainable=[rm])

    def summary_metrics(self, metrics):
        out = super().summary_metrics(metrics)
        for name in ("rewards_acc", "sft_pair_acc"):
            if f"val/{name}" in out:
                out[f"eval/{name}"] = out[f"val/{name}"]
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


def finish_reward_model(rm: ScalarHead, sft: Any, ctx, cfg: RMConfig) -> dict[str, float]:
    """What a trained reward model is handed on with: its normalisation folded into its score head
    (:func:`fold_normalisation`, the mean and std of its scores of ``cfg.norm_samples``
    responses of the SFT policy ``sft`` to training prompts drawn by the seed's ``rm_norm``
    stream), and the SFT policy's own likelihood pair accuracy on the validation pairs the reward
    model was validated on. Returns their metrics."""
    from harness.methods.dpo.stage import pair_logps_table, prefers_chosen
    from harness.util.seeding import generator

    device = next(rm.parameters()).device
    home = next(sft.parameters()).device
    sft.to(device)
    out: dict[str, float] = {}
    try:
        pairs = ctx.task.preference_dataset("validation")
        table = pair_logps_table(sft, ctx.tokenizer, pairs["prompt"], pairs["chosen"],
                                 pairs["rejected"], cfg.batch_size, cfg.max_len)
        out["val/sft_pair_acc"] = sum(prefers_chosen(table)) / max(1, len(table))
        if cfg.norm_samples:
            g = generator(ctx.seed, "rm_norm")
            pool = sorted(set(ctx.task.sft_dataset("train")["prompt"]))
            pick = torch.randint(len(pool), (cfg.norm_samples,), generator=g).tolist()
            mean, std = sft_score_moments(rm, sft, ctx.tokenizer, [pool[i] for i in pick],
                                          cfg.norm_max_new_tokens, cfg.max_len, cfg.pooling, g)
            fold_normalisation(rm, mean, std)
            out.update({"train/rm_norm_mean": mean, "train/rm_norm_std": std})
    finally:
        sft.to(home)
    return out
