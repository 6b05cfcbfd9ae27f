"""Shared shell of the on-policy methods (PPO, GRPO): manual optimisation over rollout batches.

One Lightning training step = one rollout batch: sample, score, then several optimiser steps over
minibatches of it. Lightning's epoch is the configured number of rollout batches.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch

from harness.config import OptimConfig, RolloutConfig
from harness.methods.base import AlignmentModule
from harness.methods.config import GroupConfig, RefSyncConfig, planned_budget
from harness.methods.group_packing import group_minibatches, packed_response_logprobs
from harness.methods.losses import (
    batch_std,
    check_finite,
    kl_log_ratio,
    masked_mean,
    missing_eos_penalty,
)
from harness.methods.reduction import Reduction
from harness.methods.rollout import Rollout, make_rollout, minibatches, response_logprobs
from harness.models.architecture import ConfigError
from harness.models.llama import CausalLM
from harness.stage import Budget, Fit, Stage, policy_from
from harness.util.distributed import all_reduce_sum
from harness.util.seeding import generator


def global_rows(n_prompts: int, rows_per_prompt: int, rank: int, world: int) -> torch.Tensor:
    """Rows of the global rollout batch that rank ``rank`` of ``world`` holds, in its local order
    [n_prompts * rows_per_prompt]: its prompt j is the global batch's prompt j * world + rank
    (``DistributedSampler`` deals indices in turn), and a prompt's ``rows_per_prompt`` rows (a
    group) are consecutive in both."""
    prompt = torch.arange(n_prompts) * world + rank
    return (prompt[:, None] * rows_per_prompt + torch.arange(rows_per_prompt)).reshape(-1)


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """The moving reference's update (TR-DPO's soft update, Gorbatovski et al. 2024; TRL's
    ``SyncRefModelCallback``): θ_ref ← α·θ + (1 − α)·θ_ref for every parameter pair, in place
    (α = 1: a hard copy). The two networks must have the same parameters in the same order."""
    for ref, new in zip(reference.parameters(), policy.parameters(), strict=True):
        ref.mul_(1.0 - alpha).add_(new.detach().to(ref.dtype), alpha=alpha)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the reference policy and the reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def advance_schedules(*updates: tuple[Any, Any, OptimConfig]) -> None:
    """Step each ``(optimiser, scheduler, config)``'s scheduler without an optimiser step: a
    minibatch with nothing to learn from (online DPO's groups of tied rewards) still spends its
    step of the schedule, so the lr at step k does not depend on how many minibatches were empty.
    torch warns "``lr_scheduler.step()`` before ``optimizer.step()``" when this comes first in a
    run; here that order is intended, so that warning (and only it) is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                category=UserWarning)
        for _, sched, _ in updates:
            sched.step()


