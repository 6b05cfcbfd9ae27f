"""Supervised fine-tuning: next-token cross-entropy on the response tokens only.

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.sft.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import OptimConfig, one_of, positive
from harness.methods.declaration import Method


@dataclass
class SFTConfig:
    """Supervised fine-tuning: cross-entropy on response tokens (+ MoE auxiliary loss).

    ``max_steps`` suits the default task (arith); ``conf/experiment/`` sets other budgets.
    ``overflow``: prompts longer than ``max_len`` are truncated or skipped. The matrices get
    LLaMA's decoupled weight decay 0.1. ``enabled=false`` (pretrained models only) trains nothing:
    the pretrained model itself is the SFT base and the reference, as when aligning an instruct
    model directly.
    """

    name: str = "sft"
    enabled: bool = True
    max_steps: int = 2000
    batch_size: int = 64
    max_len: int = 128
    overflow: str = "truncate"      # truncate | skip
    val_every: int = 1000
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.1))

    def check(self, prefix: str = "sft") -> None:
        positive(self, prefix, "max_steps", "batch_size", "max_len", "val_every")
        one_of(self, prefix, "overflow", ("truncate", "skip"))
        self.optim.check(f"{prefix}.optim")


METHOD = Method("sft", SFTConfig, "harness.methods.sft.stage:SFTStage", base=True, order=0)
