"""The sampler's one-token decoding step (harness.models.decoding) against the model's forward."""

from __future__ import annotations

import pytest
import torch

import harness.models.generation as generation
from harness.models.architecture import LoRASettings
from harness.models.decoding import DecodeStep, GraphedDecodeStep, decode_step, fast_path_ok, graph_ok
from harness.models.generation import generate
from harness.models.llama import CausalLM, rope_cos_sin
from harness.models.lora import adapters_disabled, add_lora
from harness.models.moe import MoEFeedForward
from tests.test_model import tiny

# every test taking ``device`` runs on the CPU, and on a GPU too where one is present (CI: CPU)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]

SHAPES = {
    "gqa": {},
    "mha": {"n_kv_heads": None},
    "moe-softmax": {"n_experts": 4, "top_k": 2},
    "moe-noisy": {"n_experts": 4, "top_k": 2, "gating": "noisy_top_k"},
    "qkv-bias": {"qkv_bias": True},
    "tied": {"tie_embeddings": True},
    "head-dim": {"attn_head_dim": 16},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}},
    "lora": {},
}


def model_of(shape: str, device: str = "cpu") -> CausalLM:
    """A tiny model of ``shape`` on ``device``; ``lora``: with rank-4 adapters on every
    projection."""
    torch.manual_seed(0)
    model = CausalLM(tiny(**SHAPES[shape])).eval()
    if shape == "lora":
        add_lora(model, LoRASettings(r=4, alpha=8.0))
    with torch.no_grad():  # biases and LoRA's B start at zero: give them values that show up
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "lora_B" in name:
                p.normal_(std=0.5)
    return model.to(device)


def left_padded(b: int = 3, p: int = 6, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [b, p] whose rows have 0, 2 and 4 padding tokens on the left."""
    ids = torch.randint(4, 40, (b, p))
    mask = torch.ones_like(ids)
    for row in range(b):
        mask[row, :2 * (row % 3)] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _prefilled(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int):
    """The KV cache after the prefill forward over ids [B, P], sized for ``steps`` more tokens."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=True,
                     past=model.new_cache(ids.shape[1] + steps)).past


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_decode_step_gives_the_forward_logits_bit_for_bit(shape, padded, device):
    """Both paths from one prefill: each step's logits and the cached keys equal exactly."""
    model = model_of(shape, device)
    ids, mask = (left_padded(device=device) if padded else
                 (torch.randint(4, 40, (3, 6), device=device), torch.ones(3, 6, device=device).long()))
    steps = 5
    ref_cache, fast_cache = _prefilled(model, ids, mask, steps), _prefilled(model, ids, mask, steps)
    with torch.no_grad():
        fast = DecodeStep(model, mask, fast_cache, steps)
        grown = mask
        tokens = torch.tensor([5, 6, 7], device=device)
        for _ in range(steps):
            grown = torch.cat((grown, grown.new_ones(3, 1)), dim=1)
            ref = model(tokens[:, None], attention_mask=grown, past=ref_cache,
                        use_cache=True).logits[:, -1]
            got = fast(tokens)
            assert torch.equal(got, ref)
            tokens = (ref.argmax(-1) + 3) % 40
        assert fast_cache.length == ref_cache.length == 6 + steps
        for layer in range(model.cfg.n_layers):
            assert torch.equal(fast_cache.k[layer][:, :, :11], ref_cache.k[layer][:, :, :11])
            assert torch.equal(fast_cache.v[layer][:, :, :11], ref_cache.v[layer][:, :, :11])


def test_the_rope_table_equals_the_per_step_rotary_values():
    """A table over positions 0..n-1, gathered, equals rope_cos_sin of each position on its own."""
    positions = torch.arange(300)
    table_cos, table_sin = rope_cos_sin(positions[None], 32, 10000.0, torch.float32)
    for pos in (0, 1, 7, 63, 64, 255, 299):
        cos, sin = rope_cos_sin(torch.tensor([[pos], [pos]]), 32, 10000.0, torch.float32)
        assert torch.equal(cos[0, 0], table_cos[0, pos]) and torch.equal(sin[1, 0], table_sin[0, pos])


def _no_fast_path(monkeypatch) -> None:
    monkeypatch.setattr(generation, "decode_step", lambda *args, **kwargs: None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["gqa", "moe-noisy"])
