"""Held-out preference accuracy: evaluation for data that has pairs but no gold reward.

For a pair (x, y_w, y_l) a model *prefers the chosen response* when it gives it more likelihood,
``log pi(y_w | x) > log pi(y_l | x)`` (summed over the response tokens; strict, so a tie counts as
wrong). ``eval/pref_accuracy`` is the share of held-out pairs a policy gets right, the same
definition as the lm-eval ``harness_<task>_pref`` task uses; ``eval/ref_pref_accuracy`` is the SFT
reference's. ``eval/reward_accuracy`` ranks by the implicit reward of the DPO paper instead,
``log pi(y|x) / pi_ref(y|x)`` (the beta-free margin ``[log pi/pi_ref](y_w) - [log pi/pi_ref](y_l)
> 0``), which is what DPO's ``train/rewards_acc`` measures on training pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from harness.data.collate import PairCollator, encode_pair
from harness.methods.dpo import pair_logps
from harness.models.llama import CausalLM


@torch.no_grad()
def pair_logps_table(model: CausalLM, tokenizer, prompts: Sequence[str], chosen: Sequence[str],
                     rejected: Sequence[str], batch_size: int, max_len: int) -> torch.Tensor:
    """Summed response log-probs [N, 2] (chosen, rejected) of ``N`` pairs, in batches.

    Pairs longer than ``max_len`` are truncated as in training (``encode_pair``).
    """
    model.eval()
    rows = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        enc = encode_pair(tokenizer, p, c, r, max_len, overflow="truncate")
        if enc is None:
            raise ValueError(f"preference pair {i} cannot be encoded within max_len={max_len}")
        rows.append({**enc, "index": i})
    collate = PairCollator(pad_id=tokenizer.pad_token_id)
    device = model.device
    out = torch.empty(len(rows), 2)
    for start in tqdm(range(0, len(rows), batch_size), desc="pair log-probs", leave=False):
        batch = collate(rows[start:start + batch_size])
        c, r, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
        out[batch["index"], 0] = c.float().cpu()
        out[batch["index"], 1] = r.float().cpu()
    return out


def prefers_chosen(logps: torch.Tensor) -> list[float]:
    """Per pair 1.0 when the chosen response has strictly more log-likelihood, else 0.0.

    logps: [N, 2] (chosen, rejected) summed log-probs.
    """
    return (logps[:, 0] > logps[:, 1]).float().tolist()


def implicit_reward_correct(policy: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per pair 1.0 when the implicit-reward margin (log-ratio of chosen minus rejected) is > 0.

    policy, reference: [N, 2] summed log-probs (chosen, rejected) under each model.
    """
    ratio = policy - reference
    return (ratio[:, 0] > ratio[:, 1]).float().tolist()
