"""Rollouts for the on-policy methods (PPO, GRPO): sample, score, and keep what the update needs.

A rollout is generated once with the KV-cached sampler; the sampler's own log-probabilities are the
``old`` log-probabilities of the importance ratio (nothing is recomputed), and the reference's
log-probabilities are computed without gradients on the same batch, in the same shapes.

Sequences are ``[left-padded prompt | response (right-padded after EOS)]``: [B, P + N].
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from harness.config import RolloutConfig
from harness.data.collate import decode_responses, encode_prompts
from harness.methods.group_packing import packed_response_logprobs
from harness.methods.losses import response_scores
from harness.models.generation import generate
from harness.models.llama import CausalLM


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update reads.

    input_ids / attention_mask: [B, P + N]; prompt_len: P; response / mask / old_logp /
    ref_logp: [B, N] (ref_logp None when no reference pass ran: a KL coefficient of 0);
    scores: [B] sequence-level rewards; texts for logging; gen_s: seconds the sampler took (the
    stage's generation throughput).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    scores: torch.Tensor
    prompts: list[str]
    responses: list[str]
    gen_s: float = 0.0

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def response_logprobs(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: int, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """log pi(a_t | s_t) of the response tokens under ``softmax(logits / temperature)``.

    Returns (logp [B, N], entropy [B, N] or None, MoE auxiliary loss). Position P - 1 + t of the
    full sequence predicts response token t. ``entropy_grad=False`` computes the entropy without
    autograd (for logging only, as in GRPO; PPO's entropy bonus needs the gradient).

    Without autograd (the reference's and the evaluation's passes) the LM head runs on the N + 1
    last positions only (:meth:`~harness.models.llama.CausalLM.forward`'s ``logits_to_keep``):
    the same logits up to rounding (a matmul over fewer rows may take another kernel; on the
    harness's presets every run metric came out unchanged). With autograd it runs on every
    position, so the head's weight gradient sums over the same rows in the same order as ever.
    """
    n = input_ids.shape[1] - prompt_len
    keep = 0 if torch.is_grad_enabled() else n + 1
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=keep)
    logp, ent = response_scores(out.logits[:, -(n + 1):-1], input_ids[:, prompt_len:],
                                attention_mask[:, prompt_len:], temperature, with_entropy,
                                entropy_grad)
    return logp, ent, out.aux_loss


@dataclass
class Sampled:
    """Responses sampled from a policy and scored by the reference, in the rollout's shapes:
    ``gen`` (:class:`~harness.models.generation.Generation`), ``attention_mask`` [B, P + N],
    ``prompt_len`` P, ``ref_logp`` [B, N] (None without a reference) and ``gen_s`` (seconds the
    sampler took)."""

    gen: Any
    attention_mask: torch.Tensor
    prompt_len: int
    ref_logp: torch.Tensor | None
    gen_s: float


Region = Callable[[str], AbstractContextManager]
"""A phase marker: ``region(name)`` opens the phase ``name`` of the step
(:meth:`harness.methods.base.AlignmentModule.region`); ``contextlib.nullcontext`` marks nothing."""


@torch.no_grad()
def sample_with_reference(policy: CausalLM, reference: CausalLM | None, tokenizer,
                          prompts: Sequence[str],
                          max_new_tokens: int, max_len: int, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 1.0,
                          generator: torch.Generator | None = None,
                          noise: torch.Tensor | None = None, packed_group: int = 0,
                          cuda_graph: bool = False,
                          region: Region = contextlib.nullcontext) -> Sampled:
    """Sample one response per prompt from ``policy`` (KV-cached sampler), then the reference's
    log-probabilities of the same tokens (one forward, no gradients): what a rollout and the KL
    estimate both need. ``reference=None`` skips the reference pass (``ref_logp`` None);
    ``noise`` [B, max_new_tokens]: per-row sampling noise (:func:`~harness.models.generation.generate`).
    ``packed_group`` G > 0: consecutive groups of G rows share a prompt, and the reference scores
    each group in one packed row (:func:`~harness.methods.group_packing.packed_response_logprobs`).
    ``cuda_graph``: :func:`~harness.models.generation.generate`'s (a GPU's graphed decode step);
    ``region``: marks the phases ``sample`` and ``reference`` (:mod:`harness.util.step_profile`).
    """
    device = policy.device
    ids, pmask = encode_prompts(tokenizer, prompts, max_len - max_new_tokens)
    ids, pmask = ids.to(device), pmask.to(device)
    with region("sample"):
        t0 = time.perf_counter()
        gen = generate(policy, ids, pmask, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=generator,
                       noise=None if noise is None else noise.to(device), cuda_graph=cuda_graph)
        if gen.response_mask.is_cuda:
            torch.cuda.synchronize()
        gen_s = time.perf_counter() - t0
    attn = torch.cat((pmask, gen.response_mask), dim=1)
    p = ids.shape[1]
    ref_logp = None
    with region("reference"):
        if reference is not None and packed_group:
            ref_logp, _, _ = packed_response_logprobs(reference, gen.sequences, attn, p,
                                                      packed_group, temperature)
        elif reference is not None:
            ref_logp, _, _ = response_logprobs(reference, gen.sequences, attn, p, temperature)
    return Sampled(gen, attn, p, ref_logp, gen_s)


@torch.no_grad()
def make_rollout(policy: CausalLM, reference: CausalLM | None, tokenizer, prompts: Sequence[str],
                 cfg: RolloutConfig, max_len: int,
                 score_fn: Callable[[list[str], list[str], torch.Tensor, torch.Tensor, int],
                                    torch.Tensor],
                 generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, packed_group: int = 0,
                 region: Region = contextlib.nullcontext) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups), then score and reference them.

    ``score_fn(prompts, responses, input_ids, attention_mask, prompt_len) -> [B]`` gives the
    sequence reward (the task's gold reward, or a reward model's score). ``reference=None``: no
    reference pass (a method whose KL coefficient is 0 reads no reference log-probs). ``noise``
    [B, max_new_tokens]: each row's sampling noise instead of ``generator``'s multinomial draws.
    ``packed_group`` G > 0: the reference pass packs each group of G rows with its prompt once.
    ``region``: marks the phases ``sample``, ``reference`` and ``reward``
    (:mod:`harness.util.step_profile`).
    """
    s = sample_with_reference(policy, reference, tokenizer, prompts, cfg.max_new_tokens, max_len,
                              cfg.temperature, cfg.top_k, cfg.top_p, generator, noise,
                              packed_group, cfg.cuda_graph, region)
    gen, attn, p = s.gen, s.attention_mask, s.prompt_len
    with region("reward"):
        responses = decode_responses(tokenizer, gen.response, gen.response_mask)
        scores = score_fn(list(prompts), responses, gen.sequences, attn, p).to(attn.device).float()
    return Rollout(input_ids=gen.sequences, attention_mask=attn, prompt_len=p,
                   response=gen.response, mask=gen.response_mask.float(), old_logp=gen.logprobs,
                   ref_logp=s.ref_logp, scores=scores, prompts=list(prompts), responses=responses,
                   gen_s=s.gen_s)


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random partition of range(n) into index tensors of at most ``size``."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + size] for i in range(0, n, size)]
