"""Drift from the reference: a Monte Carlo estimate of KL(pi || pi_ref) on held-out prompts.

    KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

estimated by sampling one response per prompt from pi at temperature 1 and averaging the summed
log-ratio over prompts (the sequence-level KL the DPO paper plots rewards against).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.data.collate import encode_prompts
from harness.methods.rollout import response_logprobs
from harness.models.generation import generate
from harness.models.llama import CausalLM


@torch.no_grad()
def sequence_kl(policy: CausalLM, reference: CausalLM, tokenizer, prompts: Sequence[str],
                max_new_tokens: int, batch_size: int, max_len: int, seed: int = 0) -> float:
    """Mean over prompts of the summed per-token log-ratio of responses sampled from ``policy``."""
    gen_rng = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    total, n = 0.0, 0
    policy.eval()
    reference.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, pmask = encode_prompts(tokenizer, chunk, max_len - max_new_tokens)
        ids, pmask = ids.to(device), pmask.to(device)
        gen = generate(policy, ids, pmask, max_new_tokens, tokenizer.eos_token_id,
                       tokenizer.pad_token_id, temperature=1.0, generator=gen_rng)
        attn = torch.cat((pmask, gen.response_mask), dim=1)
        ref_logp, _, _ = response_logprobs(reference, gen.sequences, attn, ids.shape[1])
        total += float(((gen.logprobs - ref_logp) * gen.response_mask).sum())
        n += len(chunk)
    return total / max(n, 1)
