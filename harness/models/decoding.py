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

On a GPU, :class:`GraphedDecodeStep` runs the same operations at fixed shapes and replays them as
one CUDA graph per token: its attention (and an MoE layer's sum over experts) rounds differently
in the last bits, which :func:`~harness.models.generation.generate`'s ``cuda_graph`` switches.
"""

from __future__ import annotations

import dataclasses
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


def _moe_mix_dense(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """:func:`_moe_mix` with every expert on every token (:meth:`MoEFeedForward.mix_dense`):
    fixed shapes, no host round trip, for a CUDA graph."""
    return moe.mix_dense(x.reshape(-1, x.shape[-1])).reshape(x.shape)


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
        end = self.cache.length + 1
        mask = None if self.keys is None else self.keys[..., :end]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = self.cache.update(i, k, v)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  enable_gqa=self.n_kv != self.n_heads)

        logits = self._run(tokens, self.cos[self.fed], self.sin[self.fed], attend)
        self.cache.length = end
        self.fed += 1
        return logits

    def _run(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
             ) -> torch.Tensor:
        """The forward's operations for tokens [B] at rotary values cos, sin [B, 1, hd];
        ``attend(layer, q [B, H, 1, hd], k, v [B, KV, 1, hd])`` caches k, v and returns the
        attention output [B, H, 1, hd]. -> logits [B, V]."""
        b, h, kv, hd = self.b, self.n_heads, self.n_kv, self.hd
        x = self.embed(tokens[:, None])  # [B, 1, D]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, w in enumerate(self.layers):
            hn = w.norm1(x)
            q = w.q(hn).view(b, 1, h, hd).transpose(1, 2)
            k = w.k(hn).view(b, 1, kv, hd).transpose(1, 2)
            v = w.v(hn).view(b, 1, kv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = attend(i, q, k, v)
            x = x + w.o(y.transpose(1, 2).reshape(b, 1, -1))
            hn = w.norm2(x)
            if isinstance(w.mlp, tuple):
                gate, up, down = w.mlp
                x = x + down(F.silu(gate(hn)) * up(hn))
            else:
                x = x + w.mlp(hn)
        return self.head(self.final_norm(x))[:, -1]


class GraphedDecodeStep(DecodeStep):
    """A :class:`DecodeStep` at fixed shapes, captured once as a CUDA graph and replayed per token.

    Each token of an eager step is some fifteen kernel launches per layer, each a few
    microseconds of host work for a few microseconds of GPU work at the sizes this harness
    trains: the GPU waits on the host. A graph replays the whole step in one launch. What a
    graph needs, shapes and addresses that stay fixed from token to token, changes three things:

    * each step writes its keys and values to slot ``P + t`` of the cache's buffers with
      ``index_copy_`` at a step counter that lives on the device (not a Python slice);
    * it attends over all ``P + max_steps`` slots under a key mask that admits the prompt's real
      tokens and the slots written so far. The slots not yet written are zeroed once: their
      weights are exactly 0, but ``0 x NaN`` from uninitialised memory would still be NaN;
    * an MoE layer runs every expert on every token (:meth:`MoEFeedForward.mix_dense`): its
      sparse dispatch reads the experts' token counts on the host, which a graph cannot replay.

    Rounding: the attention's reductions run over ``P + max_steps`` keys instead of
    ``P + t + 1`` (the extra weights are 0, the summation order is another), and an MoE layer
    sums its experts in another order, so the logits can differ from the forward's in the last
    bits (``tests/test_decoding.py``; results/FINDINGS.md, "The sampler and the steps on a GPU").
    The graph is captured at the first token of each ``generate`` call, after a warm-up run on a
    side stream, under the caller's autocast (weight-cast caching off, which capture does not
    support); it reads the parameters in place, so it is valid for that call's weights.
    ``step(tokens)`` returns the graph's static logits buffer: read it before the next step.
    Off a GPU (tests) the same fixed-shape step runs eagerly.
    """

    def __init__(self, model: CausalLM, prompt_mask: torch.Tensor, cache: KVCache,
                 max_steps: int) -> None:
        super().__init__(model, prompt_mask, cache, max_steps)
        b, p = prompt_mask.shape
        device = prompt_mask.device
        self.p, self.span = p, p + max_steps
        if any(k is None or k.shape[2] < self.span for k in cache.k):
            raise ValueError(f"the cache's buffers hold fewer than the {self.span} positions "
                             "(prompt + max_steps) a graphed step writes")
        # an MoE layer's dispatch reads its experts' token counts on the host: run every expert
        self.layers = [dataclasses.replace(w, mlp=partial(_moe_mix_dense, layer.mlp))
                       if type(layer.mlp) is MoEFeedForward else w
                       for w, layer in zip(self.layers, model.model.layers, strict=True)]
        self.k_buf = [k[:, :, :self.span] for k in cache.k]  # type: ignore[index]
        self.v_buf = [v[:, :, :self.span] for v in cache.v]  # type: ignore[index]
        for k, v in zip(self.k_buf, self.v_buf, strict=True):
            k[:, :, p:].zero_()
            v[:, :, p:].zero_()
        # the key-padding mask over the whole span (DecodeStep's; all-true when nothing is padded)
        self.real_keys = (self.keys if self.keys is not None else
                          torch.ones(b, 1, 1, self.span, dtype=torch.bool, device=device))
        self.slots = torch.arange(self.span, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # the step counter
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _static_step(self) -> torch.Tensor:
        """One step from ``self.tokens`` at step ``self.t``, with fixed shapes -> logits [B, V]."""
        slot = self.t + self.p  # [1]
        mask = self.real_keys & (self.slots <= slot)  # [B, 1, 1, P + max_steps]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_buf, v_buf = self.k_buf[i], self.v_buf[i]
            k_buf.index_copy_(2, slot, k.to(k_buf.dtype))
            v_buf.index_copy_(2, slot, v.to(v_buf.dtype))
            return F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask,
                                                  enable_gqa=self.n_kv != self.n_heads)

        return self._run(self.tokens, self.cos.index_select(0, self.t)[0],
                         self.sin.index_select(0, self.t)[0], attend)

    def _capture(self) -> None:
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype, autocast, cache_enabled=False):
            self._static_step()  # warm-up (kernels chosen, workspaces allocated): writes slot P + t
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: another thread's CUDA calls (a data loader's) do not break it
        with (torch.cuda.graph(graph, capture_error_mode="thread_local"),
              torch.autocast("cuda", dtype, autocast, cache_enabled=False)):
            self.logits = self._static_step()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] (the graph's output buffer, overwritten by the next step)."""
        if self.fed >= self.max_steps:
            raise RuntimeError(f"DecodeStep: built for {self.max_steps} tokens, fed one more")
        self.tokens.copy_(tokens)
        self.t.fill_(self.fed)
        if not self.tokens.is_cuda:  # the same fixed-shape step, eagerly (CPU tests)
            self.logits = self._static_step()
        else:
            if self.graph is None:
                self._capture()
            assert self.graph is not None
            self.graph.replay()
        assert self.logits is not None
        self.fed += 1
        self.cache.length = self.p + self.fed
        return self.logits


def graph_ok(model: CausalLM, prompt_mask: torch.Tensor) -> bool:
    """Whether a :class:`GraphedDecodeStep` can run: on a CUDA device, with every layer's MLP a
    :class:`SwiGLU` or an :class:`MoEFeedForward` (run densely over its experts)."""
    return prompt_mask.is_cuda and all(type(layer.mlp) in (SwiGLU, MoEFeedForward)
                                       for layer in model.model.layers)


def decode_step(model: nn.Module, prompt_mask: torch.Tensor, cache: object,
                max_steps: int, cuda_graph: bool = False) -> DecodeStep | None:
    """A :class:`DecodeStep` for ``model`` after its prefill, or ``None`` where decoding must
    go through ``model.forward`` (:func:`fast_path_ok`); with ``cuda_graph``, a
    :class:`GraphedDecodeStep` where :func:`graph_ok`."""
    if not isinstance(cache, KVCache) or not fast_path_ok(model):
        return None
    assert isinstance(model, CausalLM)
    if cuda_graph and graph_ok(model, prompt_mask):
        return GraphedDecodeStep(model, prompt_mask, cache, max_steps)
    return DecodeStep(model, prompt_mask, cache, max_steps)
