"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.online_dpo.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import OptimConfig, RolloutConfig, fail, in_range, one_of, positive
from harness.methods.config import LATER, RefSyncConfig, check_rollout_fits
from harness.methods.declaration import Method


@dataclass
class OnlineDPOConfig:
    """Online DPO (Guo et al. 2024; TRL's ``OnlineDPOTrainer``): every rollout batch samples
    ``group_size`` (k) responses to each of ``rollout.prompts_per_batch`` prompts from the current
    policy, the reward (``reward_source``: the task's gold reward or the reward model) makes each
    prompt's best and worst response a (chosen, rejected) pair, skipping prompts whose responses
    all score the same, and the DPO loss (``beta``, ``loss_type``, ``label_smoothing`` as offline
    DPO's) trains on them against the frozen reference: ``update_epochs`` passes of minibatches
    of ``minibatch_size`` pairs. ``share_prompt``: the rollout's reference pass scores each
    prompt's k responses in one packed row (as GRPO's). ``ref_sync``: a reference that follows
    the policy (:class:`RefSyncConfig`; off by default). The defaults generate as many responses
    as GRPO and RLOO do (8 prompts x 8, 300 batches)."""

    name: str = "online_dpo"
    n_iterations: int = 300
    group_size: int = 8
    update_epochs: int = 1
    minibatch_size: int = 8
    max_len: int = 128
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"      # sigmoid | ipo
    reward_source: str = "gold"     # gold | rm
    share_prompt: bool = False
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(prompts_per_batch=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5))
    ref_sync: RefSyncConfig = field(default_factory=RefSyncConfig, metadata=LATER)

    def check(self, prefix: str = "method") -> None:
        self.ref_sync.check(f"{prefix}.ref_sync")
        positive(self, prefix, "n_iterations", "update_epochs", "minibatch_size", "max_len", "beta")
        if self.group_size < 2:
            fail(prefix, "group_size", self.group_size, "must be >= 2 (a pair needs two responses)")
        in_range(self, prefix, "label_smoothing", 0.0, 0.5, closed_hi=False)
        one_of(self, prefix, "loss_type", ("sigmoid", "ipo"))
        one_of(self, prefix, "reward_source", ("gold", "rm"))
        self.rollout.check(f"{prefix}.rollout")
        check_rollout_fits(self, prefix)
        self.optim.check(f"{prefix}.optim")

    @property
    def rows_per_batch(self) -> int:
        """What a rollout batch's minibatches split: at most one pair per prompt."""
        return self.rollout.prompts_per_batch


METHOD = Method("online_dpo", OnlineDPOConfig, "harness.methods.online_dpo.stage:OnlineDPOStage")
