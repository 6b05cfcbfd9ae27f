"""Sparse upcycling (Komatsuzaki et al., 2022): a dense LLaMA becomes a Mixture-of-Experts model.

Every expert of layer l starts as a copy of layer l's dense SwiGLU MLP, and each layer gets a fresh
router (``W_g`` [E, D] from the MoE initialisation; softmax or noisy top-k gating). Attention,
norms, embeddings and the output head are copied unchanged. Because the top-k gates of a token sum
to 1 (``Softmax(KeepTopK(H, k))``) and the k experts it reaches are identical,
``Σ_i g_i E_i(x) = E(x)``: before any training the upcycled model computes the dense model's
function (its logits equal the dense model's up to float rounding), whatever the router picks.
Training then lets the experts and the router diverge. This is how the benchmark's MoE arm can
start from real pretrained weights (``model=hf model.upcycle_experts=E``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM


def upcycled_config(dense: ModelConfig, n_experts: int, top_k: int, gating: str = "softmax",
                    ) -> ModelConfig:
    """``dense`` with ``n_experts`` experts of its MLP's size, ``top_k`` of them per token."""
    if dense.is_moe:
        raise ValueError(f"upcycling needs a dense model; this one has {dense.n_experts} experts")
    return replace(dense, n_experts=n_experts, top_k=top_k, gating=gating)


@torch.no_grad()
def upcycle(dense: CausalLM, cfg: ModelConfig) -> CausalLM:
    """The MoE model of ``cfg`` (from :func:`upcycled_config`) built from ``dense``'s weights.

    Expert weights in the fused layout: ``gate_up_proj[e] = cat(W_gate, W_up)`` [2F, D],
    ``down_proj[e] = W_down`` [D, F] for every e. The router (and the noise weights of
    ``noisy_top_k``) keep the fresh initialisation of ``CausalLM(cfg)`` (global RNG).
    """
    if not cfg.is_moe or cfg.d_ff != dense.cfg.d_ff:
        raise ValueError("upcycle: cfg must be the MoE version of the dense model's config")
    moe = CausalLM(cfg).to(next(dense.parameters()).dtype)
    state = moe.state_dict()
    for name, value in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = value
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight), dim=0)  # [2F, D]
        prefix = f"model.layers.{i}.mlp.experts"
        state[f"{prefix}.gate_up_proj"] = gate_up.expand(cfg.n_experts, *gate_up.shape).clone()
        down = mlp.down_proj.weight
        state[f"{prefix}.down_proj"] = down.expand(cfg.n_experts, *down.shape).clone()
    moe.load_state_dict(state)
    return moe.train(dense.training)
