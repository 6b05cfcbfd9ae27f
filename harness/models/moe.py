"""Mixture-of-Experts feed-forward layer: a router over SwiGLU experts.

    y = sum_i G(x)_i E_i(x)                                   (seed, "Mixture of Experts Setup")
    softmax gating:      G(x) = Softmax(KeepTopK(x W_g, k))
    noisy top-k gating:  H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)
                         G(x) = Softmax(KeepTopK(H(x), k))    (Shazeer et al. 2017; noise in training only)

``Softmax(KeepTopK(l, k))`` equals the full softmax renormalised over the top k, which is what
``transformers``' Mixtral computes, so a softmax-gated layer exports to ``MixtralForCausalLM`` as is.
The expert weights use Mixtral's fused layout: ``gate_up_proj`` [E, 2F, D] (gate rows first) and
``down_proj`` [E, D, F].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.architecture import ModelConfig


def switch_load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor,
                               n_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    Args:
        router_probs: [N, E] softmax router probabilities per token.
        expert_index: [N, k] experts each token is dispatched to.
    Returns:
        scalar: f_i is the fraction of the N*k dispatches that go to expert i, P_i the mean router
        probability of expert i. Equals 1 under perfectly uniform routing and grows with imbalance.
    """
    dispatch = F.one_hot(expert_index, n_experts).float().sum(dim=1)  # [N, E]
    f = dispatch.mean(dim=0) / expert_index.shape[-1]
    p = router_probs.mean(dim=0)
    return n_experts * torch.sum(f * p)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_n (logsumexp_i l_{n,i})^2`` (ST-MoE, Zoph et al. 2022, eq. 5). [N, E] -> scalar."""
    return torch.logsumexp(router_logits, dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """Token router: logits ``x W_g`` [N, E] (+ Shazeer noise in training), top-k, renormalised gates."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.gating = cfg.n_experts, cfg.top_k, cfg.gating
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.noise = nn.Linear(cfg.d_model, cfg.n_experts, bias=False) if cfg.gating == "noisy_top_k" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (routing logits [N, E], gates [N, k] summing to 1, expert indices [N, k])."""
        logits = F.linear(x, self.weight)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        top_logits, index = torch.topk(logits, self.top_k, dim=-1)
        gates = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # Softmax(KeepTopK(H, k))
        return logits, gates, index


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts ``E_i(x) = W_down,i (silu(W_gate,i x) * W_up,i x)`` in Mixtral's fused layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.d_ff = cfg.n_experts, cfg.d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_ff, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))

    def forward(self, x: torch.Tensor, gates: torch.Tensor, index: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        """Sparse dispatch: x [N, D], gates/index [N, k], counts[e] = dispatches to expert e -> [N, D].

        Each expert sees only its tokens. The N*k dispatches are sorted by expert and gathered once
        ([N*k, D]); each expert works on its contiguous slice, and one ``index_add_`` scatters the
        gated outputs back: a constant number of gather/scatter ops per layer (and, in the
        backward pass, one gradient buffer per weight tensor instead of one per expert).
        """
        order = torch.argsort(index.reshape(-1), stable=True)
        token_of = order // index.shape[1]                      # [N*k] token of each dispatch
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outputs = []
        for e, tokens in enumerate(x[token_of].split(counts)):
            if tokens.shape[0] == 0:
                continue
            gate, up = F.linear(tokens, gate_up[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down[e]))
        y = torch.cat(outputs) * gates.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, y)

    def dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: ``sum_e weights[:, e] * E_e(x)``. x [N, D], weights [N, E]
        (a token's gates at its top-k experts, 0 elsewhere) -> [N, D].

        :meth:`forward`'s output up to rounding (other matrix shapes, another summation order)
        for E/k times its expert FLOPs, with fixed shapes and no dispatch counts read on the
        host: what a CUDA graph can replay (the sampler's decode step on a GPU), where a few
        tokens per step make the extra FLOPs cheap and the host round trip dear.
        """
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, F]
        out = torch.matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # [E, N, D]
        return (out * weights.T[..., None]).sum(0)


class MoEFeedForward(nn.Module):
    """Router + experts replacing the dense SwiGLU MLP. [B, T, D] -> [B, T, D].

    After each forward, ``aux_loss`` holds the weighted auxiliary loss of the layer
    (``aux_loss_coef`` * Switch load balancing + ``router_z_loss_coef`` * z-loss), ``load_balancing``
    and ``z_loss`` the raw terms, and ``expert_load`` [E] the fraction of dispatches per expert.
    Under ``torch.no_grad`` / ``inference_mode`` (sampling, reference log-probs) the three loss
    terms are not computed and read 0; ``expert_load`` always is.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = TopKRouter(cfg)
        self.experts = SwiGLUExperts(cfg)
        self.aux_loss = torch.zeros(())
        self.load_balancing = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.expert_load = torch.zeros(cfg.n_experts)

    def __getstate__(self) -> dict:
        """The module's state for ``copy.deepcopy`` / pickling, with the last forward's loss terms
        detached: after a training step they are graph tensors, which ``deepcopy`` refuses (a
        LoRA checkpoint is merged into a copy right after training)."""
        state = dict(super().__getstate__())
        for key in ("aux_loss", "load_balancing", "z_loss"):
            if torch.is_tensor(state.get(key)):
                state[key] = state[key].detach()
        return state

    def dispatch_counts(self, index: torch.Tensor) -> torch.Tensor:
        """Dispatches per expert [E] of the expert indices ``index`` [N, k]."""
        with torch.no_grad():
            return torch.bincount(index.reshape(-1), minlength=self.cfg.n_experts)

    def mix(self, flat: torch.Tensor) -> torch.Tensor:
        """The layer's output alone, flat [N, D] -> [N, D]: routing and experts as in
        :meth:`forward`, without the statistics it keeps (auxiliary losses, expert load). The
        sampler's decoding step (:mod:`harness.models.decoding`) calls this: it reads only the
        logits."""
        _, gates, index = self.gate(flat)
        return self.experts(flat, gates, index, self.dispatch_counts(index).tolist())

    def mix_dense(self, flat: torch.Tensor) -> torch.Tensor:
        """:meth:`mix` with every expert run on every token (:meth:`SwiGLUExperts.dense`): the
        same routing, the output up to rounding, fixed shapes. flat [N, D] -> [N, D]."""
        _, gates, index = self.gate(flat)
        weights = gates.new_zeros(flat.shape[0], self.cfg.n_experts).scatter(1, index, gates)
        return self.experts.dense(flat, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        # not mix(): the auxiliary terms are built before the experts, as they always were, since
        # the backward accumulates the router's gradient in the graph's order (its rounding)
        logits, gates, index = self.gate(flat)
        if torch.is_grad_enabled():
            probs = torch.softmax(logits.float(), dim=-1)
            self.load_balancing = switch_load_balancing_loss(probs, index, self.cfg.n_experts)
            self.z_loss = router_z_loss(logits.float())
            self.aux_loss = (self.cfg.aux_loss_coef * self.load_balancing
                             + self.cfg.router_z_loss_coef * self.z_loss)
        else:  # sampling, reference log-probs: nothing to back-propagate, so skip the extra ops
            self.aux_loss = self.load_balancing = self.z_loss = flat.new_zeros(())
        counts = self.dispatch_counts(index)
        with torch.no_grad():
            self.expert_load = counts.float() / counts.sum()
        return self.experts(flat, gates, index, counts.tolist()).reshape(b, t, d)
