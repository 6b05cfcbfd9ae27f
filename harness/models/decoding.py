"""One-token decoding steps of the harness's own :class:`~harness.models.llama.CausalLM`, with
everything that does not change from token to token prepared once per ``generate`` call.

A KV-cached decoding step multiplies [B, 1, D] activations: at the sizes this harness trains, its
matrix products take a fraction of the step and the rest is per-op and per-module overhead
(computing RoPE tables, the attention mask and the positions again for every token, the
``nn.Module`` calls). :class:`DecodeStep` runs the same operations in the same order as
:meth:`CausalLM.forward` on the same tensors, so its logits, and hence the sampled tokens, equal
the forward's bit for bit (``tests/test_generation.py``), with what stays fixed within a call
done once:

* positions: a row's next position is its number of real prompt tokens plus the tokens decoded
  so far (what :func:`~harness.models.llama.positions_from_mask` computes from the grown mask);
* the RoPE cos/sin of every position the call can reach, gathered per step (the same
  :func:`~harness.models.llama.rope_cos_sin` values);
* the key-padding mask over the cache's capacity, sliced per step (``None`` when no prompt is
  padded, as :func:`~harness.models.llama.build_attention_mask` gives);
* the weights of every layer, read once, so a step calls ``F.linear`` instead of ``nn.Module``.

It applies only where that equality holds by construction: a :class:`CausalLM` whose attention
and dense MLP projections are plain ``nn.Linear`` modules, with no forward hooks, and with plain
tensors as parameters. A LoRA-adapted model (peft wraps the projections), a model behind the
``transformers`` adapter, or one whose modules carry hooks (e.g. a sharding strategy's) decodes
through ``forward`` as before (:func:`decode_step` returns ``None``). A Mixture-of-Experts MLP is
called as its module (routing and dispatch are the same code either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.llama import (
    Attention,
    CausalLM,
    DecoderLayer,
    KVCache,
    SwiGLU,
    apply_rope,
    rms_norm,
    rope_cos_sin,
)
from harness.models.moe import MoEFeedForward


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's tensors: norm gains, projection weights and biases, and its MLP
    (the :class:`SwiGLU` weights, or the MoE module, which is called as it is)."""

    norm1: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: torch.Tensor
    norm2: torch.Tensor
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | MoEFeedForward


def _plain(m: nn.Module) -> bool:
    """A module of exactly ``nn.Linear`` type (not a wrapper such as peft's LoRA layer)."""
    return type(m) is nn.Linear