class OnPolicyModule(AlignmentModule):
    """Holds the policy, the frozen reference, the tokenizer and a seeded sampling generator.

    ``seed`` is the run's seed; the sampler draws from its ``rollout`` stream. ``ref_sync``: with
    ``every > 0`` the reference follows the policy (:func:`mix_into` after every ``every``-th
    optimiser step) and is then the module's own copy, so that the SFT base the run evaluates
    against stays as it was.
    """

    def __init__(self, policy: CausalLM, reference: CausalLM, tokenizer, optim: OptimConfig,
                 total_steps: int, rollout: RolloutConfig, seed: int, samples_every: int = 10,
                 ref_sync: RefSyncConfig | None = None) -> None:
        super().__init__(optim, total_steps)
        self.automatic_optimization = False
        self.policy = policy
        self.ref_sync = ref_sync or RefSyncConfig()
        self.reference = freeze(copy.deepcopy(reference) if self.ref_sync.every else reference)
        self.tokenizer = tokenizer
        self.rollout_cfg = rollout
        self.samples_every = samples_every
        #: the sampler's and the minibatch order's stream (``harness.util.seeding``, stream "rollout")
        self.generator = generator(seed, "rollout")
        #: under a multi-process strategy: the global batch's sampling noise (``sampling_noise``)
        self.noise_generator = generator(seed, "rollout_noise")
        self._t_iter: float | None = None

    def trainable_modules(self):
        return [self.policy]

    def ranks(self) -> tuple[int, int] | None:
        """(rank, world size) under a multi-process strategy (DDP, with any number of devices,
        one included), else None."""
        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, L.pytorch.strategies.ParallelStrategy):
            return None
        return trainer.global_rank, trainer.world_size

    def sampling_noise(self, n_rows: int, rows_per_prompt: int) -> torch.Tensor | None:
        """This rank's rows of the global rollout batch's sampling noise, [n_rows, N] uniforms, or
        None (plain runs: the sampler draws ``torch.multinomial`` from ``generator``, as ever).

        Under DDP, Lightning's ``DistributedSampler`` deals the global batch's prompts to the ranks
        in turn (prompt m to rank m mod W); every rank draws the whole batch's noise from one
        stream and keeps the rows of its prompts (:func:`global_rows`), so each response is
        sampled from the same uniforms whatever the number of devices, and a run on W ranks
        samples the tokens of the one-rank run at the same global batch.
        """
        ranks = self.ranks()
        if ranks is None:
            return None
        rank, world = ranks
        n_new = self.rollout_cfg.max_new_tokens
        full = torch.rand(n_rows * world, n_new, generator=self.noise_generator)
        return full[global_rows(n_rows // rows_per_prompt, rows_per_prompt, rank, world)]

    def rollout(self, prompts: list[str], max_len: int, score_fn,
                with_reference: bool = True, rows_per_prompt: int = 1,
                packed: bool = False) -> Rollout:
        """Sample and score one rollout batch from the policy (``rollout.missing_eos_penalty`` off
        the scores of responses cut off without EOS); counts its generated tokens.
        ``with_reference=False`` skips the reference pass (``ro.ref_logp`` is None);
        ``rows_per_prompt``: consecutive rows that share a prompt (a group); ``packed``: the
        reference pass runs each group's prompt once (``share_prompt``)."""
        ro = make_rollout(self.policy, self.reference if with_reference else None, self.tokenizer,
                          prompts, self.rollout_cfg, max_len, score_fn, self.generator,
                          self.sampling_noise(len(prompts), rows_per_prompt),
                          packed_group=rows_per_prompt if packed else 0, region=self.region)
        ro.scores = missing_eos_penalty(ro.scores, ro.response, ro.mask, self.tokenizer.eos_token_id,
                                        self.rollout_cfg.missing_eos_penalty)
        self.responses += len(ro)
        self.reward_calls += len(ro)  # one score per response
        self.tokens_generated += int(ro.mask.sum())
        self.gen_seconds += ro.gen_s
        return ro

    @property
    def reduction(self) -> Reduction:
        """How statistics and normalisers span the batch: this process's rows, or under DDP the
        global batch the ranks hold in parts (:class:`~harness.methods.reduction.Reduction`)."""
        return Reduction(sharded=self.ranks() is not None)

    def update(self, ro: Rollout, adv: torch.Tensor | None, iteration: int,
               minibatch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict] | None],
               batches: Callable[[], list[torch.Tensor]], passes: int,
               *updates: tuple[Any, Any, OptimConfig],
               extra: dict[str, list[torch.Tensor]] | None = None) -> None:
        """The on-policy update, one loop for every method: ``passes`` passes over the rollout,
        each over ``batches()`` (its minibatches of row or pair indices, drawn anew per pass), one
        optimisation step per minibatch (:meth:`step` with ``updates``) of the loss that
        ``minibatch_loss(idx)`` returns with its statistics; ``None`` there: nothing to learn
        from in that minibatch, the schedules advance without a step. Then the rollout's metrics
        (:meth:`log_rollout`): the minibatches' statistics averaged, ``train/loss`` among them,
        and ``extra``."""
        stats_acc: dict[str, list[torch.Tensor]] = {}
        for _ in range(passes):
            for idx in batches():
                with self.region("forward"):
                    out = minibatch_loss(idx)
                if out is None:
                    advance_schedules(*updates)
                    continue
                loss, stats = out
                self.checked("train/loss", loss)
                self.step(loss, *updates)
                self.accumulate(stats_acc, {"loss": loss.detach(), **stats})
        stats_acc.update(extra or {})
        self.log_rollout(ro, adv, stats_acc, iteration)

    def step(self, loss: torch.Tensor, *updates: tuple[Any, Any, OptimConfig]) -> None:
        """One optimisation step of ``loss`` for each ``(optimiser, scheduler, its config)``:
        zero_grad all -> backward once -> per optimiser clip and step -> the schedulers step."""
        for opt, _, _ in updates:
            opt.zero_grad()
        self.manual_backward(loss)
        with self.region("optimizer"):
            for opt, _, oc in updates:
                if oc.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=oc.grad_clip,
                                        gradient_clip_algorithm="norm")
                opt.step()
            for _, sched, _ in updates:
                sched.step()
        self.updates += 1  # one step of the policy (PPO's critic steps with it)
        if self.ref_sync.every and self.updates % self.ref_sync.every == 0:
            mix_into(self.reference, self.policy, self.ref_sync.alpha)

    @staticmethod
    def accumulate(acc: dict[str, list[torch.Tensor]], stats: dict) -> None:
        """Collect one minibatch's statistics; ``log_rollout`` logs their mean per rollout batch."""
        for k, v in stats.items():
            acc.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32))

    def log_rollout(self, ro: Rollout, adv: torch.Tensor | None,
                    stats: dict[str, list[torch.Tensor]], iteration: int) -> None:
        """Log the DESIGN.md metric names for one rollout batch and the update made from it
        (``adv`` None: a method without advantages, online DPO)."""
        now = time.perf_counter()
        sum_fn = all_reduce_sum if self.ranks() is not None else None
        metrics = {
            "train/reward": ro.scores.mean(),
            # over the global batch under DDP (a mean of the ranks' stds is not the batch's std)
            "train/reward_std": batch_std(ro.scores, sum_fn),
            "train/response_len": ro.mask.sum(-1).mean(),
        }
        if adv is not None:
            metrics.update({"train/adv_mean": adv.mean(), "train/adv_std": batch_std(adv, sum_fn)})
        if ro.ref_logp is not None:  # without a reference pass (beta = 0) eval/kl still measures it
            k1 = kl_log_ratio(ro.old_logp, ro.ref_logp)
            # KL(pi_old || pi_ref): the sequence-level k1 sum (nats per response), as eval/kl
            metrics["train/kl"] = (k1 * ro.mask).sum(-1).mean()
            metrics["train/kl_per_token"] = masked_mean(k1, ro.mask)
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


