"""1. The sampler: our KV-cached ``generate`` against ``transformers.generate``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.common import Column, median, resolve_device, sync
from harness.config import ModelConfig, RolloutConfig
from harness.models.generation import generate
from harness.models.llama import CausalLM


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random prompt ids [B, P] (avoiding the 4 special ids) and an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids, device=device)


def ours_generate(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, n: int,
                  cuda_graph: bool = RolloutConfig.cuda_graph) -> torch.Tensor:
    """Greedy KV-cached sampling of exactly ``n`` tokens (eos id -1 never occurs) -> [B, n];
    ``cuda_graph``: :func:`~harness.models.generation.generate`'s (on a GPU only), by default
    what a run's rollouts take (``method.rollout.cuda_graph``)."""
    return generate(model, ids, mask, n, eos_token_id=-1, pad_token_id=0, greedy=True,
                    cuda_graph=cuda_graph).response


def hf_generate(hf: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """``transformers`` greedy ``generate`` of exactly ``n`` tokens (no EOS: never stops early)."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                               eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True)
    return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]


PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")


def bench_sampler(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                  iters: int = 5, warmup: int = 1, seed: int = 0,
                  device: torch.device | None = None,
                  precision: str = "32-true") -> dict[str, Any]:
    """Tokens/s of our sampler and of HF ``generate`` on the same weights and prompts.

    One (or ``warmup``) untimed call each, then ``iters`` timed calls of each, interleaved so that
    a change in background load hits both alike. tokens/s = B * N / median wall time (prefill
    included). ``agree``: fraction of positions where both picked the same greedy token. On a
    GPU ``ours`` decodes with a CUDA graph where the model allows one
    (:class:`~harness.models.decoding.GraphedDecodeStep`), and ``ours_eager`` is timed too: the
    eager step (``cuda_graph=False``), with ``eager_agree`` its share of the graphed tokens.
    ``precision`` (Lightning's names): ``32-true`` float32; ``bf16-true`` both models' weights in
    bf16; ``bf16-mixed`` float32 weights, every call under bf16 autocast (as ``trainer=gpu``'s
    rollouts run).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = device or resolve_device()
    torch.manual_seed(seed)
    model = CausalLM(model_cfg).to(device).eval()
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    from harness.models.hf import to_hf_model

    hf = to_hf_model(model)
    ids, mask = random_prompts(batch, prompt_len, model_cfg.vocab_size, seed, device)
    runners: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ours_generate(model, ids, mask, new_tokens),
        "hf": lambda: hf_generate(hf, ids, mask, new_tokens),
    }
    if device.type == "cuda":
        runners["ours_eager"] = lambda: ours_generate(model, ids, mask, new_tokens, cuda_graph=False)
    times: dict[str, list[float]] = {k: [] for k in runners}
    outputs: dict[str, torch.Tensor] = {}
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.inference_mode(), autocast:
        for k, fn in runners.items():
            for _ in range(max(1, warmup)):  # also checks the shape
                outputs[k] = fn()
            if outputs[k].shape != (batch, new_tokens):
                raise RuntimeError(f"{k} sampler returned {tuple(outputs[k].shape)}, "
                                   f"expected {(batch, new_tokens)}")
        for _ in range(iters):
            for k, fn in runners.items():
                sync(device)
                t0 = time.perf_counter()
                outputs[k] = fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    n_tok = batch * new_tokens
    ours_s, hf_s = median(times["ours"]), median(times["hf"])
    return {
        "model": model_cfg.name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "vocab_size": model_cfg.vocab_size, "ours_s": ours_s, "hf_s": hf_s,
        "ours_tok_s": n_tok / ours_s, "hf_tok_s": n_tok / hf_s, "speedup": hf_s / ours_s,
        "agree": float((outputs["ours"].cpu() == outputs["hf"].cpu()).float().mean()),
        "iters": iters, "device": str(device), "precision": precision,
        "ours_eager_tok_s": n_tok / median(times["ours_eager"]) if "ours_eager" in times else None,
        "eager_agree": (float((outputs["ours_eager"] == outputs["ours"]).float().mean())
                        if "ours_eager" in outputs else None),
    }


SAMPLER_COLUMNS: list[Column] = [
    ("model", "model", ""), ("precision", "precision", ""), ("batch", "B", "d"),
    ("prompt_len", "P", "d"), ("new_tokens", "N", "d"),
    ("ours_tok_s", "ours tok/s", ",.0f"), ("hf_tok_s", "HF tok/s", ",.0f"),
    ("speedup", "ours/HF", ".2f"), ("ours_s", "ours s", ".4f"), ("hf_s", "HF s", ".4f"),
    ("agree", "same tokens", ".1%"), ("ours_eager_tok_s", "ours eager tok/s", ",.0f"),
    ("eager_agree", "eager = ours", ".1%"),
]


def sampler_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The sampler table's columns, without those no row has (the eager step's: GPU only)."""
    return [c for c in SAMPLER_COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def load_note() -> str | None:
    """A warning when other processes keep the CPUs busy (contended timings), else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    threads = torch.get_num_threads()
    hint = " or with --threads 1" if threads > 1 else ""
    return (f"WARNING: 1-min load average {load:.1f} on {cores} cores before this run: timings are "
            f"contended (torch uses {threads} intra-op thread(s), which other processes preempt); "
            f"rerun on an idle machine{hint}.")


def sampler_notes(device: torch.device) -> list[str]:
    """What the sampler table's figures mean."""
    return [
        "tok/s = B*N / median wall time of one generate call (prefill included), after a warm-up;",
        "greedy, exactly N new tokens (ours: eos id -1; HF: min_new_tokens=max_new_tokens, no eos),",
        "same seeded random weights, eval mode, inference_mode. ours/HF > 1: our sampler is faster.",
        "ours: one prefill forward, then harness.models.decoding.DecodeStep per new token (the",
        "forward's operations with per-call constants prepared once; the same logits bit for bit).",
        "'same tokens': share of identical greedy picks (near-ties in random logits may flip).",
        *(["ours replays the decode step as a CUDA graph (GraphedDecodeStep); 'ours",
           "eager': the eager step (cuda_graph=False); 'eager = ours': its share of ours' tokens."]
          if device.type == "cuda" else []),
        f"device {device}, torch threads {torch.get_num_threads()}.",
    ]


