"""DPO (Rafailov et al. 2023), as in the seed: a classification loss on preference pairs.

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.dpo.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import OptimConfig, in_range, one_of, positive
from harness.methods.declaration import Method


@dataclass
class DPOConfig:
    """DPO on the task's preference pairs against the frozen SFT reference.

    ``beta``: the KL coefficient (the temperature of the implicit reward); ``label_smoothing`` > 0
    is conservative DPO; ``loss_type``: sigmoid (DPO) or ipo. ``share_prompt``: score a pair's
    chosen and rejected responses in one packed row with the prompt once
    (:func:`~harness.methods.dpo.stage.shared_prompt_pair_logps`; policy and reference alike): the
    same log-probs to rounding for fewer FLOPs; off by default, so that runs repeat the records
    made without it.
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
    share_prompt: bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))

    def check(self, prefix: str = "method") -> None:
        positive(self, prefix, "max_steps", "batch_size", "max_len", "val_every", "beta")
        one_of(self, prefix, "overflow", ("truncate", "skip"))
        in_range(self, prefix, "label_smoothing", 0.0, 0.5, closed_hi=False)
        one_of(self, prefix, "loss_type", ("sigmoid", "ipo"))
        self.optim.check(f"{prefix}.optim")


METHOD = Method("dpo", DPOConfig, "harness.methods.dpo.stage:DPOStage")
