"""The backbone: RMSNorm, RoPE, GQA, the KV cache, MoE routing and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from harness.models.architecture import ConfigError, ModelConfig
from harness.models.generation import filter_logits, generate
from harness.models.llama import Attention, CausalLM, RMSNorm, apply_rope, rope_cos_sin
from harness.models.moe import MoEFeedForward, router_z_loss, switch_load_balancing_loss


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_rmsnorm_matches_hand_computation():
    norm = RMSNorm(2, eps=0.0)
    norm.weight.data = torch.tensor([1.0, 2.0])
    x = torch.tensor([[3.0, 4.0]])  # RMS = sqrt((9 + 16) / 2) = sqrt(12.5)
    rms = math.sqrt(12.5)
    torch.testing.assert_close(norm(x), torch.tensor([[3.0 / rms, 8.0 / rms]]))


def test_rmsnorm_eps_and_scale_invariance():
    norm = RMSNorm(4, eps=1e-5)
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(10 * x), norm(x), atol=1e-4, rtol=1e-4)
    assert torch.all(norm(torch.zeros(1, 4)) == 0)  # eps keeps the zero vector finite


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 8
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, 10000.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, 10000.0, torch.float32)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)


def test_rope_position_zero_is_identity_and_norm_preserving():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rope_cos_sin(torch.zeros(2, 4, dtype=torch.long), 8, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rope(x, cos, sin), x)
    cos, sin = rope_cos_sin(torch.arange(4).expand(2, 4), 8, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Attention(tiny(n_heads=4, n_kv_heads=2))
    mha = Attention(tiny(n_heads=4, n_kv_heads=4))
    hd = 8
    mha.q_proj.weight.data = gqa.q_proj.weight.data.clone()
    mha.o_proj.weight.data = gqa.o_proj.weight.data.clone()
    # query head h uses KV head h // 2: repeat each KV head's rows twice
    for name in ("k_proj", "v_proj"):
        w = getattr(gqa, name).weight.data.view(2, hd, 32)
        getattr(mha, name).weight.data = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32).clone()
    x = torch.randn(2, 5, 32)
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5), hd, 10000.0, torch.float32)
    torch.testing.assert_close(gqa(x, cos, sin, None)[0], mha(x, cos, sin, None)[0])


def test_attention_is_causal():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = 4
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("moe", [0, 4])
def test_kv_cache_matches_full_forward_with_left_padding(moe):
    torch.manual_seed(0)
    model = CausalLM(tiny(n_experts=moe)).eval()
    ids = torch.randint(4, 40, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    # cached: prefill then one token at a time, comparing logits with a padding-free full pass
    new = torch.randint(4, 40, (3, 4))
    out = model(ids, attention_mask=mask, use_cache=True)
    cached = [out.logits[:, -1]]
    past, m = out.past, mask
    for j in range(4):
        m = torch.cat((m, torch.ones(3, 1, dtype=torch.long)), dim=1)
        out = model(new[:, j:j + 1], attention_mask=m, past=past, use_cache=True)
        past = out.past
        cached.append(out.logits[:, -1])
    cached_logits = torch.stack(cached, 1)  # [3, 5, V]: predictions after prompt, +1..+4 tokens
    for r in range(3):
        seq = torch.cat((ids[r][mask[r].bool()], new[r]))
        full = model(seq[None]).logits[0]
        p = int(mask[r].sum())
        torch.testing.assert_close(cached_logits[r], full[p - 1:], atol=1e-5, rtol=1e-4)


def test_generate_greedy_matches_argmax_of_full_forward_and_stops_at_eos():
    torch.manual_seed(1)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    gen = generate(model, ids, mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0, greedy=True)
    for r in range(2):
        seq = ids[r][mask[r].bool()]
        for t in range(int(gen.response_mask[r].sum())):
            nxt = model(seq[None]).logits[0, -1].argmax()
            assert int(nxt) == int(gen.response[r, t])
            seq = torch.cat((seq, nxt[None]))
    # force EOS: a model whose head always prefers token 2 stops after one token
    model.lm_head.weight.data.zero_()
    model.lm_head.weight.data[2] = 1.0
    model.model.norm.weight.data.fill_(1.0)
    gen = generate(model, ids, mask, 5, eos_token_id=2, pad_token_id=0, greedy=True)
    assert gen.response.shape[1] == 1 and gen.response_mask.sum() == 2


def test_sampling_logprobs_and_filters():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (4, 3))
    gen = generate(model, ids, torch.ones_like(ids), 5, eos_token_id=2, pad_token_id=0,
                   temperature=0.7, generator=torch.Generator().manual_seed(0))
    full = model(gen.sequences).logits[:, 2:-1] / 0.7
    ref = torch.log_softmax(full, -1).gather(-1, gen.response[..., None]).squeeze(-1)
    torch.testing.assert_close(gen.logprobs, ref * gen.response_mask, atol=1e-5, rtol=1e-4)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    # probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p=0.8 keeps the first two
    kept = filter_logits(logits, top_p=0.8)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()


def test_moe_routing_topk_and_gates():
    torch.manual_seed(0)
    cfg = tiny(n_experts=4, top_k=2, gating="noisy_top_k")
    layer = MoEFeedForward(cfg)
    torch.nn.init.normal_(layer.gate.weight)
    torch.nn.init.normal_(layer.gate.noise.weight)
    x = torch.randn(10, 32)
    layer.eval()
    logits, gates, index = layer.gate(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    torch.testing.assert_close(index, torch.topk(x @ layer.gate.weight.T, 2).indices)
    # gates = softmax over the two kept logits = the full softmax renormalised over them
    full = torch.softmax(logits, -1).gather(-1, index)
    torch.testing.assert_close(gates, full / full.sum(-1, keepdim=True))
    # noise only in training: eval is deterministic, training is not
    torch.testing.assert_close(layer.gate(x)[0], logits)
    layer.train()
    assert not torch.allclose(layer.gate(x)[0], logits)


def test_moe_top1_is_switch_and_output_uses_selected_expert():
    torch.manual_seed(0)
    cfg = tiny(n_experts=3, top_k=1)
    layer = MoEFeedForward(cfg).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 5, 32)
    y = layer(x)
    _, gates, index = layer.gate(x.view(5, 32))
    assert torch.all(gates == 1.0)  # top-1: the gate of the one expert is 1
    for n in range(5):
        e = int(index[n, 0])
        g, u = (x[0, n] @ layer.experts.gate_up_proj[e].T).chunk(2)
        ref = (torch.nn.functional.silu(g) * u) @ layer.experts.down_proj[e].T
        torch.testing.assert_close(y[0, n], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.expert_load.sum(), torch.tensor(1.0))


def test_load_balancing_loss_lowest_for_uniform_load():
    n, e = 8, 4
    uniform_probs = torch.full((n, e), 1 / e)
    uniform_idx = torch.arange(n).remainder(e)[:, None]
    assert float(switch_load_balancing_loss(uniform_probs, uniform_idx, e)) == pytest.approx(1.0)
    skew_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(n, 1)
    skew_idx = torch.zeros(n, 1, dtype=torch.long)
    # f = [1,0,0,0], P = [0.7,.1,.1,.1] -> 4 * 0.7 = 2.8
    assert float(switch_load_balancing_loss(skew_probs, skew_idx, e)) == pytest.approx(2.8)
    # z-loss: logsumexp of zeros over 4 experts = log 4
    assert float(router_z_loss(torch.zeros(3, 4))) == pytest.approx(math.log(4) ** 2)


def test_moe_model_reports_aux_loss_and_load_per_layer():
    model = CausalLM(tiny(n_experts=4, top_k=2, aux_loss_coef=0.5))
    out = model(torch.randint(4, 40, (2, 7)))
    assert len(out.expert_load) == 2 and out.expert_load[0].shape == (4,)
    assert float(out.aux_loss.detach()) > 0
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    with torch.no_grad():  # sampling: loads still reported, no loss terms computed
        frozen = model(torch.randint(4, 40, (2, 7)))
    assert float(frozen.aux_loss) == 0.0 and len(frozen.expert_load) == 2
    assert float(frozen.expert_load[0].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(("kw", "field"), [
    ({"n_heads": 0}, "n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"d_model": 30, "n_heads": 4}, "n_heads"),
    ({"n_experts": 4, "top_k": 5}, "top_k"),
    ({"n_experts": 4, "gating": "hash"}, "gating"),
    ({"norm_eps": 0.0}, "norm_eps"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        tiny(**kw)


def test_kv_cache_follows_the_dtype_of_the_keys():
    """bf16-mixed training samples rollouts under autocast; a bf16 model caches bf16 keys."""
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = generate(model, ids, torch.ones_like(ids), 4, eos_token_id=-1, pad_token_id=0,
                       greedy=True)
        mixed = model(ids, use_cache=True).past  # rotated keys float32, values bf16: kept so
    assert gen.response.shape == (2, 4)
    assert mixed.k[0].dtype == torch.float32 and mixed.v[0].dtype == torch.bfloat16
    half = model.to(torch.bfloat16)
    out = half(ids, use_cache=True)
    assert out.past.k[0].dtype == torch.bfloat16 and out.past.length == 5
    nxt = half(ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), past=out.past,
               use_cache=True)
    assert nxt.past.length == 6 and nxt.logits.dtype == torch.bfloat16


@pytest.mark.parametrize("moe", [0, 4])
def test_logits_to_keep_gives_the_logits_of_the_last_positions(moe):
    """The same logits as the full head's last k; the head's matmul over fewer rows may take
    another kernel, so agreement is to rounding, not always bit for bit."""
    torch.manual_seed(0)
    model = CausalLM(tiny(n_experts=moe)).eval()
    ids = torch.randint(4, 40, (3, 7))
    with torch.no_grad():
        full = model(ids).logits
        for k in (1, 3, 7):
            kept = model(ids, logits_to_keep=k).logits
            assert kept.shape == (3, k, 40)
            torch.testing.assert_close(kept, full[:, -k:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def _head_rows(model: CausalLM) -> tuple[list[int], object]:
    """Positions the LM head is run on, call by call (a forward hook on ``lm_head``)."""
    rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    return rows, handle


def test_the_sampler_prefill_and_the_reference_pass_run_the_head_where_needed():
    """The prefill needs the last position's logits, a response's log-probs the N + 1 last; with
    autograd the head still runs on every position (its weight gradient keeps its rounding)."""
    from harness.methods.rollout import response_logprobs

    torch.manual_seed(2)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    rows, handle = _head_rows(model)
    gen = generate(model, ids, mask, max_new_tokens=3, eos_token_id=-1, pad_token_id=0, greedy=True)
    assert rows == [1, 1, 1]  # prefill, then one per new token but the last (nothing follows it)
    seq, attn = gen.sequences, torch.cat((mask, gen.response_mask), 1)
    rows.clear()
    with torch.no_grad():
        fast, _, _ = response_logprobs(model, seq, attn, 5)
    full, _, _ = response_logprobs(model, seq, attn, 5)
    handle.remove()
    assert rows == [4, 8]
    torch.testing.assert_close(fast, full.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, gen.logprobs, atol=1e-5, rtol=1e-5)


def test_inverse_cdf_sampling_by_hand_and_in_law():
    from harness.models.generation import inverse_cdf_sample

    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(5, 4)
    u = torch.tensor([0.0, 0.1, 0.2, 0.69, 0.71])
    # cdf 0.2, 0.2, 0.7, 1.0: the first token whose cdf exceeds u; token 1 has no mass
    assert inverse_cdf_sample(probs, u).tolist() == [0, 0, 2, 2, 3]
    # u * total rounding up to the total takes the last token with mass, not a filtered one
    tail = torch.tensor([[0.5, 0.5, 0.0]])
    assert inverse_cdf_sample(tail, torch.tensor([1.0])).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = inverse_cdf_sample(probs[:1].expand(40_000, 4), torch.rand(40_000, generator=g))
    freq = torch.bincount(draws, minlength=4).float() / 40_000
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)


def test_a_row_with_its_own_noise_samples_the_same_tokens_in_any_batch():
    """generate(noise=...): row i's tokens depend on its prompt and its noise row only, so a
    row sampled alone or beside others (as on a DDP rank or in one process) gets the same tokens;
    the generator's multinomial draws do not have that property."""
    torch.manual_seed(1)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(4, 40, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    noise = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, eos_token_id=-1, pad_token_id=0, temperature=1.0)
    batch = generate(model, ids, mask, noise=noise, **kw).response
    for i in range(3):
        alone = generate(model, ids[i:i + 1], mask[i:i + 1], noise=noise[i:i + 1], **kw).response
        assert torch.equal(alone[0], batch[i])
    g = torch.Generator().manual_seed(2)
    alone = generate(model, ids[2:], mask[2:], generator=g, **kw).response
    g = torch.Generator().manual_seed(2)
    assert not torch.equal(alone[0], generate(model, ids, mask, generator=g, **kw).response[2])
    with pytest.raises(ValueError, match="noise"):
        generate(model, ids, mask, noise=noise[:, :2], **kw)
