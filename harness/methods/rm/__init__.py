"""Bradley–Terry reward model (seed): ``J_RM = -E log sigma(r(x, y_w) - r(x, y_l))``.

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.rm.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import OptimConfig, fail, in_range, one_of, positive
from harness.methods.declaration import Method


@dataclass
class RMConfig:
    """Bradley–Terry reward model: the SFT model plus a scalar head, trained on the task's pairs.

    ``pooling``: last (the head's score at the last response token, InstructGPT) or mean (its
    average over the response). ``keep``: the checkpoint the stage hands on, the one with the best
    validation pair accuracy of those every ``val_every`` steps (best; ties to the earlier) or the
    last. ``norm_samples``: responses the SFT policy samples (one per training prompt, at
    temperature 1, ``norm_max_new_tokens`` long, like a rollout) whose scores set the reward
    model's normalisation: every score it gives a rollout is ``(r - mean) / std`` of those, so
    the SFT policy's responses score 0 +- 1 in every seed (Huang et al. 2024; 0 = raw scores).
    ``max_steps`` 3000 (48 epochs of the 4,000 arith pairs at batch 64): at 1000 the held-out pair
    accuracy was still rising in 6 of 9 seeds and below the SFT policy's likelihood accuracy in 7;
    at 3000 it beats it in 8 of 9 (model, seed) cells measured (results/FINDINGS.md, "The
    reward-model recipe").
    """

    name: str = "rm"
    max_steps: int = 3000
    batch_size: int = 64
    max_len: int = 128
    overflow: str = "truncate"      # truncate | skip
    val_every: int = 250
    pooling: str = "last"           # last | mean
    keep: str = "best"              # best | last
    norm_samples: int = 512
    norm_max_new_tokens: int = 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=50))

    def check(self, prefix: str = "rm") -> None:
        positive(self, prefix, "max_steps", "batch_size", "max_len", "val_every",
                 "norm_max_new_tokens")
        one_of(self, prefix, "overflow", ("truncate", "skip"))
        one_of(self, prefix, "pooling", ("last", "mean"))
        one_of(self, prefix, "keep", ("best", "last"))
        in_range(self, prefix, "norm_samples", 0, None)
        if self.norm_samples == 1:
            fail(prefix, "norm_samples", 1, "must be 0 (no normalisation) or >= 2 (a std)")
        if self.norm_max_new_tokens >= self.max_len:
            fail(prefix, "norm_max_new_tokens", self.norm_max_new_tokens,
                 f"must be < {prefix}.max_len={self.max_len}")
        self.optim.check(f"{prefix}.optim")


METHOD = Method("rm", RMConfig, "harness.methods.rm.stage:RewardStage", base=True, order=1)
