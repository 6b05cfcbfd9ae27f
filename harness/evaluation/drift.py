"""Drift from the reference: a Monte Carlo estimate of KL(pi || pi_ref) on held-out prompts.

    KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

estimated by sampling one response per prompt from pi at temperature 1 and averaging the summed
log-ratio over prompts (the sequence-level KL the DPO paper plots rewards against).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.methods.rollout import sample_with_reference
from harness.models.llama import CausalLM


@torch.no_grad()
def sequence_kl(policy: CausalLM, reference: CausalLM, tokenizer, prompts: Sequence[str],
                max_new_tokens: int, batch_size: int, max_len: int, seed: int = 0,
                cuda_graph: bool = False) -> float:
    """Mean over prompts of the summed per-token log-ratio of responses sampled from ``policy``
    (``cuda_graph``: :func:`~harness.models.generation.generate`'s, ``eval.cuda_graph`` in a run)."""
    gen_rng = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    policy.eval()
    reference.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        s = sample_with_reference(policy, reference, tokenizer, chunk, max_new_tokens, max_len,
                                  temperature=1.0, generator=gen_rng, cuda_graph=cuda_graph)
        total += float(((s.gen.logprobs - s.ref_logp) * s.gen.response_mask).sum())
        n += len(chunk)
    return total / max(n, 1)
