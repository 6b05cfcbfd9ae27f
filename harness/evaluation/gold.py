"""Gold-reward evaluation: greedy responses to held-out prompts, scored by the task's gold reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness.data.collate import decode_responses, encode_prompts
from harness.models.generation import generate
from harness.models.llama import CausalLM


@dataclass
class Completions:
    """Prompts, decoded responses and their gold rewards, index-aligned."""

    prompts: list[str]
    responses: list[str]
    rewards: list[float]

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / max(1, len(self.rewards))

    def accuracy(self, best: float) -> float:
        """Share of responses whose gold reward reaches ``best`` (the task's ``gold_max``)."""
        return sum(r >= best for r in self.rewards) / max(1, len(self.rewards))


def complete(model: CausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int, max_len: int, greedy: bool = True, temperature: float = 1.0,
             generator: torch.Generator | None = None, progress: bool = False,
             cuda_graph: bool = False) -> list[str]:
    """Decode responses for ``prompts`` in batches with the KV-cached sampler (``cuda_graph``:
    :func:`~harness.models.generation.generate`'s, ``eval.cuda_graph`` in a run)."""
    device = model.device
    out: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk, max_len - max_new_tokens)
        gen = generate(model, ids.to(device), mask.to(device), max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       greedy=greedy, temperature=temperature, generator=generator,
                       cuda_graph=cuda_graph)
        out += decode_responses(tokenizer, gen.response, gen.response_mask)
    return out


def gold_eval(model: CausalLM, tokenizer, task, prompts: Sequence[str], max_new_tokens: int,
              batch_size: int, max_len: int, progress: bool = True,
              cuda_graph: bool = False) -> Completions:
    """Greedy completions of ``prompts`` and their gold rewards (``eval/gold_reward`` = mean);
    ``cuda_graph``: :func:`complete`'s."""
    responses = complete(model, tokenizer, prompts, max_new_tokens, batch_size, max_len,
                         greedy=True, progress=progress, cuda_graph=cuda_graph)
    return Completions(list(prompts), responses, list(task.rewards(list(prompts), responses)))


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> float:
    """Share of prompts where the policy's response beats the reference's; ties count half."""
    if len(policy_rewards) != len(reference_rewards) or not policy_rewards:
        raise ValueError("win_rate needs two equally long, non-empty reward lists")
    score = sum(1.0 if p > r else 0.5 if p == r else 0.0
                for p, r in zip(policy_rewards, reference_rewards, strict=True))
    return score / len(policy_rewards)
