"""How close a step runs to the machine's limit: the fp32 matmul peak, measured, against the
step's FLOPs, counted analytically.

**FLOP model** (one multiply-add = 2 FLOPs; a dense LLaMA decoder with L layers, width d, h query
heads and kv key/value heads of width hd, MLP width d_ff, vocabulary V)::

    N_mm = L * (d*h*hd + 2*d*kv*hd + h*hd*d + 3*d*d_ff) + d*V       # q, k+v, o, gate+up+down; lm_head
    F_fwd(B, T) = 2 * N_mm * B * T  +  4 * L * B * T^2 * h*hd        # weights; attention scores

``N_mm`` counts the weights that take part in a matrix product: the embedding lookup and the norms
do not (a MoE layer counts its ``top_k`` active experts and its router). The attention term is
``Q K^T`` and ``softmax(.) V``: per layer and sequence two [T, hd] x [hd, T]-sized products per
head, counted over the whole T x T square, as the masked SDPA kernel computes it. A backward pass
costs twice its forward (gradients of activations and of weights), so forward + backward is
``3 * F_fwd``. Per step:

    GRPO / RLOO:  F = F_fwd (sampling)  +  F_fwd (reference)  +  3 * E * F_fwd (E policy passes)
                  with B = prompts x group, T = prompt + response tokens; with the group's
                  prompt shared (``share_prompt``, P prompt tokens, G = group) the reference
                  and policy passes run F_fwd(B / G, P + G (T - P)) instead
    DPO:          F = 3 * F_fwd(2 * pairs, T)    (reference log-probs precomputed, not in the step)
    PPO:          F = 2 F_fwd + 2 G_fwd + E (3 F_fwd + 3 G_fwd)
                  sampling and the reference pass (the policy's size), the reward model's and the
                  critic's passes over the rollout, E epochs of policy and critic forward +
                  backward; G_fwd = F_fwd less the LM head's 2 d V B T (a scalar head instead)

Sampling with a KV cache computes each position's projections once, so its weight term is one
forward over the final sequences; its attention term is at most that (a cached position attends
only to earlier ones). Elementwise work (RoPE, norms, softmax, the optimiser) is left out: the
figure is the matmul work, the part that can run at the matmul peak.
"""

from __future__ import annotations

import time

import torch

from harness.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """``N_mm``: weights per token that enter a matrix product (the module docstring's formula)."""
    attn = cfg.d_model * cfg.n_heads * cfg.head_dim * 2 + 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim
    mlp = 3 * cfg.d_model * cfg.d_ff
    if cfg.is_moe:
        mlp = cfg.top_k * mlp + cfg.d_model * cfg.n_experts
    assert cfg.vocab_size is not None, "model_cfg.vocab_size must be set"
    return cfg.n_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """``F_fwd(B, T) = 2 N_mm B T + 4 L B T^2 h hd``: one forward over [B, T] tokens."""
    weights = 2.0 * matmul_params(cfg) * batch * seq_len
    scores = 4.0 * cfg.n_layers * batch * seq_len**2 * cfg.n_heads * cfg.head_dim
    return weights + scores


def grpo_step_flops(cfg: ModelConfig, sequences: int, seq_len: int, epochs: int = 1,
                    packed_group: int = 0, prompt_len: int = 0) -> float:
    """One rollout + update of a group method: sampling, the reference pass and ``epochs`` policy
    passes (forward + backward) over ``sequences`` x ``seq_len`` tokens: ``(2 + 3 E) F_fwd``.
    ``packed_group`` G > 0: the reference and policy passes run each group's ``prompt_len``
    prompt tokens once (``share_prompt``): ``F_fwd + (1 + 3 E) F_fwd(B / G, P + G (T - P))``."""
    if not packed_group:
        return (2 + 3 * epochs) * forward_flops(cfg, sequences, seq_len)
    packed = forward_flops(cfg, sequences // packed_group,
                           prompt_len + packed_group * (seq_len - prompt_len))
    return forward_flops(cfg, sequences, seq_len) + (1 + 3 * epochs) * packed


def ppo_step_flops(cfg: ModelConfig, prompts: int, seq_len: int, epochs: int) -> float:
    """One PPO rollout + update (the module docstring's PPO line): ``2 F + 2 G + 3 E (F + G)``
    with F = ``F_fwd(prompts, seq_len)`` and G the same without the LM head (the reward model
    and the critic end in one scalar)."""
    f = forward_flops(cfg, prompts, seq_len)
    assert cfg.vocab_size is not None, "model_cfg.vocab_size must be set"
    g = f - 2.0 * cfg.d_model * cfg.vocab_size * prompts * seq_len
    return 2 * f + 2 * g + 3 * epochs * (f + g)


def dpo_step_flops(cfg: ModelConfig, pairs: int, seq_len: int) -> float:
    """One DPO step: forward + backward over chosen and rejected, ``3 F_fwd(2 pairs, T)``."""
    return 3 * forward_flops(cfg, 2 * pairs, seq_len)


def matmul_gflops(n: int, trials: int = 5, min_s: float = 0.1,
                  device: torch.device | None = None) -> float:
    """The best of ``trials`` fp32 ``[n, n] @ [n, n]`` rates in GFLOP/s (2 n^3 FLOPs a product),
    each trial repeating the product for at least ``min_s`` seconds, at torch's thread count."""
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = max(best, 2.0 * n**3 * reps / dt / 1e9)
    return best