def test_generate_samples_the_same_tokens_and_logprobs_either_way(shape, device, monkeypatch):
    """Sampling (generator and per-row noise), greedy and EOS stops: identical with and without
    the (eager) decode step."""
    model = model_of(shape, device)
    ids, mask = left_padded(4, 5, device)
    noise = torch.rand(4, 7, generator=torch.Generator().manual_seed(3)).to(device)

    def runs() -> list:
        outs = []
        for kw in ({"temperature": 0.8, "generator": torch.Generator(device).manual_seed(1)},
                   {"temperature": 1.3, "top_k": 10, "top_p": 0.9, "noise": noise},
                   {"greedy": True}):
            outs.append(generate(model, ids, mask, 7, eos_token_id=9, pad_token_id=0,
                                 cuda_graph=False, **kw))
        return outs

    built: list[DecodeStep | None] = []
    monkeypatch.setattr(generation, "decode_step",
                        lambda *a, **k: built.append(decode_step(*a, **k)) or built[-1])
    fast = runs()
    assert len(built) == 3 and all(isinstance(step, DecodeStep) for step in built)
    assert all(step.fed == a.response.shape[1] - 1 for step, a in zip(built, fast, strict=True))
    _no_fast_path(monkeypatch)
    slow = runs()
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        assert torch.equal(a.response_mask, b.response_mask)
        assert torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_under_autocast_matches_the_forward(device, monkeypatch):
    """bf16 autocast (bf16-mixed rollouts): the same tokens and log-probs either way."""
    model = model_of("gqa", device)
    ids, mask = left_padded(3, 5, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        fast = generate(model, ids, mask, 6, eos_token_id=-1, pad_token_id=0, greedy=True,
                        cuda_graph=False)
        _no_fast_path(monkeypatch)
        slow = generate(model, ids, mask, 6, eos_token_id=-1, pad_token_id=0, greedy=True)
    assert torch.equal(fast.response, slow.response) and torch.equal(fast.logprobs, slow.logprobs)


def test_models_it_cannot_reproduce_decode_through_forward():
    """Forward hooks (a sharding strategy's, a test's), another model class, another cache: no
    decode step. LoRA-wrapped projections are called as modules, so a LoRA model keeps it."""
    model = model_of("gqa")
    ids, mask = left_padded(2, 4)
    cache = _prefilled(model, ids, mask, 4)
    assert fast_path_ok(model) and decode_step(model, mask, cache, 4) is not None
    assert decode_step(model, mask, object(), 4) is None  # not the harness's cache
    hooked = model_of("gqa")
    handle = hooked.model.layers[0].mlp.register_forward_pre_hook(lambda *args: None)
    assert not fast_path_ok(hooked)
    handle.remove()
    assert fast_path_ok(hooked)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fast_path_ok(hooked)  # a hook on every module
    finally:
        handle.remove()
    assert fast_path_ok(hooked)
    assert not fast_path_ok(torch.nn.Linear(2, 2))
    assert fast_path_ok(model_of("lora"))


def test_a_lora_model_decodes_with_its_adapters_on_or_off(monkeypatch):
    """The decode step calls peft's layers, which read the adapters' switch at call time: with
    the adapters off (GRPO's reference) it samples the base model's tokens."""
    adapted, base = model_of("lora"), model_of("gqa")
    ids, mask = left_padded(3, 5)
    kw = {"eos_token_id": -1, "pad_token_id": 0, "greedy": True}
    on = generate(adapted, ids, mask, 6, **kw)
    with adapters_disabled(adapted):
        off = generate(adapted, ids, mask, 6, **kw)
    plain = generate(base, ids, mask, 6, **kw)
    assert torch.equal(off.logprobs, plain.logprobs) and torch.equal(off.response, plain.response)
    assert not torch.equal(on.logprobs, plain.logprobs)
    _no_fast_path(monkeypatch)
    assert torch.equal(generate(adapted, ids, mask, 6, **kw).logprobs, on.logprobs)


def test_a_decode_step_refuses_a_cache_or_a_token_it_was_not_built_for():
    model = model_of("gqa")
    ids, mask = left_padded(2, 4)
    with torch.no_grad():
        cache = _prefilled(model, ids, mask, 2)
        with pytest.raises(ValueError, match="the cache holds 4 positions, the prompt 3"):
            DecodeStep(model, mask[:, 1:], cache, 2)
        step = DecodeStep(model, mask, cache, 2)
        step(torch.tensor([5, 6]))
        step(torch.tensor([5, 6]))
        with pytest.raises(RuntimeError, match="built for 2 tokens"):
            step(torch.tensor([5, 6]))


@pytest.mark.parametrize("gating", ["softmax", "noisy_top_k"])
def test_an_moe_layers_mix_is_its_forward_without_the_statistics(gating):
    """MoEFeedForward.mix (what the decode step calls) gives forward's output exactly, in eval
    and, with the same noise, in training; forward alone keeps the aux loss and expert load."""
    torch.manual_seed(0)
    layer = MoEFeedForward(tiny(n_experts=4, top_k=2, gating=gating))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 5, 32)
    for training in (False, True):
        layer.train(training)
        torch.manual_seed(1)
        full = layer(x)
        torch.manual_seed(1)
        assert torch.equal(layer.mix(x.reshape(-1, 32)).reshape(3, 5, 32), full)
    assert layer.aux_loss.item() > 0 and torch.isclose(layer.expert_load.sum(), torch.tensor(1.0))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_graphed_step_gives_the_forward_logits_up_to_rounding(shape, padded, device):
    """The fixed-shape step (a CUDA graph on a GPU, eager on a CPU) writes the forward's keys and
    values and gives its logits up to the attention's (and MoE experts') summation order, with
    the unwritten cache slots full of NaN before it is built (they must not leak through the
    masked product)."""
    model = model_of(shape, device)
    ids, mask = (left_padded(device=device) if padded else
                 (torch.randint(4, 40, (3, 6), device=device), torch.ones(3, 6, device=device).long()))
    steps = 5
    ref_cache, cache = _prefilled(model, ids, mask, steps), _prefilled(model, ids, mask, steps)
    for layer in range(model.cfg.n_layers):
        cache.k[layer][:, :, 6:] = float("nan")
        cache.v[layer][:, :, 6:] = float("nan")
    with torch.no_grad():
        step = decode_step(model, mask, cache, steps, cuda_graph=True)
        if device == "cuda":
            assert isinstance(step, GraphedDecodeStep)
        else:  # no graph off a GPU: the fixed-shape step itself, eagerly
            assert type(step) is DecodeStep
            step = GraphedDecodeStep(model, mask, cache, steps)
        grown, tokens = mask, torch.tensor([5, 6, 7], device=device)
        for _ in range(steps):
            grown = torch.cat((grown, grown.new_ones(3, 1)), dim=1)
            ref = model(tokens[:, None], attention_mask=grown, past=ref_cache,
                        use_cache=True).logits[:, -1]
            got = step(tokens)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            tokens = (ref.argmax(-1) + 3) % 40
    assert (step.graph is not None) == (device == "cuda")
    assert cache.length == ref_cache.length == 6 + steps
    # the first layer's keys and values are the forward's exactly (no attention before them)
    assert torch.equal(cache.k[0][:, :, :11], ref_cache.k[0][:, :, :11])
    assert torch.equal(cache.v[0][:, :, :11], ref_cache.v[0][:, :, :11])
    for layer in range(1, model.cfg.n_layers):
        torch.testing.assert_close(cache.k[layer][:, :, :11], ref_cache.k[layer][:, :, :11])
        torch.testing.assert_close(cache.v[layer][:, :, :11], ref_cache.v[layer][:, :, :11])


