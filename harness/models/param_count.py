"""Per-component parameter counts of the backbone (the logic of ``python -m harness.params``).

Counts come from the module itself, built on the ``meta`` device by :func:`meta_model` so that even
the 70B presets cost no memory. Shared (tied) tensors are counted once: a tied output head adds 0.
"""

from __future__ import annotations

import re

import torch

from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM

__all__ = ["format_breakdown", "meta_model", "parameter_breakdown"]

# Per-layer parameter name (after ``model.layers.N.``) -> component key.
_LAYER_COMPONENTS: dict[str, str] = {
    "self_attn.q_proj.weight": "attention.q_proj",
    "self_attn.k_proj.weight": "attention.k_proj",
    "self_attn.v_proj.weight": "attention.v_proj",
    "self_attn.o_proj.weight": "attention.o_proj",
    "self_attn.q_proj.bias": "attention.q_proj",
    "self_attn.k_proj.bias": "attention.k_proj",
    "self_attn.v_proj.bias": "attention.v_proj",
    "mlp.gate_proj.weight": "mlp.gate_proj",
    "mlp.up_proj.weight": "mlp.up_proj",
    "mlp.down_proj.weight": "mlp.down_proj",
    "mlp.experts.gate_up_proj": "moe.experts.gate_up_proj",
    "mlp.experts.down_proj": "moe.experts.down_proj",
    "mlp.gate.weight": "moe.router",
    "mlp.gate.noise.weight": "moe.router_noise",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def meta_model(cfg: ModelConfig) -> CausalLM:
    """``CausalLM(cfg)`` on the meta device: shapes only, no storage (70B models count for free)."""
    with torch.device("meta"):
        return CausalLM(cfg)


def parameter_breakdown(model: CausalLM) -> dict[str, int]:
    """Parameter counts per component, in display order.

    Keys: ``embedding``; ``layer.<component>`` for one decoder layer (``attention.{q,k,v,o}_proj``,
    ``mlp.{gate,up,down}_proj`` or ``moe.experts.{gate_up,down}_proj`` + ``moe.router``
    (+ ``moe.router_noise``), ``input_layernorm``, ``post_attention_layernorm``); ``layer`` (one
    layer's total); ``layers`` (all layers); ``final_norm``; ``lm_head`` (0 when tied to the
    embedding); ``total`` (every distinct parameter); for MoE models ``active`` -- the parameters
    one token uses, i.e. ``total`` minus the ``n_experts - top_k`` experts it is not routed to in
    every layer (router noise counted: it acts on every token in training).

    Raises ``ValueError`` on a parameter name it does not know, so ``total`` always equals
    ``sum(p.numel() for p in model.parameters())``.
    """
    cfg = model.cfg
    per_layer_sum: dict[str, int] = {}
    top = {"embedding": 0, "final_norm": 0, "lm_head": 0}
    for name, p in model.named_parameters():  # named_parameters() lists a tied tensor once
        m = _LAYER.fullmatch(name)
        if m is not None and m[2] in _LAYER_COMPONENTS:
            key = _LAYER_COMPONENTS[m[2]]
            per_layer_sum[key] = per_layer_sum.get(key, 0) + p.numel()
        elif name == "model.embed_tokens.weight":
            top["embedding"] += p.numel()
        elif name == "model.norm.weight":
            top["final_norm"] += p.numel()
        elif name == "lm_head.weight":
            top["lm_head"] += p.numel()
        else:
            raise ValueError(f"parameter_breakdown: unknown parameter {name!r}")
    out: dict[str, int] = {"embedding": top["embedding"]}
    order = list(dict.fromkeys(_LAYER_COMPONENTS.values()))
    for key in order:
        if key in per_layer_sum:
            if per_layer_sum[key] % cfg.n_layers:
                raise ValueError(f"parameter_breakdown: layers differ in {key}")
            out[f"layer.{key}"] = per_layer_sum[key] // cfg.n_layers
    out["layer"] = sum(v for k, v in out.items() if k.startswith("layer."))
    out["layers"] = sum(per_layer_sum.values())
    out["final_norm"] = top["final_norm"]
    out["lm_head"] = top["lm_head"]
    out["total"] = out["embedding"] + out["layers"] + out["final_norm"] + out["lm_head"]
    if cfg.is_moe:
        per_expert = (out["layer.moe.experts.gate_up_proj"]
                      + out["layer.moe.experts.down_proj"]) // cfg.n_experts
        out["active"] = out["total"] - cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert
    return out


_LABELS: dict[str, str] = {
    "attention.q_proj": "attention q_proj",
    "attention.k_proj": "attention k_proj",
    "attention.v_proj": "attention v_proj",
    "attention.o_proj": "attention o_proj",
    "mlp.gate_proj": "mlp gate_proj",
    "mlp.up_proj": "mlp up_proj",
    "mlp.down_proj": "mlp down_proj",
    "moe.experts.gate_up_proj": "experts gate_up_proj",
    "moe.experts.down_proj": "experts down_proj",
    "moe.router": "router",
    "moe.router_noise": "router noise (training only)",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}


def _describe(cfg: ModelConfig) -> str:
    kv = f" ({cfg.kv_heads} kv)" if cfg.kv_heads != cfg.n_heads else ""
    arch = (f"MoE {cfg.n_experts} experts top-{cfg.top_k} ({cfg.gating})" if cfg.is_moe
            else "dense")
    return (f"{cfg.name}: {arch}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads{kv}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}"
            f"{', tied embeddings' if cfg.tie_embeddings else ''}")


def format_breakdown(breakdown: dict[str, int], cfg: ModelConfig) -> str:
    """Human-readable table of :func:`parameter_breakdown`; plain integers (no separators).

    The last line is exactly ``total <N>`` so scripts can read it with ``tail -1``.
    """
    total = breakdown["total"]
    width = 40

    def row(label: str, n: int, share: bool = True) -> str:
        pct = f"  {100.0 * n / total:6.2f}%" if share and total else ""
        return f"{label:<{width}}{n:>14d}{pct}"

    lines = [_describe(cfg), row("embedding", breakdown["embedding"]), "per layer:"]
    for key, label in _LABELS.items():
        if f"layer.{key}" in breakdown:
            lines.append(row(f"  {label}", breakdown[f"layer.{key}"], share=False))
    lines.append(row("  layer total", breakdown["layer"], share=False))
    lines.append(row(f"layers ({cfg.n_layers} x {breakdown['layer']})", breakdown["layers"]))
    lines.append(row("final norm", breakdown["final_norm"]))
    head = "output head (tied to embedding: +0)" if cfg.tie_embeddings else "output head"
    lines.append(row(head, breakdown["lm_head"]))
    if "active" in breakdown:
        lines.append(row(f"active per token (top {cfg.top_k} of {cfg.n_experts} experts)",
                         breakdown["active"]))
    lines.append(f"total {total}")
    return "\n".join(lines)


def format_transformers_breakdown(cfg: ModelConfig) -> str:
    """Parameter counts of a checkpoint run through the transformers adapter, built on the meta
    device from its ``config.json``: one row per top-level module of the wrapped model (its names,
    e.g. GPT-2's ``transformer.wte`` ... ``transformer.h``), then ``total <N>`` (every distinct
    parameter; a tied output head counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models.pretrained import resolve

    folder = resolve(str(cfg.pretrained), cfg.revision)
    hf_cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    rows: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied tensor is listed once
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == model.base_model_prefix else parts[0]
        rows[key] = rows.get(key, 0) + p.numel()
    total = sum(rows.values())
    lines = [f"{cfg.name}: {hf_cfg.model_type} through transformers ({type(model).__name__}), "
             f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
             f"vocab {cfg.vocab_size}{', tied embeddings' if cfg.tie_embeddings else ''}"]
    lines += [f"{key:<40}{n:>14d}  {100.0 * n / total:6.2f}%" for key, n in rows.items()]
    lines.append(f"total {total}")
    return "\n".join(lines)
