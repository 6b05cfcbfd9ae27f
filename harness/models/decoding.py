"""One-token decoding steps of the harness's own :class:`~harness.models.llama.CausalLM`, with
everything that does not change from token to token prepared once per ``generate`` call.

A KV-cached decoding step multiplies [B, 1, D] activations: at the sizes this harness trains, its
matrix products take a fraction of the step and the rest is per-op and per-module overhead
(computing RoPE tables, the attention mask and the positions again for every token, the
``nn.Module`` calls). :class:`DecodeStep` runs the same operations in the same order as
:meth:`CausalLM.forward` on the same tensors, so its logits, and hence the sampled tokens, equal
the forward's bit for bit (``tests/test_decoding.py``), with what stays fixed within a call
done once:

* positions: a row's next position is its number of real prompt tokens plus the tokens decoded
  so far (what :func:`~harness.models.llama.positions_from_mask` computes from the grown mask);
* the RoPE cos/sin of every position the call can reach, gathered per step (the same
  :func:`~harness.models.llama.rope_cos_sin` values);
* the key-padding mask over the cache's capacity, sliced per step (``None`` when no prompt is
  padded, as :func:`~harness.models.llama.build_attention_mask` gives);
* each submodule's operation, looked up once: a plain ``nn.Linear``, ``nn.Embedding`` or
  :class:`~harness.models.llama.RMSNorm` becomes its function on its weights (no ``nn.Module``
  call per projection), an MoE layer its routing and experts without the statistics its
  ``forward`` keeps for training (auxiliary losses, expert load: nothing reads them while
  decoding); any other module -- a LoRA-wrapped projection -- is called as it is, so it computes
  what it computes in ``forward``.

It applies where that equality holds by construction: a :class:`CausalLM` with its own decoder
layers and attention, no forward hooks, and plain tensors as parameters. A model behind the
``transformers`` adapter, or one whose modules carry hooks (e.g. a sharding strategy's), decodes
through ``forward`` as before (:func:`decode_step` returns ``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_api

from harness.models.llama import (
    Attention,
    CausalLM,
    DecoderLayer,
    KVCache,
    RMSNorm,
    SwiGLU,
    apply_rope,
    rms_norm,
    rope_cos_sin,
)
from harness.models.moe import MoEFeedForward

Op = Callable[[torch.Tensor], torch.Tensor]


def _op(m: nn.Module) -> Op:
    """What ``m(x)`` computes, without the ``nn.Module`` call where ``m`` is exactly one of the
    plain modules (``nn.Linear``, ``nn.Embedding`` without ``max_norm``, :class:`RMSNorm`,
    :class:`MoEFeedForward`: its output only); any other module (a LoRA-wrapped projection) is
    called as it is."""
    if type(m) is nn.Linear:
        return partial(F.linear, weight=m.weight, bias=m.bias)
    if type(m) is nn.Embedding and m.max_norm is None:
        return partial(F.embedding, weight=m.weight)
    if type(m) is RMSNorm:
        return partial(rms_norm, weight=m.weight, eps=m.eps)
    if type(m) is MoEFeedForward:
        return partial(_moe_mix, m)
    return m


def _moe_mix(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """An MoE layer's output for x [B, T, D] (:meth:`MoEFeedForward.mix`), without the auxiliary
    losses and expert load its ``forward`` keeps: nothing reads them while decoding."""
    return moe.mix(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's operations: its norms, the attention's projections and its MLP (the
    three projections of a :class:`SwiGLU`, or the whole MLP module, e.g. an MoE layer)."""

    norm1: Op
    q: Op
    k: Op
    v: Op
    o: Op
    norm2: Op
    mlp: tuple[Op, Op, Op] | Op

    @staticmethod
    def of(layer: DecoderLayer) -> _Layer:
        a, mlp = layer.self_attn, layer.mlp
        return _Layer(
            norm1=_op(layer.input_layernorm), q=_op(a.q_proj), k=_op(a.k_proj), v=_op(a.v_proj),
            o=_op(a.o_proj), norm2=_op(layer.post_attention_layernorm),
            mlp=((_op(mlp.gate_proj), _op(mlp.up_proj), _op(mlp.down_proj))
                 if type(mlp) is SwiGLU else _op(mlp)))