@CUDA
@pytest.mark.parametrize("autocast", [False, True])
def test_a_graph_replays_the_eager_fixed_shape_step_bit_for_bit(autocast):
    """Replaying the captured graph computes what the same step computes eagerly (also under
    bf16 autocast, where the graph is captured without autocast's weight-cast cache)."""
    model = model_of("gqa", "cuda")
    ids, mask = left_padded(3, 6, "cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        graphed = GraphedDecodeStep(model, mask, _prefilled(model, ids, mask, 4), 4)
        eager = GraphedDecodeStep(model, mask, _prefilled(model, ids, mask, 4), 4)
        tokens = torch.tensor([5, 6, 7], device="cuda")
        for t in range(4):
            got = graphed(tokens).clone()
            eager.tokens.copy_(tokens)
            eager.t.fill_(t)
            assert torch.equal(got, eager._static_step())
            tokens = (got.argmax(-1) + 3) % 40
    assert graphed.graph is not None and eager.graph is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_decodes_through_a_graph_on_a_gpu_only(device):
    for shape in ("gqa", "moe-softmax", "lora"):
        model = model_of(shape, device)
        ids, mask = left_padded(2, 4, device)
        step = decode_step(model, mask, _prefilled(model, ids, mask, 4), 4, cuda_graph=True)
        assert graph_ok(model, mask) is (device == "cuda")
        assert type(step) is (GraphedDecodeStep if device == "cuda" else DecodeStep)
        step = decode_step(model, mask, _prefilled(model, ids, mask, 4), 4, cuda_graph=False)
        assert type(step) is DecodeStep


@pytest.mark.parametrize("gating", ["softmax", "noisy_top_k"])
def test_an_moe_layers_dense_mix_is_its_mix_up_to_rounding(gating):
    """Every expert on every token, weighted by the gates (0 off the top k): mix's output."""
    torch.manual_seed(0)
    layer = MoEFeedForward(tiny(n_experts=4, top_k=2, gating=gating)).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(15, 32)
    torch.testing.assert_close(layer.mix_dense(x), layer.mix(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.mix_dense(x), layer.mix(x.flip(0)))  # not a constant


@CUDA
@pytest.mark.parametrize("shape", ["gqa", "moe-noisy"])
def test_generate_on_a_gpu_with_and_without_the_graph(shape):
    """Sampling with the run's CPU generator on a GPU draws its uniforms from it (the same tokens
    as passing them as noise); the graphed and the eager step (an MoE model's: its experts run
    densely in the graph) sample the same tokens here."""
    model = model_of(shape, "cuda")
    ids, mask = left_padded(4, 5, "cuda")
    kw = {"eos_token_id": 9, "pad_token_id": 0, "temperature": 0.9}
    graphed = generate(model, ids, mask, 7, generator=torch.Generator().manual_seed(1),
                       cuda_graph=True, **kw)
    noise = torch.rand(4, 7, generator=torch.Generator().manual_seed(1)).cuda()
    eager = generate(model, ids, mask, 7, noise=noise, cuda_graph=False, **kw)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(graphed.response_mask, eager.response_mask)
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, rtol=1e-5, atol=1e-5)
