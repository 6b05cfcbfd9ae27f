"""What the methods' configs share (torch-free): the group methods' fields, the moving
reference, the rollout's fit, the planned budget. Each method's own config is in its package
(``harness/methods/<name>/__init__.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from harness.config import OptimConfig, RolloutConfig, fail, in_range, one_of, positive

#: the metadata of a field added after records were written: at its default the run computes what
#: it computed before the field existed, so a record's config hash leaves it out
#: (:func:`harness.evaluation.records.config_hash`) and a relaunched sweep still finds its records
LATER = {"later": True}


@dataclass
class RefSyncConfig:
    """A reference policy that follows the policy (TR-DPO, Gorbatovski et al. 2024; TRL's
    ``sync_ref_model``; the EMA reference of Xu et al. 2024): after every ``every``-th optimiser
    step of the policy, π_ref ← α·π_θ + (1 − α)·π_ref, parameter by parameter, α = ``alpha``
    (1: a hard copy). ``every: 0`` (the default) keeps the reference frozen at the SFT base.

    TRL counts its Trainer's global steps, which are optimiser steps as here (its defaults:
    ``ref_model_sync_steps`` 512, ``ref_model_mixup_alpha`` 0.6). Held-out KL and win rate are
    always measured against the SFT base, never the moving reference.
    """

    every: int = 0
    alpha: float = 0.6

    def check(self, prefix: str) -> None:
        in_range(self, prefix, "every", 0, None)
        if not 0.0 < self.alpha <= 1.0:
            fail(prefix, "alpha", self.alpha, "must be in (0, 1] (the policy's share of the mix)")


def check_rollout_fits(cfg: Any, prefix: str) -> None:
    """A rollout's sequences are ``max_len`` tokens at most: the prompt keeps what
    ``rollout.max_new_tokens`` leaves, at least one token (the BOS)."""
    if cfg.rollout.max_new_tokens >= cfg.max_len:
        fail(prefix, "rollout.max_new_tokens", cfg.rollout.max_new_tokens,
             f"must be < {prefix}.max_len={cfg.max_len} (a rollout's prompt keeps max_len - "
             "max_new_tokens tokens)")


@dataclass
class GroupConfig:
    """What the group methods (GRPO, RLOO) share: ``n_iterations`` rollout batches of
    ``rollout.prompts_per_batch`` prompts x ``group_size`` completions, ``update_epochs`` passes of
    minibatches over each, ratio clipping at ``clip_eps``, the KL coefficient ``beta`` (0: no
    reference pass at all), rewards from the task's gold reward (``reward_source: gold``) or the
    reward model (``rm``). ``share_prompt``: the reference pass and the policy's forward and
    backward run each group in one packed row with its prompt once
    (:mod:`harness.methods.group_packing`): the same log-probs to rounding for fewer FLOPs; a
    minibatch then holds whole groups (``minibatch_size`` a multiple of ``group_size``). Off by
    default, so that runs repeat the records made without it. ``ref_sync``: a reference that
    follows the policy (:class:`RefSyncConfig`; off by default)."""

    name: str = MISSING
    n_iterations: int = 300
    group_size: int = 8
    update_epochs: int = 1
    minibatch_size: int = 64
    max_len: int = 128
    clip_eps: float = 0.2
    beta: float = 0.04
    reward_source: str = "gold"     # gold | rm
    share_prompt: bool = False
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(prompts_per_batch=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5))
    ref_sync: RefSyncConfig = field(default_factory=RefSyncConfig, metadata=LATER)

    def check(self, prefix: str = "method") -> None:
        self.ref_sync.check(f"{prefix}.ref_sync")
        positive(self, prefix, "n_iterations", "update_epochs", "minibatch_size", "max_len",
                 "clip_eps")
        if self.group_size < 2:
            fail(prefix, "group_size", self.group_size, "must be >= 2 (advantages are relative)")
        in_range(self, prefix, "beta", 0.0, None)
        one_of(self, prefix, "reward_source", ("gold", "rm"))
        if self.share_prompt and self.minibatch_size % self.group_size:
            fail(prefix, "minibatch_size", self.minibatch_size,
                 f"must be a multiple of group_size={self.group_size} with share_prompt=true "
                 "(a minibatch holds whole groups)")
        self.rollout.check(f"{prefix}.rollout")
        check_rollout_fits(self, prefix)
        self.optim.check(f"{prefix}.optim")

    @property
    def rows_per_batch(self) -> int:
        """What a rollout batch's minibatches split: its prompts x group_size responses."""
        return self.rollout.prompts_per_batch * self.group_size


def planned_budget(cfg: Any) -> dict[str, int]:
    """What an online method's config will spend: ``responses`` sampled (and scored: one reward
    call each) over the stage, and ``steps_per_batch``, its optimiser steps per rollout batch
    (passes x minibatches: rows for PPO and the group methods, pairs for online DPO, which has
    at most one pair per prompt: ``cfg.rows_per_batch``). A stage's ``budget/*`` metrics say what it did spend."""
    prompts = cfg.rollout.prompts_per_batch
    per_prompt = getattr(cfg, "group_size", 1)
    return {"responses": cfg.n_iterations * prompts * per_prompt,
            "steps_per_batch": cfg.update_epochs * -(-cfg.rows_per_batch // cfg.minibatch_size)}
