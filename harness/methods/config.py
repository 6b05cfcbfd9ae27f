"""The stages' configs: one dataclass per registered stage, its defaults the stage's defaults.

They live apart from the stages' Lightning modules so that composing and checking a config
(``python -m harness --cfg job``, ``--help``, a bad override's error) imports neither Lightning
nor torch; :mod:`harness.registry` names them beside each stage, and each stage module imports
its own from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def check_rollout_fits(cfg: GroupConfig | PPOConfig | OnlineDPOConfig, prefix: str) -> None:
    """A rollout's sequences are ``max_len`` tokens at most: the prompt keeps what
    ``rollout.max_new_tokens`` leaves, at least one token (the BOS)."""
    if cfg.rollout.max_new_tokens >= cfg.max_len:
        fail(prefix, "rollout.max_new_tokens", cfg.rollout.max_new_tokens,
             f"must be < {prefix}.max_len={cfg.max_len} (a rollout's prompt keeps max_len - "
             "max_new_tokens tokens)")


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
    """

    name: str = "rm"
    max_steps: int = 1000
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
    def critic_start(self) -> str:
        """Where the critic starts: ``critic_init``, or for null the reward model when the run has
        one, else the SFT base."""
        return self.critic_init or ("rm" if self.reward_source == "rm" else "sft")


@dataclass
class DPOConfig:
    """DPO on the task's preference pairs against the frozen SFT reference.

    ``beta``: the KL coefficient (the temperature of the implicit reward); ``label_smoothing`` > 0
    is conservative DPO; ``loss_type``: sigmoid (DPO) or ipo. ``share_prompt``: score a pair's
    chosen and rejected responses in one packed row with the prompt once
    (:func:`~harness.methods.dpo.shared_prompt_pair_logps`; policy and reference alike): the
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


def planned_budget(cfg: PPOConfig | GroupConfig | OnlineDPOConfig) -> dict[str, int]:
    """What an online method's config will spend: ``responses`` sampled (and scored: one reward
    call each) over the stage, and ``steps_per_batch``, its optimiser steps per rollout batch
    (passes x minibatches: rows for PPO and the group methods, pairs for online DPO, which has
    at most one pair per prompt). A stage's ``budget/*`` metrics say what it did spend."""
    prompts = cfg.rollout.prompts_per_batch
    per_prompt = getattr(cfg, "group_size", 1)
    units = prompts if isinstance(cfg, OnlineDPOConfig) else prompts * per_prompt
    return {"responses": cfg.n_iterations * prompts * per_prompt,
            "steps_per_batch": cfg.update_epochs * -(-units // cfg.minibatch_size)}
