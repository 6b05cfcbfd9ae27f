"""A group's completions scored in one packed row with their shared prompt (GRPO and RLOO's
``share_prompt``).

A group method samples G completions of every prompt, so a rollout batch of B = (B / G) x G rows
``[left-padded prompt (P) | response (N)]`` runs every prompt G times through the reference pass
and the policy's forward and backward. Packed, one row per group holds the prompt once and its G
responses after it::

    [prompt (P) | response 1 (N) | response 2 (N) | ... | response G (N)]      # B / G rows

Each response's tokens take the positions they have in their own row (the prompt's real length +
t) and attend to the prompt's real tokens and to their own response's earlier real tokens only, so
every response token sees exactly what it sees in the row layout: the same log-probabilities to
rounding, from (P + G N) / (G (P + N)) of the token work. The price is attention over rows of
length P + G N (quadratic in it), small beside the matrix products while G N stays in the hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.methods.losses import response_scores
from harness.models.llama import CausalLM


@dataclass
class PackedGroups:
    """B / G packed rows of a rollout batch's groups (:func:`pack_groups`).

    ids, positions: [B / G, P + G N]; mask: [B / G, 1, L, L] boolean, True = may attend;
    ``at`` [B, N]: the packed column whose hidden state predicts each response token (row r of the
    batch is response r mod G of packed row r // G); ``first_at``: P - 1, the earliest such column.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    at: torch.Tensor
    first_at: int


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                group_size: int) -> PackedGroups:
    """Pack consecutive groups of ``group_size`` rows that share a prompt, one row per group.

    input_ids, attention_mask: [B, P + N] (left-padded prompts, right-padded responses; a group's
    G rows have the same prompt columns, as a group rollout makes them); ``prompt_len``: P.
    Positions count the prompt's real tokens, as :func:`~harness.models.llama.positions_from_mask`
    does for a row; a response's pad tokens (after its EOS) are never attended to, and every
    column attends at least to itself, so no softmax row is empty.
    """
    b, width = input_ids.shape
    g, p = group_size, prompt_len
    n = width - p
    if b % g:
        raise ValueError(f"{b} rows do not split into groups of {g}")
    k = b // g
    device = input_ids.device
    prompt_ids = input_ids[::g, :p]                                     # [K, P]
    prompt_mask = attention_mask[::g, :p].bool()                        # [K, P]
    resp_ids = input_ids[:, p:].reshape(k, g * n)                       # [K, G N]
    resp_mask = attention_mask[:, p:].bool().reshape(k, g * n)
    ids = torch.cat((prompt_ids, resp_ids), dim=1)                      # [K, L]
    prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)       # [K, P]
    real_len = prompt_mask.sum(-1, keepdim=True)                        # [K, 1]
    t = torch.arange(n, device=device).repeat(g)[None, :]              # [1, G N]: t in response
    positions = torch.cat((prompt_pos, real_len + t), dim=1)
    # which response each column belongs to (-1: the prompt), and its key validity
    owner = torch.cat((torch.full((p,), -1, device=device),
                       torch.arange(g, device=device).repeat_interleave(n)))       # [L]
    col = torch.arange(p + g * n, device=device)
    causal = col[:, None] >= col[None, :]                                           # [L, L]
    same_or_prompt = (owner[None, :] == -1) | (owner[:, None] == owner[None, :])    # [L, L]
    keys = torch.cat((prompt_mask, resp_mask), dim=1)                               # [K, L]
    mask = (causal & same_or_prompt)[None] & keys[:, None, :]
    mask = mask | torch.eye(p + g * n, dtype=torch.bool, device=device)[None]
    # response j's token 0 is predicted from the prompt's last column, token t from the one before
    j = torch.arange(g, device=device)[:, None]
    tt = torch.arange(n, device=device)[None, :]
    at_group = torch.where(tt == 0, p - 1, p + j * n + tt - 1)                     # [G, N]
    return PackedGroups(ids, positions, mask[:, None], at_group.repeat(k, 1), p - 1)


def packed_response_logprobs(model: CausalLM, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, prompt_len: int, group_size: int,
                             temperature: float = 1.0, with_entropy: bool = False,
                             entropy_grad: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`~harness.methods.rollout.response_logprobs` with each group's prompt run once
    (:func:`pack_groups`): (logp [B, N], entropy [B, N] or None, MoE auxiliary loss), rows in the
    batch's order. The LM head runs from the prompt's last column on (``logits_to_keep``), with
    or without autograd. An MoE model's auxiliary loss and expert load are taken over the packed
    tokens (each prompt token once, not G times).
    """
    packed = pack_groups(input_ids, attention_mask, prompt_len, group_size)
    width = packed.ids.shape[1]
    start = packed.first_at
    out = model(packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                logits_to_keep=width - start)
    k, vocab = out.logits.shape[0], out.logits.shape[-1]
    n = input_ids.shape[1] - prompt_len
    at = (packed.at - start).reshape(k, group_size * n)                 # [K, G N]
    picked = out.logits.gather(1, at[..., None].expand(-1, -1, vocab))  # [K, G N, V]
    logp, ent = response_scores(picked.reshape(k * group_size, n, vocab), input_ids[:, prompt_len:],
                                attention_mask[:, prompt_len:], temperature, with_entropy,
                                entropy_grad)
    return logp, ent, out.aux_loss


def group_minibatches(n: int, group_size: int, size: int,
                      generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random partition of range(n) into minibatches of whole groups (``size`` / G groups each,
    a group's rows consecutive and in order), for the packed layout.

    Draws the same ``torch.randperm(n)`` as :func:`~harness.methods.rollout.minibatches`, so the
    generator's stream (the next rollout's sampling) is the same with and without packing; groups
    are taken in the order their first row appears in that permutation. With one minibatch per
    rollout (the default) both hold the same rows, in another order.
    """
    perm = torch.randperm(n, generator=generator)
    first = torch.full((n // group_size,), n, dtype=torch.long)
    first.scatter_reduce_(0, perm // group_size, torch.arange(n), reduce="amin")
    groups = first.argsort()
    rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    per = size // group_size * group_size
    return [rows[i:i + per] for i in range(0, n, per)]
