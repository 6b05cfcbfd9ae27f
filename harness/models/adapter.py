"""Any ``transformers`` causal LM behind the harness's backbone interface (``model.backend=transformers``).

The harness's own decoder (:class:`harness.models.llama.CausalLM`) implements the Llama, Mixtral
and Qwen2 layouts. Every other ``AutoModelForCausalLM`` (GPT-2, GPT-NeoX, OPT, Phi, ...) runs
through :class:`TransformersCausalLM`, a thin wrapper that offers what the methods, the sampler
and the checkpoints use of a backbone:

* ``forward(input_ids [B, T], attention_mask [B, S], past, use_cache, return_logits, logits_to_keep)`` ->
  :class:`~harness.models.llama.CausalLMOutput` (logits [B, T, V], hidden [B, T, D] after the
  final norm, a zero auxiliary loss, the cache). Positions count real tokens only
  (:func:`~harness.models.llama.positions_from_mask`), so left-padded prompts in the KV-cached
  sampler see the positions they would see alone.
* ``new_cache(capacity)``: transformers' own ``DynamicCache`` (with the ``length`` the sampler
  reads); ``cfg`` (a :class:`ModelConfig` with the checkpoint's shape); ``device``; ``lm_head``.
* Dropout is switched off, as in the harness's decoder (and TRL's ``disable_dropout``), so the
  log-probabilities of a rollout are those of the policy that trains on it.
* Checkpoints: :func:`save_transformers` writes the wrapped model with ``save_pretrained`` (so
  lm-eval and ``transformers`` load it as the same class), :func:`load_transformers` reads it back.

What the adapter cannot offer is reported once per process, by name (:func:`report_limits`),
never as a silent zero: the per-expert load and the MoE auxiliary loss of a sparse checkpoint
(not read from the wrapped model: ``train/expert_load_*`` is absent and the auxiliary loss is not
added), and sparse upcycling (refused by the config). The logits are
``lm_head(last_hidden_state)``; a model that changes them further (e.g. logit soft-capping) is
refused when it is loaded, since the value head and the methods read the hidden states.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.models.architecture import LINEAR_LAYERS, ConfigError, ModelConfig
from harness.models.llama import CausalLMOutput, last_positions, positions_from_mask

log = logging.getLogger("harness")

#: model types the harness's own decoder implements (harness.models.hf.config_from_hf)
NATIVE_TYPES = ("llama", "mixtral", "qwen2")
_REPORTED: set[str] = set()


def _first(hf: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present in a ``config.json`` dict (architectures name fields apart:
    GPT-2's ``n_embd`` is Llama's ``hidden_size``)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"config.json has none of {list(keys)}")


def adapter_config(hf: dict[str, Any], model: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint run through the adapter, from its ``config.json``.

    The shape fields describe the checkpoint (for the scalar heads, the bench and the logs); the
    wrapped model, not these fields, decides the computation. LoRA's default targets (the Llama
    names) become ``peft``'s default targets for the model type (GPT-2: ``c_attn``).
    """
    d = int(_first(hf, "hidden_size", "n_embd", "d_model"))
    fields: dict[str, Any] = dict(
        d_model=d,
        n_layers=int(_first(hf, "num_hidden_layers", "n_layer", "num_layers")),
        n_heads=int(_first(hf, "num_attention_heads", "n_head", "num_heads")),
        d_ff=int(hf.get("intermediate_size") or hf.get("n_inner") or hf.get("ffn_dim") or 4 * d),
        max_seq_len=int(_first(hf, "max_position_embeddings", "n_positions", "n_ctx")),
        vocab_size=int(hf["vocab_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        backend="transformers",
    )
    heads = fields["n_heads"]
    if d % heads:  # bookkeeping only (the wrapped model decides): keeps the config valid
        fields["attn_head_dim"] = int(hf.get("head_dim") or max(1, d // heads))
    ours = {k: v for k, v in model.items() if k in ("name", "pretrained", "revision", "lora",
                                                     "upcycle_experts", "gradient_checkpointing")
            and v is not None}
    lora = dict(ours.get("lora") or {})
    if lora.get("r") and list(lora.get("target_modules") or LINEAR_LAYERS) == list(LINEAR_LAYERS):
        lora["target_modules"] = lora_targets(str(hf.get("model_type")))
        ours["lora"] = lora
    return ModelConfig.from_dict({**fields, **ours})


def lora_targets(model_type: str) -> list[str]:
    """``peft``'s default LoRA target modules for ``model_type``. Raises ConfigError if none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    if model_type not in known:
        raise ConfigError(f"model.lora.target_modules: peft knows no default targets for "
                          f"model_type={model_type!r}; name the model's linear layers")
    return list(known[model_type])


def report_limits(cfg: ModelConfig, model_type: str, cls: str, sparse: bool) -> None:
    """Log, once per process and model, what the adapter cannot offer (by name)."""
    if cfg.name in _REPORTED:
        return
    _REPORTED.add(cfg.name)
    missing = ["sparse upcycling (model.upcycle_experts)"]
    if sparse:
        missing[:0] = ["per-expert load (train/expert_load_* absent)",
                       "the MoE auxiliary loss (not added to the losses)"]
    log.warning("model %s: model_type=%s runs through transformers' %s (model.backend=transformers, "
                "the adapter); not available through it: %s", cfg.name, model_type, cls,
                "; ".join(missing))


class TransformersCache:
    """``transformers``' ``DynamicCache`` plus ``length`` (cached positions) for the sampler."""

    def __init__(self) -> None:
        from transformers import DynamicCache

        self.hf = DynamicCache()
        self.length = 0


class TransformersCausalLM(nn.Module):
    """A ``transformers`` causal LM as a harness backbone (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.hf = hf_model
        self.cfg = cfg
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        import inspect

        # transformers 5.x renames ``past_key_values`` to ``cache``; take whichever it has
        params = inspect.signature(hf_model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def set_gradient_checkpointing(self, on: bool) -> None:
        """transformers' own gradient checkpointing of the wrapped model, on or off."""
        if on:
            self.hf.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif getattr(self.hf, "is_gradient_checkpointing", False):
            self.hf.gradient_checkpointing_disable()

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def moe_layers(self) -> list[nn.Module]:
        return []

    def new_cache(self, capacity: int) -> TransformersCache:
        """An empty cache (``DynamicCache`` grows as it goes; ``capacity`` is not needed)."""
        return TransformersCache()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: TransformersCache | None = None, use_cache: bool = False,
                return_logits: bool = True, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, S] (S = cached length + T; 1 = real token);
        ``logits_to_keep``: as :meth:`harness.models.llama.CausalLM.forward`."""
        b, t = input_ids.shape
        if use_cache and past is None:
            past = self.new_cache(t)
        past_len = past.length if past is not None else 0
        pos = positions_from_mask(attention_mask, b, t, past_len, input_ids.device)
        out = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=pos, use_cache=past is not None,
                                 **{self._cache_arg: past.hf if past is not None else None})
        hidden = out.last_hidden_state
        if past is not None:
            past.length = past_len + t
        logits = self.lm_head(last_positions(hidden, logits_to_keep)) if return_logits else None
        return CausalLMOutput(logits=logits, hidden=hidden, aux_loss=hidden.new_zeros(()),
                              past=past)


def _check_logits(model: TransformersCausalLM, folder: Path) -> None:
    """Refuse a model whose logits are not ``lm_head(last_hidden_state)``."""
    ids = torch.arange(1, 9, dtype=torch.long, device=model.device)[None] % model.cfg.vocab_size
    with torch.no_grad():
        ours = model(ids).logits
        theirs = model.hf(ids).logits
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ConfigError(f"model.pretrained={str(folder)!r}: its logits are not "
                          "lm_head(last hidden state) (e.g. soft-capped); the transformers adapter "
                          "cannot run it")


def load_transformers(folder: str | Path, cfg: ModelConfig | None = None,
                      ) -> TransformersCausalLM:
    """The checkpoint ``folder`` as a :class:`TransformersCausalLM` (float32, train mode)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    hf_cfg = json.loads((folder / "config.json").read_text())
    if cfg is None:
        cfg = adapter_config(hf_cfg, dict(hf_cfg.get("harness") or {}))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for module in hf.modules():  # as TRL's disable_dropout: the sampled policy is the trained one
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    sparse = any(k in hf_cfg for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    report_limits(cfg, str(hf_cfg.get("model_type")), type(hf).__name__, sparse)
    model = TransformersCausalLM(hf, cfg)
    _check_logits(model, folder)
    return model.train()


def save_transformers(model: TransformersCausalLM, tmp: Path) -> None:
    """``save_pretrained`` of the wrapped model into ``tmp``, the harness's name in ``config.json``."""
    hf = model.hf
    hf.config.harness = {"name": model.cfg.name, "backend": "transformers"}
    try:
        hf.save_pretrained(tmp)
    finally:
        del hf.config.harness
