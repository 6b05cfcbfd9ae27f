"""GRPO / RLOO ``share_prompt``: a group's completions in one packed row with their prompt once."""

from __future__ import annotations

import pytest
import torch

from harness.config import ConfigError
from harness.methods.group_packing import group_minibatches, pack_groups, packed_response_logprobs
from harness.methods.grpo import GRPOConfig
from harness.methods.rollout import minibatches, response_logprobs
from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM


def test_two_groups_pack_with_their_prompt_once_by_hand():
    """Rows [pad | prompt | response]: group 0 has a 2-token prompt (one left pad), group 1 a
    3-token one; row 1's response ends after its EOS (2). Each response keeps its row's positions
    and sees the prompt's real tokens and its own earlier tokens only."""
    ids = torch.tensor([[0, 1, 5, 7, 8], [0, 1, 5, 2, 0],
                        [1, 6, 6, 9, 9], [1, 6, 6, 8, 2]])
    attn = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    packed = pack_groups(ids, attn, prompt_len=3, group_size=2)
    assert packed.ids.tolist() == [[0, 1, 5, 7, 8, 2, 0], [1, 6, 6, 9, 9, 8, 2]]
    assert packed.positions.tolist() == [[0, 0, 1, 2, 3, 2, 3], [0, 1, 2, 3, 4, 3, 4]]
    # row r's token t is predicted from the prompt's last column (t = 0) or the one before it
    assert packed.at.tolist() == [[2, 3], [2, 5], [2, 3], [2, 5]] and packed.first_at == 2
    m = packed.mask[:, 0]
    assert m.shape == (2, 7, 7)
    T, F = True, False
    assert m[0, 0].tolist() == [T, F, F, F, F, F, F]       # a left pad sees itself only
    assert m[0, 4].tolist() == [F, T, T, T, T, F, F]       # response 1, token 1: prompt + its own
    assert m[0, 5].tolist() == [F, T, T, F, F, T, F]       # response 2 starts: not response 1
    assert m[0, 6].tolist() == [F, T, T, F, F, T, T]       # its pad after EOS: itself, no more
    assert m[1, 6].tolist() == [T, T, T, F, F, T, T]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        pack_groups(ids, attn, 3, 3)


def _rollout_like(vocab: int, k: int, g: int, p: int, n: int, seed: int = 0):
    """k groups of g rows: left-padded prompts of different lengths, responses that stop early."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (k * g, p + n), generator=gen)
    attn = torch.ones_like(ids)
    for i in range(k):
        pad = int(torch.randint(0, p - 1, (1,), generator=gen))
        prompt = ids[i * g, :p].clone()
        ids[i * g:(i + 1) * g, :p] = prompt
        attn[i * g:(i + 1) * g, :pad] = 0
        ids[i * g:(i + 1) * g, :pad] = 0
    for r in range(k * g):
        stop = int(torch.randint(1, n + 1, (1,), generator=gen))
        attn[r, p + stop:] = 0
        ids[r, p + stop:] = 0
    return ids, attn


@pytest.mark.parametrize("moe", [False, True])
def test_packed_groups_give_the_row_layouts_log_probs_entropy_and_gradients(moe):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 d_ff=64, max_seq_len=64, n_experts=4 if moe else 0, top_k=2))
    model.eval()  # deterministic routing
    ids, attn = _rollout_like(40, k=3, g=4, p=5, n=6)
    mask = attn[:, 5:].float()
    out = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            logp, ent, _ = packed_response_logprobs(model, ids, attn, 5, 4, temperature=0.7,
                                                    with_entropy=True)
        else:
            logp, ent, _ = response_logprobs(model, ids, attn, 5, temperature=0.7,
                                             with_entropy=True)
        ((logp * mask).sum() + (ent * mask).sum()).backward()
        out.append((logp.detach() * mask, ent.detach() * mask,
                    [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():  # the no-grad (reference) pass keeps the same values
            ref = (packed_response_logprobs(model, ids, attn, 5, 4, 0.7) if packed else
                   response_logprobs(model, ids, attn, 5, 0.7))[0]
        torch.testing.assert_close(ref * mask, logp.detach() * mask, rtol=1e-5, atol=1e-5)
    (lp_rows, ent_rows, g_rows), (lp_packed, ent_packed, g_packed) = out
    assert int(mask.sum()) < mask.numel()                # some responses stopped early
    torch.testing.assert_close(lp_packed, lp_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_packed, ent_rows, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_group_minibatches_hold_whole_groups_and_draw_what_minibatches_draws():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = group_minibatches(24, 4, 8, a)
    plain = minibatches(24, 8, b)
    assert [len(x) for x in batches] == [8, 8, 8]
    assert sorted(torch.cat(batches).tolist()) == list(range(24))
    for x in batches:                                  # two whole groups, rows consecutive
        for i in range(0, 8, 4):
            assert x[i] % 4 == 0 and x[i:i + 4].tolist() == list(range(x[i], x[i] + 4))
    # groups in the order their first row appears in the same permutation
    perm = torch.cat(plain)
    seen = list(dict.fromkeys((perm // 4).tolist()))
    assert (torch.cat(batches)[::4] // 4).tolist() == seen
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))  # same stream
    assert [len(x) for x in group_minibatches(24, 4, 10, a)] == [8, 8, 8]     # whole groups


def test_share_prompt_needs_minibatches_of_whole_groups():
    GRPOConfig(share_prompt=True, group_size=8, minibatch_size=64).check()
    GRPOConfig(share_prompt=False, group_size=8, minibatch_size=12).check()
    with pytest.raises(ConfigError, match=r"method.minibatch_size=12: must be a multiple of "
                                          r"group_size=8 with share_prompt=true"):
        GRPOConfig(share_prompt=True, group_size=8, minibatch_size=12).check()

