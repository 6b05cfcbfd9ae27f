"""Structured configuration of the backbone: a LLaMA-style decoder and its Mixture-of-Experts variant.

The dataclass doubles as the Hydra structured-config schema of the ``model`` group, so a bad value
(zero heads, ``n_heads`` not divisible by ``n_kv_heads``, ``top_k`` above ``n_experts``) is rejected
with a message naming the field before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from harness.util.errors import ConfigError  # re-exported: the models' config errors

__all__ = ["ConfigError"]

#: the backbone's linear layers an adapter may target (transformers' Llama names)
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """LoRA adapters (harness.models.lora): ``r`` = 0 trains every weight (no adapters)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_LAYERS))
    #: adapters on the reward model's and PPO's critic's backbones too (their score heads train in
    #: full); false: those two train every weight
    reward_and_critic: bool = False


@dataclass
class ModelConfig:
    """Hyper-parameters of the decoder (names follow the seed's LLaMA table).

    The shape (``d_model`` ... ``max_seq_len``) has no default: every preset in ``conf/model``
    states it. ``vocab_size: None`` means "take it from the tokenizer" (the built-in tasks build
    their own); ``n_kv_heads: None`` is multi-head attention (as many KV heads as heads).
    ``n_experts: 0`` is the dense model; ``n_experts > 0`` swaps every MLP for a routed MoE layer.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    name: str = "custom"
    vocab_size: int | None = None
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    #: the attention heads' width when it is not d_model / n_heads (e.g. Qwen3); None: derived
    attn_head_dim: int | None = None
    #: RoPE scaling as transformers writes it: {"rope_type": "linear", "factor": f} or
    #: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #: "original_max_position_embeddings"}; None: plain RoPE
    rope_scaling: dict[str, Any] | None = None
    #: biases on the q, k and v projections (Qwen2's attention; LLaMA has none)
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixture of Experts (ignored when n_experts == 0)
    n_experts: int = 0
    top_k: int = 2
    gating: str = "softmax"  # "softmax" (softmax over the top-k logits) | "noisy_top_k" (Shazeer)
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    # a pretrained checkpoint (``model=hf``; harness.models.pretrained): a local folder or a Hub
    # id, whose config.json then decides every field above
    pretrained: str | None = None
    revision: str | None = None
    # sparse upcycling of a dense pretrained checkpoint (harness.models.upcycle): this many experts,
    # each a copy of its layer's MLP, ``top_k`` per token, routed by ``gating``; 0 = none
    upcycle_experts: int = 0
    #: what runs the checkpoint: ``native`` (the harness's own decoder: Llama, Mixtral and Qwen2
    #: layouts) or ``transformers`` (any other causal LM through
    #: :class:`harness.models.adapter.TransformersCausalLM`); ``auto`` picks native where the
    #: layout allows and is resolved when the checkpoint is read (harness.models.pretrained)
    backend: str = "auto"
    #: recompute each decoder layer's activations in the backward pass instead of keeping them
    #: (less activation memory, one more forward per step; the same numbers, so not in cache keys)
    gradient_checkpointing: bool = False
    #: LoRA on the trained policy (SFT and the aligning methods); r = 0: full fine-tuning
    lora: LoRASettings = field(default_factory=LoRASettings)

    #: fields added after stage keys were first computed, with the value that means "absent":
    #: left out of :meth:`key_fields` at that value, so earlier runs keep their cache keys
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"qkv_bias": False, "pretrained": None,
                                               "revision": None, "upcycle_experts": 0,
                                               "attn_head_dim": None, "rope_scaling": None,
                                               "backend": "native"}

    def key_fields(self) -> dict[str, Any]:
        """The fields as a dict for cache keys (:attr:`LATER_FIELDS` at their defaults left out;
        ``pretrained`` and ``revision`` always: a checkpoint is keyed by its weights' hash;
        ``gradient_checkpointing`` always: it changes memory, not the numbers)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("pretrained", "revision", "gradient_checkpointing")
               and not (k in self.LATER_FIELDS and v == self.LATER_FIELDS[k])
               and not (k == "lora" and not self.lora.r)}
        if "lora" in out and not out["lora"]["reward_and_critic"]:  # added later: keys unchanged
            del out["lora"]["reward_and_critic"]
        return out

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def via_transformers(self) -> bool:
        """Whether a ``transformers`` model runs behind the adapter (not the harness's decoder)."""
        return self.backend == "transformers"

    def __post_init__(self) -> None:
        if self.backend == "auto" and self.pretrained is None:
            self.backend = "native"  # only a checkpoint can need the adapter
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""

        def bad(field: str, why: str) -> None:
            raise ConfigError(f"model.{field}={getattr(self, field)!r}: {why}")

        for f in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, f) <= 0:
                bad(f, "must be a positive integer")
        if self.vocab_size is not None and self.vocab_size <= 0:
            bad("vocab_size", "must be positive (or null to take it from the tokenizer)")
        # values that size allocations: the largest published shapes are far below these
        for f, most in (("max_seq_len", 1 << 20), ("vocab_size", 1 << 22), ("d_model", 1 << 16),
                        ("d_ff", 1 << 18), ("n_layers", 1 << 10)):
            value = getattr(self, f)
            if value is not None and value > most:
                bad(f, f"must be <= {most} (it sizes allocations; the largest published shapes "
                       "are far below it)")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            bad("n_kv_heads", "must be a positive integer (or null for multi-head attention)")
        if self.n_heads % self.kv_heads != 0:
            bad("n_kv_heads", f"n_heads={self.n_heads} must be divisible by n_kv_heads")
        if self.attn_head_dim is None and self.d_model % self.n_heads != 0:
            bad("n_heads", f"d_model={self.d_model} must be divisible by n_heads")
        if self.attn_head_dim is not None and self.attn_head_dim <= 0:
            bad("attn_head_dim", "must be a positive integer (or null: d_model / n_heads)")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            need = {"linear": {"factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings"}}
            if kind not in need:
                bad("rope_scaling", "rope_type must be 'linear' or 'llama3' (or null: plain RoPE)")
            if missing := sorted(need[kind] - set(self.rope_scaling)):
                bad("rope_scaling", f"rope_type {kind!r} needs {missing}")
        if self.backend not in ("auto", "native", "transformers"):
            bad("backend", "must be 'auto', 'native' or 'transformers'")
        if self.via_transformers and self.pretrained is None:
            bad("backend", "runs a pretrained checkpoint through transformers: set model.pretrained")
        if self.via_transformers and self.upcycle_experts:
            bad("upcycle_experts", "upcycling builds the harness's own MoE decoder: it needs "
                "model.backend=native (a Llama-layout checkpoint)")
        if self.head_dim % 2 != 0 and not self.via_transformers:
            bad("n_heads", f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.norm_eps <= 0:
            bad("norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if self.n_experts < 0:
            bad("n_experts", "must be >= 0 (0 = dense MLP)")
        if self.qkv_bias and (self.is_moe or self.upcycle_experts):
            bad("qkv_bias", "q/k/v biases (Qwen2) are supported in dense models only")
        if isinstance(self.lora, dict):  # from a plain mapping (ModelConfig.from_dict)
            self.lora = LoRASettings(**self.lora)
        lora = self.lora
        if lora.r < 0:
            raise ConfigError(f"model.lora.r={lora.r}: must be >= 0 (0 = no adapters)")
        if lora.r and lora.alpha <= 0:
            raise ConfigError(f"model.lora.alpha={lora.alpha}: must be > 0")
        if lora.reward_and_critic and not lora.r:
            raise ConfigError("model.lora.reward_and_critic=true: puts adapters on the reward model "
                              "and the critic; set model.lora.r > 0")
        if not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
        unknown = sorted(set(lora.target_modules) - set(LINEAR_LAYERS))
        if self.via_transformers:  # the model's own layer names (adapter.lora_targets)
            unknown = []
        if lora.r and (unknown or not lora.target_modules):
            raise ConfigError(f"model.lora.target_modules={list(lora.target_modules)}: must be a "
                              f"non-empty subset of {list(LINEAR_LAYERS)}")
        if lora.r and self.is_moe and set(lora.target_modules) & {"gate_proj", "up_proj", "down_proj"}:
            raise ConfigError("model.lora.target_modules: MoE experts are fused tensors, not linear "
                              "layers; target the attention projections (q_proj, k_proj, v_proj, "
                              "o_proj) in an MoE model")
        if self.upcycle_experts < 0:
            bad("upcycle_experts", "must be >= 0 (0 = no upcycling)")
        if self.upcycle_experts and self.pretrained is None:
            bad("upcycle_experts", "upcycles a pretrained dense checkpoint: set model.pretrained "
                "(a model trained from scratch takes model.n_experts instead)")
        if self.is_moe:
            if not 1 <= self.top_k <= self.n_experts:
                bad("top_k", f"must be between 1 and n_experts={self.n_experts}")
            if self.gating not in ("softmax", "noisy_top_k"):
                bad("gating", "must be 'softmax' or 'noisy_top_k'")
            if self.aux_loss_coef < 0:
                bad("aux_loss_coef", "must be >= 0")
            if self.router_z_loss_coef < 0:
                bad("router_z_loss_coef", "must be >= 0")

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """Build from a mapping (e.g. an OmegaConf node), ignoring unknown keys such as ``_target_``."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})
