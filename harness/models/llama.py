"""A LLaMA-style decoder, readable in one sitting (after nanoGPT / litgpt).

Token embedding -> n_layers x [RMSNorm -> attention (RoPE, MHA or GQA) -> residual,
RMSNorm -> SwiGLU MLP (or MoE) -> residual] -> RMSNorm -> untied output head.

Parameter names follow ``transformers``' ``LlamaForCausalLM`` / ``MixtralForCausalLM`` so that
export to a Hugging Face checkpoint is a plain state-dict copy (see :mod:`harness.models.hf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from harness.models.architecture import ModelConfig
from harness.models.moe import MoEFeedForward


class KVCache:
    """Keys and values of every layer in preallocated buffers [B, n_kv, capacity, hd].

    Decoding writes each step's keys/values into the next free slot instead of concatenating a
    new, one-longer tensor per layer and step (which copies the whole cache every step).
    ``length`` is the number of cached positions. A layer's buffers are allocated at its first
    write, in the dtype and device of the keys / values written (under autocast the rotated keys
    are float32 and the values bf16), and double when a write would overflow them. The cache is
    updated in place by the forward pass that receives it, so one cache follows one continuation.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.capacity = max(1, capacity)
        self.length = 0

    def _reserve(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s buffers, (re)allocated like ``k`` and ``v`` to hold ``end`` positions."""
        old_k, old_v = self.k[layer], self.v[layer]
        if (old_k is not None and old_v is not None and end <= old_k.shape[2]
                and old_k.dtype == k.dtype and old_v.dtype == v.dtype):
            return old_k, old_v
        cap = max(end, self.capacity if old_k is None else 2 * old_k.shape[2])
        new_k = k.new_empty(*k.shape[:2], cap, k.shape[3])
        new_v = v.new_empty(*v.shape[:2], cap, v.shape[3])
        if old_k is not None and old_v is not None:
            new_k[:, :, :self.length] = old_k[:, :, :self.length]
            new_v[:, :, :self.length] = old_v[:, :, :self.length]
        self.k[layer], self.v[layer] = new_k, new_v
        return new_k, new_v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] after the cached positions of ``layer``; return the layer's
        keys and values so far [B, n_kv, length + T, hd] (views of the buffers)."""
        end = self.length + k.shape[2]
        buf_k, buf_v = self._reserve(layer, k, v, end)
        buf_k[:, :, self.length:end] = k
        buf_v[:, :, self.length:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``y = gamma * x / sqrt(mean(x^2) + eps)`` over the last dim (seed, "Understanding RMSNorm").

    x: [..., D], weight (gamma): [D] -> [..., D]; the normalisation is computed in float32 (a
    float32 x is used as it is: no cast ops on the decoding path).
    """
    h = x if x.dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if h.dtype == x.dtype else h.to(x.dtype))


class RMSNorm(nn.Module):
    """:func:`rms_norm` with one learnable gain per dimension, no bias. x: [..., D] -> [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE frequencies [d/2] under ``scaling`` (transformers' ``rope_parameters``).

    ``linear`` (position interpolation): every frequency / factor. ``llama3`` (Llama 3.1):
    wavelengths ``2π/f`` above ``L / low_freq_factor`` (L = original context) are stretched by
    ``factor``, those below ``L / high_freq_factor`` kept, and the band between interpolated with
    ``s = (L / wavelength - low) / (high - low)``: ``(1 - s) f / factor + s f``.
    """
    if not scaling:
        return inv_freq
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * out / factor + smooth * out, out)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions [B, T] -> (cos, sin) each [B, T, head_dim].

    Frequencies ``theta^(-2i/d)``, i < d/2 (scaled by :func:`scaled_inv_freq`), duplicated over
    both halves (the "rotate half" layout used by LLaMA checkpoints in ``transformers``).
    """
    inv_freq = scaled_inv_freq(1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                                             dtype=torch.float32) / head_dim)),
                               scaling)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos*freq_i: ``x cos + rotate_half(x) sin``.

    x: [B, H, T, hd]; cos, sin: [B, T, hd]. Rotating q and k by their positions makes q.k depend
    only on the relative position (Su et al. 2021).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Causal self-attention with RoPE; ``n_kv_heads < n_heads`` is grouped-query attention.

    x: [B, T, D] -> [B, T, D]. Each group of n_heads/n_kv_heads query heads shares one K/V head.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """mask: [B, 1, T, S] boolean (True = may attend) or None for plain causal attention.

        cache: holds the S - T earlier positions; this step's keys and values are added to it.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)`` with no biases (LLaMA's MLP). [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MoEFeedForward(cfg) if cfg.is_moe else SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Embedding, the stack of decoder layers and the final norm (``LlamaModel``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


@dataclass
class CausalLMOutput:
    """logits [B, T, V] (None when not asked for); hidden [B, T, D] after the final norm;
    aux_loss: the summed weighted MoE auxiliary loss (0 for dense models); past: the KV cache."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    aux_loss: torch.Tensor
    past: KVCache | None = None
    expert_load: list[torch.Tensor] = field(default_factory=list)


def build_attention_mask(attention_mask: torch.Tensor | None, t: int, s: int,
                         device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask combining causality and key padding, or None when plain causal.

    attention_mask: [B, S] (1 = real token) covering the cache and the T new tokens. Query rows
    that would see no key at all (left-padding positions) may attend to themselves, so softmax
    never sees an empty row; their outputs are ignored downstream. A boolean [B, 1, T, S] mask
    (a layout of its own, e.g. DPO's shared prompt) is used as it is.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None or bool(attention_mask.all()):
        if t == 1 or t == s:
            return None
        attention_mask = torch.ones(1, s, dtype=torch.bool, device=device)
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    q_pos = torch.arange(s - t, s, device=keys.device)[:, None]
    causal = torch.arange(s, device=keys.device)[None, :] <= q_pos  # [T, S]
    mask = keys & causal
    diag = torch.arange(s, device=keys.device)[None, :] == q_pos
    return mask | diag


def positions_from_mask(attention_mask: torch.Tensor | None, b: int, t: int, past_len: int,
                        device: torch.device) -> torch.Tensor:
    """Position ids [B, T]: counting real tokens only, so a left-padded row starts at position 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + t, device=device).expand(b, t)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -t:]


def last_positions(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """hidden [B, T, D] -> its last ``k`` positions [B, k, D] (all T when k is 0)."""
    if k < 0:
        raise ValueError(f"logits_to_keep={k}: must be >= 0 (0 keeps every position)")
    return hidden[:, -k:] if k else hidden


class CausalLM(nn.Module):
    """The policy backbone: ``forward`` -> logits (+ hidden states, + MoE auxiliary loss, + cache)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is None: set it (or let the tokenizer set it) first")
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each layer's activations in backward (``model.gradient_checkpointing``)."""
        self.gradient_checkpointing = on

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, ones for the norm gains, zeros for biases."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=self.cfg.init_std)

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs go there)."""
        return self.lm_head.weight.device

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEFeedForward)]

    def new_cache(self, capacity: int) -> KVCache:
        """An empty :class:`KVCache` sized for ``capacity`` positions (it grows past them)."""
        return KVCache(self.cfg.n_layers, capacity)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, use_cache: bool = False,
                return_logits: bool = True, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids: [B, T]; attention_mask: [B, S] with S = cached length + T (1 = real token),
        or a boolean [B, 1, T, S] mask used as it is (then ``position_ids`` [B, T] too: a
        packed layout's positions, which a 4-D mask does not determine).

        Training batches are right-padded and need no mask (causality keeps real tokens from seeing
        the padding after them); generation passes the mask for left-padded prompts.
        ``past`` (a :class:`KVCache`, updated in place) holds the earlier positions; with
        ``use_cache`` and no ``past`` a cache sized for these T positions is started. The output's
        ``past`` is that cache. ``logits_to_keep`` k > 0 (``transformers``' argument): logits of
        the last k positions only, [B, k, V] (the LM head is a fifth of SmolLM2's weights; the
        sampler's prefill needs one position, a response's log-probs its N + 1 last).
        """
        b, t = input_ids.shape
        if use_cache and past is None:
            past = self.new_cache(t)
        past_len = past.length if past is not None else 0
        mask = build_attention_mask(attention_mask, t, past_len + t, input_ids.device)
        if position_ids is not None:
            pos = position_ids
        elif attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("a [B, 1, T, S] attention mask needs position_ids")
        else:
            pos = positions_from_mask(attention_mask, b, t, past_len, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype,
                                self.cfg.rope_scaling)
        recompute = self.gradient_checkpointing and past is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # keep only the layer's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, past)
        if past is not None:
            past.length = past_len + t
        hidden = self.model.norm(x)
        moe = self.moe_layers
        aux = torch.stack([m.aux_loss for m in moe]).sum() if moe else hidden.new_zeros(())
        return CausalLMOutput(
            logits=self.lm_head(last_positions(hidden, logits_to_keep)) if return_logits else None,
            hidden=hidden,
            aux_loss=aux,
            past=past,
            expert_load=[m.expert_load for m in moe],
        )


class ScalarHead(nn.Module):
    """A backbone plus a linear scalar head: reward model and PPO critic. [B, T] -> [B, T] scores.

    The reward of a sequence is the score at its last real token (InstructGPT's reward model);
    the critic reads the score at every token as V(s_t).
    """

    def __init__(self, backbone: CausalLM) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_unused()
        self.score = nn.Linear(backbone.cfg.d_model, 1, bias=True)
        nn.init.normal_(self.score.weight, std=1.0 / (backbone.cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def freeze_unused(self) -> None:
        """Freeze the backbone's LM head: the scalar head reads hidden states, never the LM head,
        and a trainable parameter without a gradient is what DDP's gradient all-reduce refuses."""
        if not self.backbone.cfg.tie_embeddings:
            self.backbone.lm_head.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scores [B, T], MoE auxiliary loss)."""
        out = self.backbone(input_ids, attention_mask, return_logits=False)
        return self.score(out.hidden).squeeze(-1), out.aux_loss
