"""Rollouts for the on-policy methods (PPO, GRPO): sample, score, and keep what the update needs.

A rollout is generated once with the KV-cached sampler; the sampler's own log-probabilities are the
``old`` log-probabilities of the importance ratio (nothing is recomputed), and the reference's
log-probabilities are computed without gradients on the same batch, in the same shapes.

Sequences are ``[left-padded prompt | response (right-padded after EOS)]``: [B, P + N].
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from harness.config import RolloutConfig
from harness.data.collate import encode_prompts
from harness.methods.losses import entropy_from_logits, token_logprobs
from harness.models.generation import generate
from harness.models.llama import CausalLM


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update reads.

    input_ids / attention_mask: [B, P + N]; prompt_len: P; response / mask / old_logp /
    ref_logp: [B, N]; scores: [B] sequence-level rewards; texts for logging; gen_s: seconds the
    sampler took (the stage's generation throughput).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    scores: torch.Tensor
    prompts: list[str]
    responses: list[str]
    gen_s: float = 0.0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def last_index(self) -> torch.Tensor:
        """Index [B] of each sequence's last real token (the EOS, or the last sampled token)."""
        return self.prompt_len + self.mask.sum(-1).long() - 1


def response_logprobs(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: int, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """log pi(a_t | s_t) of the response tokens under ``softmax(logits / temperature)``.

    Returns (logp [B, N], entropy [B, N] or None, MoE auxiliary loss). Position P - 1 + t of the
    full sequence predicts response token t. ``entropy_grad=False`` computes the entropy without
    autograd (for logging only, as in GRPO; PPO's entropy bonus needs the gradient).
    """
    out = model(input_ids, attention_mask=attention_mask)
    logits = out.logits[:, prompt_len - 1:-1].float() / temperature
    response = input_ids[:, prompt_len:]
    mask = attention_mask[:, prompt_len:]
    logp = token_logprobs(logits, response, mask)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logp, ent, out.aux_loss


def decode_responses(tokenizer, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Token ids [B, N] -> strings, without EOS and padding."""
    texts = []
    for row, m in zip(response.tolist(), mask.tolist(), strict=True):
        toks = [t for t, keep in zip(row, m, strict=True) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


@torch.no_grad()
def make_rollout(policy: CausalLM, reference: CausalLM, tokenizer, prompts: Sequence[str],
                 cfg: RolloutConfig, max_len: int,
                 score_fn: Callable[[list[str], list[str], torch.Tensor, torch.Tensor, int],
                                    torch.Tensor],
                 generator: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups), then score and reference them.

    ``score_fn(prompts, responses, input_ids, attention_mask, prompt_len) -> [B]`` gives the
    sequence reward (the task's gold reward, or a reward model's score).
    """
    device = next(policy.parameters()).device
    ids, pmask = encode_prompts(tokenizer, prompts, max_len - cfg.max_new_tokens)
    ids, pmask = ids.to(device), pmask.to(device)
    t0 = time.perf_counter()
    gen = generate(policy, ids, pmask, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                   top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    mask = gen.response_mask
    if mask.is_cuda:
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    attn = torch.cat((pmask, mask), dim=1)
    p = ids.shape[1]
    ref_logp, _, _ = response_logprobs(reference, gen.sequences, attn, p, cfg.temperature)
    responses = decode_responses(tokenizer, gen.response, mask)
    scores = score_fn(list(prompts), responses, gen.sequences, attn, p).to(device).float()
    return Rollout(input_ids=gen.sequences, attention_mask=attn, prompt_len=p,
                   response=gen.response, mask=mask.float(), old_logp=gen.logprobs,
                   ref_logp=ref_logp, scores=scores, prompts=list(prompts), responses=responses,
                   gen_s=gen_s)


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random partition of range(n) into index tensors of at most ``size``."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + size] for i in range(0, n, size)]
