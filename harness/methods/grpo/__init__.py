"""GRPO (DeepSeekMath, Shao et al. 2024): group-relative advantages, no critic.

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.grpo.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import fail, one_of
from harness.methods.config import GroupConfig
from harness.methods.declaration import Method


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO: G completions per prompt, group-relative advantages, no critic, k3 KL penalty
    (the shared fields: :class:`GroupConfig`).

    ``clip_eps_high``: DAPO's clip-higher bound (null = ``clip_eps``); ``scale_rewards``: divide
    by the group std (false = Dr. GRPO); ``loss_type``: how token losses are aggregated.
    """

    name: str = "grpo"
    clip_eps_high: float | None = None
    scale_rewards: bool = True
    loss_type: str = "grpo"         # grpo | bnpo | dapo | dr_grpo

    def check(self, prefix: str = "method") -> None:
        super().check(prefix)
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            fail(prefix, "clip_eps_high", self.clip_eps_high, "must be > 0 or null")
        one_of(self, prefix, "loss_type", ("grpo", "bnpo", "dapo", "dr_grpo"))


METHOD = Method("grpo", GRPOConfig, "harness.methods.grpo.stage:GRPOStage")