class GroupModule(OnPolicyModule):
    """The shell of a group method: ``group_size`` completions of every prompt of a batch, scored
    by ``score_fn``; subclasses turn the rollout into updates in ``training_step``."""

    def __init__(self, policy: CausalLM, reference: CausalLM, tokenizer, cfg: GroupConfig,
                 score_fn: Callable, seed: int) -> None:
        super().__init__(policy, reference, tokenizer, cfg.optim, self.optimizer_steps(cfg),
                         cfg.rollout, seed, ref_sync=cfg.ref_sync)
        self.cfg = cfg
        self.score_fn = score_fn

    @staticmethod
    def optimizer_steps(cfg: GroupConfig) -> int:
        """The stage's optimiser steps (the learning-rate schedule's length): ``update_epochs``
        passes of minibatches over every rollout batch (:func:`planned_budget`)."""
        return cfg.n_iterations * planned_budget(cfg)["steps_per_batch"]

    def group_rollout(self, batch: list[str]) -> Rollout:
        """Sample and score ``group_size`` completions of each prompt (rows grouped by prompt)."""
        cfg = self.cfg
        self.policy.eval()  # deterministic routing: a sampled MoE route would make ratios random
        prompts = [p for p in batch for _ in range(cfg.group_size)]
        # beta = 0: nothing reads the reference's log-probs, so its forward pass is skipped
        ro = self.rollout(prompts, cfg.max_len, self.score_fn, with_reference=cfg.beta > 0,
                          rows_per_prompt=cfg.group_size, packed=cfg.share_prompt)
        check_finite("train/reward", ro.scores)
        return ro

    def minibatches(self, n: int) -> list[torch.Tensor]:
        """The rollout's random minibatches of rows (whole groups with ``share_prompt``)."""
        cfg = self.cfg
        if cfg.share_prompt:
            return group_minibatches(n, cfg.group_size, cfg.minibatch_size, self.generator)
        return minibatches(n, cfg.minibatch_size, self.generator)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's (logp [b, N], entropy [b, N] without its gradient, MoE aux loss) of a
        minibatch's rows, packed by group with ``share_prompt``."""
        cfg = self.cfg
        if cfg.share_prompt:
            return packed_response_logprobs(self.policy, input_ids, attention_mask, prompt_len,
                                            cfg.group_size, cfg.rollout.temperature,
                                            with_entropy=True, entropy_grad=False)
        return response_logprobs(self.policy, input_ids, attention_mask, prompt_len,
                                 cfg.rollout.temperature, with_entropy=True, entropy_grad=False)

    def policy_update(self, ro: Rollout, adv: torch.Tensor, iteration: int,
                      policy_loss: Callable[..., tuple[torch.Tensor, dict]]) -> None:
        """:meth:`update` over minibatches of the rollout's rows (whole groups with
        ``share_prompt``). ``policy_loss(idx, logp, mask)`` gives the minibatch's policy loss and
        its stats (logp, mask: [b, N] of the rows ``idx``); the MoE auxiliary loss is added."""
        cfg = self.cfg

        def minibatch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
            mask = ro.mask[idx]
            logp, ent, aux = self.logprobs(ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len)
            pg, stats = policy_loss(idx, logp, mask)
            return pg + aux, {**stats, "entropy": masked_mean(ent, mask), "moe_aux_loss": aux.detach()}

        self.update(ro, adv, iteration, minibatch_loss, lambda: self.minibatches(len(ro)),
                    cfg.update_epochs, (self.optimizers(), self.lr_schedulers(), cfg.optim))
        # minibatches partition the rollout: one host sync per rollout, not per minibatch; the
        # sequences' tokens, a prompt once per row also when share_prompt runs it once per group,
        # so that the throughput compares across layouts
        self.tokens_trained += cfg.update_epochs * int(ro.attention_mask.sum())