def fast_path_ok(model: nn.Module) -> bool:
    """Whether :class:`DecodeStep` computes exactly what ``model.forward`` does (module docstring)."""
    if not isinstance(model, CausalLM):
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    for p in model.parameters():
        if type(p.data) is not torch.Tensor:  # e.g. a sharded DTensor
            return False
    for layer in model.model.layers:
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention:
            return False
        attn = layer.self_attn
        if not all(_plain(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            return False
        mlp = layer.mlp
        if type(mlp) is SwiGLU:
            if not all(_plain(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                return False
        elif type(mlp) is not MoEFeedForward:
            return False
    embed = model.model.embed_tokens
    return (type(model.lm_head) is nn.Linear and type(embed) is nn.Embedding
            and embed.max_norm is None)


class DecodeStep:
    """Feeds one new token per row to a cache that holds the prompt (and earlier new tokens).

    Built after the prefill forward: ``prompt_mask`` [B, P] (1 = real token) is the prompt's
    mask, ``cache`` the :class:`KVCache` that prefill filled (``cache.length == P``),
    ``max_steps`` the most tokens that will be fed. ``step(tokens [B]) -> logits [B, V]`` of
    the next position, the cache updated in place, as
    ``model(tokens[:, None], attention_mask=<prompt mask + ones>, past=cache).logits[:, -1]``.
    """

    def __init__(self, model: CausalLM, prompt_mask: torch.Tensor, cache: KVCache,
                 max_steps: int) -> None:
        cfg = model.cfg
        b, p = prompt_mask.shape
        if cache.length != p:
            raise ValueError(f"the cache holds {cache.length} positions, the prompt {p}")
        self.model, self.cache, self.b = model, cache, b
        self.n_heads, self.n_kv, self.hd, self.eps = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.norm_eps
        mask = prompt_mask.long()
        self.next_pos = mask.sum(-1)  # [B]: position of the first new token
        self.fed = 0
        self.max_steps = max_steps
        # the key mask over the prompt and every new token; None: no padding, plain attention
        self.keys = None if bool(mask.all()) else torch.cat(
            (mask.bool(), mask.new_ones(b, max_steps, dtype=torch.bool)), dim=1)[:, None, None, :]
        reach = int(self.next_pos.max()) + max_steps if b else max_steps
        positions = torch.arange(reach, device=prompt_mask.device)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32,
                                cfg.rope_scaling)
        self.cos_table, self.sin_table = cos[0], sin[0]  # [reach, hd]
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.head = model.lm_head.weight
        self.layers = [self._layer(layer) for layer in model.model.layers]

    @staticmethod
    def _layer(layer: DecoderLayer) -> _Layer:
        a = layer.self_attn
        mlp = layer.mlp
        return _Layer(
            norm1=layer.input_layernorm.weight,
            q=(a.q_proj.weight, a.q_proj.bias), k=(a.k_proj.weight, a.k_proj.bias),
            v=(a.v_proj.weight, a.v_proj.bias), o=a.o_proj.weight,
            norm2=layer.post_attention_layernorm.weight,
            mlp=mlp if isinstance(mlp, MoEFeedForward)
            else (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the last sampled ones) -> logits [B, V] at the position after them."""
        if self.fed >= self.max_steps:
            raise RuntimeError(f"DecodeStep: built for {self.max_steps} tokens, fed one more")
        b, h, kv, hd, eps = self.b, self.n_heads, self.n_kv, self.hd, self.eps
        pos = self.next_pos + self.fed  # [B]
        x = F.embedding(tokens[:, None], self.embed)  # [B, 1, D]
        cos = F.embedding(pos, self.cos_table).to(x.dtype)[:, None]  # [B, 1, hd]
        sin = F.embedding(pos, self.sin_table).to(x.dtype)[:, None]
        end = self.cache.length + 1
        mask = None if self.keys is None else self.keys[..., :end]
        for i, w in enumerate(self.layers):
            hn = rms_norm(x, w.norm1, eps)
            q = F.linear(hn, *w.q).view(b, 1, h, hd).transpose(1, 2)
            k = F.linear(hn, *w.k).view(b, 1, kv, hd).transpose(1, 2)
            v = F.linear(hn, *w.v).view(b, 1, kv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = self.cache.update(i, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != h)
            x = x + F.linear(y.transpose(1, 2).reshape(b, 1, -1), w.o)
            hn = rms_norm(x, w.norm2, eps)
            if isinstance(w.mlp, MoEFeedForward):
                x = x + w.mlp(hn)
            else:
                gate, up, down = w.mlp
                x = x + F.linear(F.silu(F.linear(hn, gate)) * F.linear(hn, up), down)
        self.cache.length = end
        self.fed += 1
        return F.linear(rms_norm(x, self.final_norm, eps), self.head)[:, -1]


def decode_step(model: nn.Module, prompt_mask: torch.Tensor, cache: object,
                max_steps: int) -> DecodeStep | None:
    """A :class:`DecodeStep` for ``model`` after its prefill, or ``None`` where decoding must
    go through ``model.forward`` (:func:`fast_path_ok`)."""
    if not isinstance(cache, KVCache) or not fast_path_ok(model):
        return None
    assert isinstance(model, CausalLM)
    return DecodeStep(model, prompt_mask, cache, max_steps)
