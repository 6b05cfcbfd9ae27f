"""Structured configs (Hydra schemas) and their validation.

Every YAML of a config group names its schema in its defaults list (``- base_model``,
``- base_sft`` ...), so Hydra rejects unknown keys and wrong types; :func:`validate` then checks
the values (ranges, divisibility) and raises :class:`ConfigError` naming the field, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.models.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "DPOConfig", "GRPOConfig", "ModelConfig", "OptimConfig", "PPOConfig",
           "RMConfig", "RolloutConfig", "SFTConfig", "register_configs", "validate"]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``; gradient clipping."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "lr")
        _range(self, prefix, "weight_decay", 0.0, None)
        _range(self, prefix, "beta1", 0.0, 1.0, closed_hi=False)
        _range(self, prefix, "beta2", 0.0, 1.0, closed_hi=False)
        _range(self, prefix, "warmup_steps", 0, None)
        _range(self, prefix, "min_lr_ratio", 0.0, 1.0)
        _range(self, prefix, "grad_clip", 0.0, None)


@dataclass
class SFTConfig:
    """Supervised fine-tuning: cross-entropy on response tokens (+ MoE auxiliary loss)."""

    name: str = "sft"
    stage: str = "sft"
    max_steps: int = 3000
    batch_size: int = 64
    max_len: int = 128
    overflow: str = "truncate"  # prompts longer than max_len: "truncate" or "skip"
    val_every: int = 1000
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, prefix: str = "method") -> None:
        _positive(self, prefix, "max_steps")
        _positive(self, prefix, "batch_size")
        _positive(self, prefix, "max_len")
        _positive(self, prefix, "val_every")
        _choice(self, prefix, "overflow", ("truncate", "skip"))
        self.optim.check(f"{prefix}.optim")


@dataclass
class RMConfig:
    """Bradley–Terry reward model: the SFT model plus a scalar head on the last response token."""

    name: str = "rm"
    stage: str = "rm"
    max_steps: int = 1000
    batch_size: int = 64
    max_len: int = 128
    overflow: str = "truncate"
    val_every: int = 250
    pooling: str = "last"           # last (score at the last response token) | mean (over the response)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=50))

    def check(self, prefix: str = "method") -> None:
        SFTConfig.check(self, prefix)  # same fields, same rules
        _choice(self, prefix, "pooling", ("last", "mean"))


@dataclass
class RolloutConfig:
    """Sampling of responses during RL (KV-cached sampler)."""

    prompts_per_batch: int = 32
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "prompts_per_batch")
        _positive(self, prefix, "max_new_tokens")
        _positive(self, prefix, "temperature")
        _range(self, prefix, "top_k", 0, None)
        _range(self, prefix, "top_p", 0.0, 1.0)
        if self.top_p == 0:
            _fail(prefix, "top_p", self.top_p, "must be > 0")


@dataclass
class PPOConfig:
    """PPO with a critic, GAE, the clipped surrogate, a KL-shaped reward and an entropy bonus."""

    name: str = "ppo"
    stage: str = "ppo"
    n_iterations: int = 200         # rollout batches
    ppo_epochs: int = 2             # optimisation passes over each rollout batch
    minibatch_size: int = 32
    max_len: int = 128
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.5
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    critic_init: str = "rm"         # "rm" | "sft"
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5))

    def check(self, prefix: str = "method") -> None:
        for f in ("n_iterations", "ppo_epochs", "minibatch_size", "max_len", "clip_eps",
                  "target_kl", "kl_horizon"):
            _positive(self, prefix, f)
        for f in ("value_clip", "vf_coef", "ent_coef", "kl_coef"):
            _range(self, prefix, f, 0.0, None)
        _range(self, prefix, "gamma", 0.0, 1.0)
        _range(self, prefix, "lam", 0.0, 1.0)
        _choice(self, prefix, "critic_init", ("rm", "sft"))
        self.rollout.check(f"{prefix}.rollout")
        self.optim.check(f"{prefix}.optim")
        self.critic_optim.check(f"{prefix}.critic_optim")


@dataclass
class GRPOConfig:
    """GRPO: G completions per prompt, group-relative advantages, no critic, k3 KL penalty."""

    name: str = "grpo"
    stage: str = "grpo"
    n_iterations: int = 300
    group_size: int = 8
    num_inner_iterations: int = 1   # optimisation passes over each rollout batch (mu)
    minibatch_size: int = 64
    max_len: int = 128
    clip_eps: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher; null = clip_eps
    beta: float = 0.04
    scale_rewards: bool = True      # divide by the group std (False = Dr. GRPO)
    loss_type: str = "grpo"         # grpo | bnpo | dapo | dr_grpo
    reward_source: str = "gold"     # gold (verifiable task reward) | rm (learned reward model)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(prompts_per_batch=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5))

    def check(self, prefix: str = "method") -> None:
        for f in ("n_iterations", "num_inner_iterations", "minibatch_size", "max_len",
                  "clip_eps"):
            _positive(self, prefix, f)
        if self.group_size < 2:
            _fail(prefix, "group_size", self.group_size, "must be >= 2 (advantages are relative)")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            _fail(prefix, "epsilon_high", self.epsilon_high, "must be > 0 or null")
        _range(self, prefix, "beta", 0.0, None)
        _choice(self, prefix, "loss_type", ("grpo", "bnpo", "dapo", "dr_grpo"))
        _choice(self, prefix, "reward_source", ("gold", "rm"))
        self.rollout.check(f"{prefix}.rollout")
        self.optim.check(f"{prefix}.optim")


@dataclass
class DPOConfig:
    """DPO on the task's preference pairs against the frozen SFT reference."""

    name: str = "dpo"
    stage: str = "dpo"
    max_steps: int = 300
    batch_size: int = 32
    max_len: int = 128
    overflow: str = "truncate"
    val_every: int = 100
    beta: float = 0.5
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"      # sigmoid | ipo
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))

    def check(self, prefix: str = "method") -> None:
        SFTConfig.check(self, prefix)
        _positive(self, prefix, "beta")
        _range(self, prefix, "label_smoothing", 0.0, 0.5, closed_hi=False)
        _choice(self, prefix, "loss_type", ("sigmoid", "ipo"))