class OnPolicyStage(Stage):
    """What the on-policy stages share: rewards from the task's gold reward or the reward model
    (``cfg.reward_source``), rollout batches of training prompts, a budget in rollout batches."""

    def needs(self, cfg) -> tuple[str, ...]:
        return ("sft", "rm") if self.reward_source(cfg) == "rm" else ("sft",)

    def check_model(self, cfg, model_cfg) -> None:
        """As :meth:`Stage.check_model`, and a moving reference (``ref_sync.every > 0``) needs full
        fine-tuning: with LoRA the reference is the policy's own weights with the adapters off."""
        super().check_model(cfg, model_cfg)
        if cfg.ref_sync.every and model_cfg.lora.r:
            raise ConfigError(f"method.ref_sync.every={cfg.ref_sync.every}: a moving reference "
                              f"needs full fine-tuning; with LoRA (model.lora.r={model_cfg.lora.r}) "
                              "the reference is the policy with its adapters off (TRL refuses "
                              "sync_ref_model with PEFT too)")

    def reward_source(self, cfg) -> str:
        return cfg.reward_source

    def scorer(self, ctx, cfg, inputs) -> Callable:
        """The sequence reward of a rollout: the reward model's score or the gold reward."""
        if self.reward_source(cfg) == "rm":
            from harness.methods.rm.stage import scorer_of

            return scorer_of(inputs["rm"])
        return ctx.gold_scorer()

    @staticmethod
    def budget(cfg) -> Budget:
        return Budget(limit_train_batches=cfg.n_iterations, log_every_n_steps=1)


class GroupStage(OnPolicyStage):
    """On-policy stages that sample ``group_size`` completions per prompt and need no critic
    (GRPO, RLOO): the policy, the frozen reference and a scorer; ``module`` is the Lightning module
    class, built as ``module(policy, reference, tokenizer, cfg, score_fn, seed)``."""

    module: ClassVar[type]

    def build(self, ctx, cfg, inputs) -> Fit:
        score = self.scorer(ctx, cfg, inputs)
        policy, reference = policy_from(inputs, ctx.model_cfg.lora)
        module = self.module(policy, reference, ctx.tokenizer, cfg, score, ctx.seed)
        p = cfg.rollout.prompts_per_batch
        networks = {"policy": policy, "reference": reference}
        if "rm" in inputs:
            networks["reward_model"] = inputs["rm"].model
        return Fit(module, ctx.prompt_loader(p, cfg.n_iterations), self.budget(cfg), model=policy,
                   networks=networks, trainable=[policy])
