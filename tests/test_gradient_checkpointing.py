"""``model.gradient_checkpointing``: activations recomputed in backward, the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from test_methods import TINY_SFT, composed

from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM
from harness.pipeline import run


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)  # noisy gating draws its noise from the global RNG
    out = model(ids)
    loss = out.logits.logsumexp(-1).mean() + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("moe", [False, True])
def test_recomputed_activations_give_the_same_gradients(moe):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=32, n_experts=4 if moe else 0, top_k=2,
                      gating="noisy_top_k" if moe else "softmax")
    torch.manual_seed(0)
    plain = CausalLM(cfg).train()
    recomputing = copy.deepcopy(plain)
    recomputing.set_gradient_checkpointing(True)
    ids = torch.randint(0, 64, (3, 16))
    loss_a, grads_a = _grads(plain, ids)
    loss_b, grads_b = _grads(recomputing, ids)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=0, atol=1e-7), name
    # the recomputation really happens: the checkpointed forward keeps fewer saved tensors
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        plain(ids).logits.sum()
        n_plain = sum(saved)
        saved.clear()
        recomputing(ids).logits.sum()
    assert sum(saved) < 0.5 * n_plain


def test_a_run_with_gradient_checkpointing_shares_the_cache_key_and_the_numbers(tmp_path,
                                                                               monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    common = [*TINY_SFT, "method=sft", "sft.max_steps=6", "results_dir=null",
              "dataset.n_train=300", "dataset.n_pairs=96"]
    plain = run(composed([*common, f"cache_dir={tmp_path}/a"]), tmp_path / "a")
    assert not calls
    recomputed = run(composed([*common, "model.gradient_checkpointing=true",
                               f"cache_dir={tmp_path}/b"]), tmp_path / "b")
    assert len(calls) >= 6 * 2  # every training step, every layer
    assert plain["cache_keys"]["sft"] == recomputed["cache_keys"]["sft"]
    assert plain["metrics"]["train/loss"] == pytest.approx(recomputed["metrics"]["train/loss"],
                                                           abs=1e-6)
