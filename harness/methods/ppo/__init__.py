"""PPO for language models (InstructGPT; "Secrets of RLHF", Zheng et al. 2023), as in the seed.

The method's declaration (its name, config and stage) and its config, torch-free so that
composing and checking a config imports neither Lightning nor torch; the stage and its
Lightning module are in :mod:`harness.methods.ppo.stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config import OptimConfig, RolloutConfig, fail, in_range, one_of, positive
from harness.methods.config import LATER, RefSyncConfig, check_rollout_fits
from harness.methods.declaration import Method


@dataclass
class PPOConfig:
    """PPO with a critic, GAE, the clipped surrogate, a KL-shaped reward and an entropy bonus.

    ``beta``: the per-token KL penalty ``r_t - beta log(pi/pi_ref)`` (``sweeps/tune.sh`` tunes
    it); ``adaptive_kl`` adapts it towards ``target_kl`` over ``kl_horizon`` (Ziegler et al.
    2019). The budget matches the group methods' (GRPO, RLOO, online DPO): 300 rollout batches of
    64 responses (one per prompt here), one optimiser step per batch (one pass, one minibatch),
    so that within a track every online method samples, scores and steps alike.
    ``update_epochs``: optimisation passes over each rollout batch. ``reward_source``: the
    sequence reward of a rollout, the reward model's score (rm) or the task's gold reward (gold),
    as for every online method. ``critic_init``: the critic starts from the reward model (rm) or
    the SFT base (sft); null takes the reward model when there is one (``reward_source=rm``),
    else the SFT base. ``critic_start`` is the choice made. ``ref_sync``: a reference that follows
    the policy (:class:`RefSyncConfig`; off by default).
    """

    name: str = "ppo"
    n_iterations: int = 300         # rollout batches
    update_epochs: int = 1
    minibatch_size: int = 64
    max_len: int = 128
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    reward_source: str = "rm"       # rm | gold
    critic_init: str | None = None  # rm | sft | null (rm with a reward model, else sft)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(prompts_per_batch=64))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5))
    ref_sync: RefSyncConfig = field(default_factory=RefSyncConfig, metadata=LATER)

    def check(self, prefix: str = "method") -> None:
        self.ref_sync.check(f"{prefix}.ref_sync")
        positive(self, prefix, "n_iterations", "update_epochs", "minibatch_size", "max_len",
                 "clip_eps", "target_kl", "kl_horizon")
        for f in ("value_clip", "vf_coef", "ent_coef", "beta"):
            in_range(self, prefix, f, 0.0, None)
        in_range(self, prefix, "gamma", 0.0, 1.0)
        in_range(self, prefix, "lam", 0.0, 1.0)
        one_of(self, prefix, "reward_source", ("rm", "gold"))
        one_of(self, prefix, "critic_init", (None, "rm", "sft"))
        if self.critic_init == "rm" and self.reward_source != "rm":
            fail(prefix, "critic_init", self.critic_init,
                 f"needs a reward model, and {prefix}.reward_source={self.reward_source!r} trains "
                 f"none: start the critic from the SFT base ({prefix}.critic_init=sft, or null)")
        self.rollout.check(f"{prefix}.rollout")
        check_rollout_fits(self, prefix)
        self.optim.check(f"{prefix}.optim")
        self.critic_optim.check(f"{prefix}.critic_optim")

    @property
    def rows_per_batch(self) -> int:
        """What a rollout batch's minibatches split: one response per prompt."""
        return self.rollout.prompts_per_batch

    @property
    def critic_start(self) -> str:
        """Where the critic starts: ``critic_init``, or for null the reward model when the run has
        one, else the SFT base."""
        return self.critic_init or ("rm" if self.reward_source == "rm" else "sft")


METHOD = Method("ppo", PPOConfig, "harness.methods.ppo.stage:PPOStage")