def fast_path_ok(model: nn.Module) -> bool:
    """Whether :class:`DecodeStep` computes exactly what ``model.forward`` does: the harness's
    :class:`CausalLM` with its own decoder layers and attention, no forward hooks, and plain
    tensors as parameters (a sharding strategy's DTensors and hooks are left to ``forward``)."""
    if not isinstance(model, CausalLM):
        return False
    # hooks registered for every module (``register_module_forward_hook``) count as well
    if getattr(module_api, "_global_forward_hooks", None) or getattr(
            module_api, "_global_forward_pre_hooks", None):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    if any(type(p.data) is not torch.Tensor for p in model.parameters()):
        return False
    return all(type(layer) is DecoderLayer and type(layer.self_attn) is Attention
               for layer in model.model.layers)


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
        self.cache, self.b = cache, b
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        mask = prompt_mask.long()
        self.next_pos = mask.sum(-1)  # [B]: position of the first new token
        self.fed = 0
        self.max_steps = max_steps
        # the key mask over the prompt and every new token; None: no padding, plain attention
        self.keys = None if bool(mask.all()) else torch.cat(
            (mask.bool(), mask.new_ones(b, max_steps, dtype=torch.bool)), dim=1)[:, None, None, :]
        # the rotary values of every step's positions, [max_steps, B, 1, hd]: gathered from a
        # table over the positions reached, the same values rope_cos_sin gives each position
        reach = int(self.next_pos.max()) + max_steps if b else max_steps
        positions = torch.arange(reach, device=prompt_mask.device)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32,
                                cfg.rope_scaling)
        steps = self.next_pos[None] + torch.arange(max_steps, device=prompt_mask.device)[:, None]
        self.cos = F.embedding(steps, cos[0])[:, :, None]
        self.sin = F.embedding(steps, sin[0])[:, :, None]
        self.embed = _op(model.model.embed_tokens)
        self.final_norm = _op(model.model.norm)
        self.head = _op(model.lm_head)
        self.layers = [_Layer.of(layer) for layer in model.model.layers]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the last sampled ones) -> logits [B, V] at the position after them."""
        if self.fed >= self.max_steps:
            raise RuntimeError(f"DecodeStep: built for {self.max_steps} tokens, fed one more")
        b, h, kv, hd = self.b, self.n_heads, self.n_kv, self.hd
        x = self.embed(tokens[:, None])  # [B, 1, D]
        cos = self.cos[self.fed].to(x.dtype)  # [B, 1, hd]
        sin = self.sin[self.fed].to(x.dtype)
        end = self.cache.length + 1
        mask = None if self.keys is None else self.keys[..., :end]
        for i, w in enumerate(self.layers):
            hn = w.norm1(x)
            q = w.q(hn).view(b, 1, h, hd).transpose(1, 2)
            k = w.k(hn).view(b, 1, kv, hd).transpose(1, 2)
            v = w.v(hn).view(b, 1, kv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = self.cache.update(i, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != h)
            x = x + w.o(y.transpose(1, 2).reshape(b, 1, -1))
            hn = w.norm2(x)
            if isinstance(w.mlp, tuple):
                gate, up, down = w.mlp
                x = x + down(F.silu(gate(hn)) * up(hn))
            else:
                x = x + w.mlp(hn)
        self.cache.length = end
        self.fed += 1
        return self.head(self.final_norm(x))[:, -1]


def decode_step(model: nn.Module, prompt_mask: torch.Tensor, cache: object,
                max_steps: int) -> DecodeStep | None:
    """A :class:`DecodeStep` for ``model`` after its prefill, or ``None`` where decoding must
    go through ``model.forward`` (:func:`fast_path_ok`)."""
    if not isinstance(cache, KVCache) or not fast_path_ok(model):
        return None
    assert isinstance(model, CausalLM)
    return DecodeStep(model, prompt_mask, cache, max_steps)
