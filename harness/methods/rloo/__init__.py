"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024, "Back to Basics"): k samples per prompt,

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.rloo.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import one_of
from harness.methods.config import GroupConfig
from harness.methods.declaration import Method


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO: ``group_size`` (k) samples per prompt, leave-one-out baselines, no critic (the shared
    fields: :class:`GroupConfig`).

    ``beta``: the KL coefficient, as a per-token reward penalty summed over the response
    (``kl_penalty: reward``, RLOO's and TRL's original form) or a k3 term in the loss
    (``kl_penalty: loss``, as GRPO).
    """

    name: str = "rloo"
    beta: float = 0.05
    kl_penalty: str = "reward"      # reward | loss

    def check(self, prefix: str = "method") -> None:
        super().check(prefix)
        one_of(self, prefix, "kl_penalty", ("reward", "loss"))


METHOD = Method("rloo", RLOOConfig, "harness.methods.rloo.stage:RLOOStage")
