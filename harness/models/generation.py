"""Batched sampling with a KV cache for left-padded prompts of different lengths.

One prefill forward over the prompts, then one single-token step per new token that reuses the
cached keys and values (a :class:`~harness.models.llama.KVCache` preallocated for prompt + new
tokens, written in place: no per-step copy of the cache); for the harness's own model that step is
a :class:`~harness.models.decoding.DecodeStep` (the forward's operations with its per-call
constants prepared once: the same logits bit for bit), on a GPU its
:class:`~harness.models.decoding.GraphedDecodeStep` (a CUDA graph captured once per call and
replayed per token), otherwise the model's ``forward``.
Greedy, or temperature / top-k / top-p (nucleus) sampling; a row stops at EOS and is padded
afterwards; the loop ends when every row has stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.models.decoding import decode_step
from harness.models.llama import CausalLM


@dataclass
class Generation:
    """sequences [B, P + N] (prompt then response); response [B, N]; response_mask [B, N] (1 up to
    and including EOS); logprobs [B, N] of the sampled tokens under softmax(logits / temperature),
    the distribution sampled from before top-k/top-p filtering (0 where masked)."""

    sequences: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p. [B, V] -> [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability exceeds
    ``u_i`` times the row's total. probs [B, V] (rows need not be normalised; filtered tokens have
    0 and are never taken), u [B] uniforms in [0, 1) -> token ids [B].

    The same law as ``torch.multinomial(probs, 1)``, but the draw is a function of the row's own
    uniform: a row samples the same token wherever it sits in a batch, which is what lets DDP
    ranks reproduce a one-process run (:func:`generate`'s ``noise``).
    """
    cdf = probs.cumsum(-1)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    # u * total can round up to the total: take the last token with mass instead of running off
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(idx, last)


@torch.no_grad()
def generate(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             max_new_tokens: int, eos_token_id: int, pad_token_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None, cuda_graph: bool = False) -> Generation:
    """Sample continuations of left-padded prompts input_ids [B, P] (attention_mask [B, P]).

    ``noise`` [B, max_new_tokens] of uniforms in [0, 1): new token t of row i is drawn by
    :func:`inverse_cdf_sample` from ``noise[i, t]`` instead of ``torch.multinomial`` from
    ``generator``, so each row's tokens depend on its own noise only (not on the batch around it).
    A ``generator`` on another device than the model (the run's random streams are CPU
    generators, ``harness.util.seeding``, so that they do not depend on where a run computes) gives
    that noise: ``torch.rand(B, max_new_tokens, generator=generator)``, drawn once per call.
    ``cuda_graph``: on a GPU, the harness's own model decodes by replaying one CUDA graph per token
    (:class:`~harness.models.decoding.GraphedDecodeStep`: the attention rounds differently in
    the last bits); ``False`` (the default here) keeps the eager step, the forward's logits bit
    for bit. A run's settings choose it: ``method.rollout.cuda_graph``, ``eval.cuda_graph``.
    """
    if noise is not None and tuple(noise.shape) != (input_ids.shape[0], max_new_tokens):
        raise ValueError(f"noise: shape {tuple(noise.shape)}, expected "
                         f"{(input_ids.shape[0], max_new_tokens)} (rows x max_new_tokens)")
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 for sampling (use greedy=True for argmax)")
    if (noise is None and not greedy and generator is not None
            and generator.device.type != input_ids.device.type):
        # torch.multinomial draws from a generator on the probabilities' own device only
        noise = torch.rand(input_ids.shape[0], max_new_tokens, generator=generator,
                           device=generator.device).to(input_ids.device)
    was_training = model.training
    model.eval()
    b = input_ids.shape[0]
    mask = attention_mask.long()
    cache = model.new_cache(input_ids.shape[1] + max_new_tokens)
    out = model(input_ids, attention_mask=mask, past=cache, use_cache=True, logits_to_keep=1)
    past, logits = out.past, out.logits[:, -1]
    fast = decode_step(model, mask, past, max_new_tokens, cuda_graph=cuda_graph)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    tokens, logps, alive = [], [], []
    for step in range(max_new_tokens):
        scaled = logits.float() / (1.0 if greedy else temperature)
        logp_all = torch.log_softmax(scaled, dim=-1)
        if greedy:
            nxt = scaled.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
            if noise is None:
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = inverse_cdf_sample(probs, noise[:, step])
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        alive.append(~done)
        tokens.append(nxt)
        logps.append(logp_all.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(done, 0.0))
        done = done | (nxt == eos_token_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break  # the last token needs no forward: nothing is sampled after it
        if fast is not None:
            logits = fast(nxt)
            continue
        mask = torch.cat((mask, mask.new_ones(b, 1)), dim=1)
        out = model(nxt[:, None], attention_mask=mask, past=past, use_cache=True)
        past, logits = out.past, out.logits[:, -1]
    model.train(was_training)
    response = torch.stack(tokens, dim=1)
    return Generation(
        sequences=torch.cat((input_ids, response), dim=1),
        response=response,
        response_mask=torch.stack(alive, dim=1).long(),
        logprobs=torch.stack(logps, dim=1),
    )