def _fail(prefix: str, name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{prefix}.{name}={value!r}: {why}")


def _positive(obj: Any, prefix: str, name: str) -> None:
    v = getattr(obj, name)
    if not v > 0:
        _fail(prefix, name, v, "must be > 0")


def _range(obj: Any, prefix: str, name: str, lo: float | None, hi: float | None,
           closed_hi: bool = True) -> None:
    v = getattr(obj, name)
    if lo is not None and v < lo:
        _fail(prefix, name, v, f"must be >= {lo}")
    if hi is not None and (v > hi or (not closed_hi and v == hi)):
        _fail(prefix, name, v, f"must be {'<=' if closed_hi else '<'} {hi}")


def _choice(obj: Any, prefix: str, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        _fail(prefix, name, v, f"must be one of {', '.join(choices)}")


METHOD_SCHEMAS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig,
                                   "grpo": GRPOConfig, "dpo": DPOConfig}


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="model", name="base_model", node=ModelConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="method", name=f"base_{name}", node=schema)


def to_dataclass(schema: type, node: Any) -> Any:
    """Instantiate ``schema`` from a config node, recursively for nested dataclasses."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    kwargs = {}
    for f in fields(schema):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = f.default_factory if callable(getattr(f, "default_factory", None)) else None
        if sub is not None and isinstance(value, dict) and hasattr(sub(), "__dataclass_fields__"):
            value = to_dataclass(type(sub()), value)
        kwargs[f.name] = value
    return schema(**kwargs)


def validate(cfg: DictConfig) -> tuple[ModelConfig, Any]:
    """Check the model and method sections; returns their dataclasses. Raises ConfigError."""
    model = to_dataclass(ModelConfig, cfg.model)  # __post_init__ validates
    schema = METHOD_SCHEMAS.get(cfg.method.name)
    if schema is None:
        raise ConfigError(f"method.name={cfg.method.name!r}: unknown method; "
                          f"known: {', '.join(METHOD_SCHEMAS)}")
    method = to_dataclass(schema, cfg.method)
    method.check("method")
    e = cfg.eval
    if e.split not in ("test", "validation"):
        raise ConfigError(f"eval.split={e.split!r}: must be one of test, validation")
    for name in ("curve_points", "curve_prompts"):
        if int(e[name]) < 0:
            raise ConfigError(f"eval.{name}={e[name]}: must be >= 0")
    return model, method


def differing_fields(used: dict, ignored: dict, prefix: tuple[str, str]) -> list[str]:
    """``"<ignored>.f=x (<used>.f=y)"`` for each leaf field where two resolved config sections
    (plain dicts) differ.

    With ``method=sft`` (or ``method=rm``) the stage runs from the ``method`` section, and the
    ``sft`` (``rm``) section - composed from the same file - is not read; an override written
    there would be silently lost, so the pipeline warns with these strings.
    """
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
        elif x != y:
            out.append(f"{prefix[1]}.{path}={y} ({prefix[0]}.{path}={x})")

    walk(used, ignored, "")
    return out
