"""``python -m harness.bench``: throughput, step time and memory figures of the harness.

Three sections, each printed as a table per model preset (``--json PATH`` also dumps them):

1. **sampler**: our KV-cached :func:`harness.models.generation.generate` against ``transformers``'
   ``generate`` on the exported model (:func:`harness.models.hf.to_hf_model`): same seeded random
   weights, same prompts, greedy, both forced to produce exactly ``--new-tokens`` tokens.
2. **steps**: seconds per optimisation step of every method (sft, rm, dpo, ppo, grpo): the real
   LightningModules, built from the method configs in ``conf/method`` (only batch sizes and
   iteration counts overridden), trained by a real ``lightning.Trainer`` on the built-in ``arith``
   task from a random-init policy; a callback times ``on_train_batch_start`` -> ``on_train_batch_end``.
3. **memory**: peak memory of PPO against GRPO at the same number of sequences per rollout: the
   model state computed from the tensors (parameters of every network held, gradients, AdamW
   states) and the measured peak (CUDA allocator, or peak RSS of a fresh subprocess on CPU).

Examples::

    python -m harness.bench                                  # llama_small and moe_small, batch 64
    python -m harness.bench --quick --models llama_tiny      # seconds, for a smoke test
    python -m harness.bench --sections sampler --new-tokens 64 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from harness.conf_path import config_dir
from harness.config import ModelConfig, register_configs, to_dataclass, validate
from harness.models.generation import generate
from harness.models.llama import CausalLM, ScalarHead

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Set (unless already set) by :func:`main`: the bench builds every model locally."""
CONF_DIR = config_dir()
SECTIONS: tuple[str, ...] = ("sampler", "steps", "memory")
DEFAULT_MODELS: tuple[str, ...] = ("llama_small", "moe_small")
MEMORY_MARK = "HARNESS_BENCH_MEMORY "
"""Prefix of the one stdout line on which a memory child reports its JSON result."""
MIB = 2**20

Column = tuple[str, str, str]
"""(row key, header, format spec) of one table column."""


# ------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info lines (seed, accelerator, tips) and its advisory warnings."""
    import datasets

    names = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning", "harness")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(does not have many workers|"
                                    r"number of training batches|sync_dist|LightningModule.log|"
                                    r"batch_size|litlogger|`training_step` returned|LeafSpec).*")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not xs:
        raise ValueError("median of no measurements")
    return float(statistics.median(xs))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The harness config composed from ``conf/`` (Hydra compose API) with ``overrides``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *overrides])


def model_config(preset: str, vocab_size: int) -> ModelConfig:
    """The ``conf/model/<preset>.yaml`` preset with ``vocab_size`` set."""
    cfg = compose_config([f"model={preset}"])
    return dataclasses.replace(to_dataclass(ModelConfig, cfg.model), vocab_size=int(vocab_size))


def methods() -> tuple[str, ...]:
    """Every stage in the registry: the bench times each one."""
    from harness.registry import stage_names

    return stage_names()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def format_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column],
                 notes: Sequence[str] = ()) -> str:
    """A plain-text table: title, header, one line per row (``None`` shows as ``-``), notes."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            v = row.get(key)
            line.append("-" if v is None else format(v, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                         enumerate(zip(r, widths, strict=True))).rstrip()

    rule = "-" * len(render(cells[0]))
    out = [title, rule, render(cells[0]), rule, *(render(r) for r in cells[1:]), rule]
    out += [f"  {line}" for n in notes for line in textwrap.wrap(n, 100, subsequent_indent="  ")]
    return "\n".join(out)


# ------------------------------------------------------------------------ 1. the sampler
def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random prompt ids [B, P] (avoiding the 4 special ids) and an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids, device=device)


def ours_generate(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy KV-cached sampling of exactly ``n`` tokens (eos id -1 never occurs) -> [B, n]."""
    return generate(model, ids, mask, n, eos_token_id=-1, pad_token_id=0, greedy=True).response


def hf_generate(hf: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """``transformers`` greedy ``generate`` of exactly ``n`` tokens (no EOS: never stops early)."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                               eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True)
    return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]


def bench_sampler(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                  iters: int = 5, warmup: int = 1, seed: int = 0,
                  device: torch.device | None = None) -> dict[str, Any]:
    """Tokens/s of our sampler and of HF ``generate`` on the same weights and prompts.

    One (or ``warmup``) untimed call each, then ``iters`` timed calls of each, interleaved so that
    a change in background load hits both alike. tokens/s = B * N / median wall time (prefill
    included). ``agree``: fraction of positions where both picked the same greedy token.
    """
    device = device or resolve_device()
    torch.manual_seed(seed)
    model = CausalLM(model_cfg).to(device).eval()
    from harness.models.hf import to_hf_model

    hf = to_hf_model(model)
    ids, mask = random_prompts(batch, prompt_len, model_cfg.vocab_size, seed, device)
    runners: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ours_generate(model, ids, mask, new_tokens),
        "hf": lambda: hf_generate(hf, ids, mask, new_tokens),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
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
        "iters": iters, "device": str(device),
    }


SAMPLER_COLUMNS: list[Column] = [
    ("model", "model", ""), ("batch", "B", "d"), ("prompt_len", "P", "d"), ("new_tokens", "N", "d"),
    ("ours_tok_s", "ours tok/s", ",.0f"), ("hf_tok_s", "HF tok/s", ",.0f"),
    ("speedup", "ours/HF", ".2f"), ("ours_s", "ours s", ".4f"), ("hf_s", "HF s", ".4f"),
    ("agree", "same tokens", ".1%"),
]


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
        "'same tokens': share of identical greedy picks (near-ties in random logits may flip).",
        f"device {device}, torch threads {torch.get_num_threads()}.",
    ]


# ------------------------------------------------------------------- 2. steps per method
def prepare_data(n_examples: int, cache_dir: Path, seed: int = 0,
                 model_max_length: int = 256) -> tuple[Any, Any]:
    """The ``arith`` task (``conf/dataset/arith.yaml``, sized down) and its tokenizer, cached."""
    from harness.data.tasks import build_task
    from harness.data.tokenizer import load_or_build_tokenizer

    cfg = compose_config([f"seed={seed}"])
    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(ds, dict)
    n = max(16, int(n_examples))
    ds.update(n_train=n, n_pairs=n, n_val=16, n_eval=16)
    task = build_task(ds, cache_dir=Path(cache_dir) / "data")
    tok = load_or_build_tokenizer(task, ds, Path(cache_dir) / "tokenizers",
                                  model_max_length=model_max_length)
    return task, tok


def build_method(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
                 n_batches: int, seed: int = 0, device: torch.device | None = None,
                 minibatch: int | None = None,
                 before_models: Callable[[], None] | None = None) -> Any:
    """The stage's :class:`~harness.stage.Fit` as the pipeline builds it, from random-init inputs.

    The stage's config is its default (``conf/``) with only its sizes changed
    (:meth:`~harness.stage.Stage.sized`: ``batch`` sequences per batch, ``n_batches`` batches)
    and, if given, its ``minibatch_size``; ``before_models()`` runs before any network is built.
    The stages it needs (the SFT base, the reward model) are random-init networks of the preset.
    """
    from harness.cache import StageRecord
    from harness.registry import get_stage
    from harness.stage import Built, StageContext

    device = device or resolve_device()
    settings = validate(compose_config([f"method={method}"]))
    stage = get_stage(method)
    cfg = stage.sized(settings.stage_config(method), batch, n_batches)
    if minibatch is not None and hasattr(cfg, "minibatch_size"):
        cfg = dataclasses.replace(cfg, minibatch_size=minibatch)
    cfg.check(method)
    if before_models is not None:
        before_models()
    L.seed_everything(seed, workers=True, verbose=False)
    ctx = StageContext(task=task, tokenizer=tok, model_cfg=model_cfg, seed=seed)
    inputs: dict[str, Any] = {}
    for need in stage.needs(cfg):
        model: nn.Module = (ctx.new_policy() if need == "sft"
                            else ScalarHead(copy.deepcopy(inputs["sft"].model)).to(device))
        inputs[need] = Built(need, settings.stage_config(need), model,
                             StageRecord(key=f"random-{need}", path=Path(".")), Path("."))
    with contextlib.redirect_stderr(io.StringIO()):  # DPO's reference-log-prob bar
        return stage.build(ctx, cfg, inputs)


class StepTimer(L.Callback):
    """Wall time of every training batch (``on_train_batch_start`` -> ``on_train_batch_end``) and
    the number of steps of the first optimiser (the policy's, or the reward model's) in it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.opt_steps: list[int] = []
        self._t0 = 0.0
        self._count = 0
        self._handle: Any = None

    def _on_step(self, *_: Any) -> None:
        self._count += 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_post_hook(self._on_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        sync(self.device)
        self._count = 0
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._t0)
        self.opt_steps.append(self._count)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def fit(setup: Any, n_batches: int, device: torch.device, root: Path,
        callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """Train a stage's :class:`~harness.stage.Fit` for ``n_batches`` batches (plain Trainer)."""
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="32-true",
        max_epochs=1, max_steps=-1, limit_train_batches=n_batches, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        gradient_clip_val=(None if not setup.module.automatic_optimization
                           else setup.budget.grad_clip or None), callbacks=list(callbacks))
    if isinstance(setup.data, L.LightningDataModule):
        trainer.fit(setup.module, datamodule=setup.data)
    else:
        trainer.fit(setup.module, train_dataloaders=setup.data)
    return trainer


def bench_method_steps(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
                       iters: int = 5, warmup: int = 1, seed: int = 0,
                       device: torch.device | None = None, minibatch: int | None = None,
                       root: Path | None = None) -> dict[str, Any]:
    """Median seconds per training batch of ``method`` over ``iters`` batches after ``warmup``."""
    device = device or resolve_device()
    n = warmup + iters
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        setup = build_method(method, model_cfg, task, tok, batch, n, seed, device, minibatch)
        timer = StepTimer(device)
        fit(setup, n, device, Path(root or tmp), [timer])
    if len(timer.times) != n:
        raise RuntimeError(f"{method}: {len(timer.times)} batches ran, expected {n}")
    times, steps = timer.times[warmup:], timer.opt_steps[warmup:]
    s_batch = median(times)
    opt = int(round(median(steps)))
    if opt < 1:
        raise RuntimeError(f"{method}: no optimiser step was taken in a batch")
    return {
        "model": model_cfg.name, "method": method, "layout": setup.layout,
        "sequences": setup.sequences, "minibatch": setup.minibatch,
        "passes": setup.passes, "s_per_batch": s_batch, "opt_steps_per_batch": opt,
        "s_per_opt_step": s_batch / opt, "seq_per_s": setup.sequences / s_batch,
        "times": times, "iters": iters, "device": str(device),
    }


STEP_COLUMNS: list[Column] = [
    ("model", "model", ""), ("method", "method", ""), ("layout", "one batch", ""),
    ("sequences", "seqs", "d"), ("minibatch", "minibatch", "d"), ("passes", "passes", "d"),
    ("s_per_batch", "s/batch", ".4f"), ("opt_steps_per_batch", "opt steps/batch", "d"),
    ("s_per_opt_step", "s/opt step", ".4f"), ("seq_per_s", "seqs/s", ",.1f"),
]


def step_notes(device: torch.device, vocab: int) -> list[str]:
    """What the step table's figures mean."""
    return [
        "s/batch: median wall time of one Lightning training batch (on_train_batch_start -> _end),",
        "after the warm-up batch(es); includes the method's logging. Random-init policy, arith task,",
        f"vocab {vocab} (its tokenizer); conf/method defaults with only batch sizes and iterations set.",
        "sft/rm/dpo: one batch = one optimiser step (rm/dpo: B/2 pairs = B sequences; DPO's reference",
        "log-probs are precomputed before training, untimed). ppo/grpo: one batch = one rollout",
        "(sampling + reference and reward scoring + every optimisation pass over it); 'opt steps' counts",
        "the policy optimiser's steps (PPO steps its critic alongside); s/opt step = s/batch / opt steps.",
        f"device {device}, torch threads {torch.get_num_threads()}.",
    ]


# ------------------------------------------------------------------------- 3. memory
def _proc_status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size (falls back to the peak where /proc is missing)."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, else ``ru_maxrss``)."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there
            kib //= 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5`` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


NET_SHORT = {"policy": "policy", "reference": "ref", "critic": "critic", "reward_model": "RM"}


def state_memory(networks: dict[str, nn.Module], trainable: Sequence[nn.Module],
                 optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, Any]:
    """Model-state bytes computed from the tensors.

    params: every distinct parameter of every network held. Analytically, gradients take the
    trainable bytes and AdamW 2 x trainable (``exp_avg`` + ``exp_avg_sq``). After training (pass
    the ``optimizers``), grads and AdamW are the tensors actually allocated instead: a parameter
    that never gets a gradient (the unused LM head of a :class:`ScalarHead`) has neither, and
    ``unused_trainable_bytes`` says how much that is.
    """
    seen: set[int] = set()
    per_net: dict[str, int] = {}
    for name, net in networks.items():
        per_net[name] = 0
        for p in net.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                per_net[name] += tensor_bytes(p)
    train_params = list({id(p): p for net in trainable for p in net.parameters()
                         if p.requires_grad}.values())
    trainable_bytes = sum(tensor_bytes(p) for p in train_params)
    grad_bytes, adamw_bytes = trainable_bytes, 2 * trainable_bytes
    found = [st for opt in optimizers for st in opt.state.values()]
    if found:
        adamw_bytes = sum(tensor_bytes(v) for st in found for k, v in st.items()
                          if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v))
        grad_bytes = sum(tensor_bytes(p.grad) for p in train_params if p.grad is not None)
    params = sum(per_net.values())
    return {
        "networks": "+".join(NET_SHORT.get(n, n) for n in networks), "n_networks": len(networks),
        "param_bytes": params, "per_network_bytes": per_net, "trainable_bytes": trainable_bytes,
        "grad_bytes": grad_bytes, "adamw_bytes": adamw_bytes,
        "state_bytes": params + grad_bytes + adamw_bytes, "from_tensors_after_training": bool(found),
        "unused_trainable_bytes": trainable_bytes - adamw_bytes // 2 if found else 0,
    }


def measure_memory(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
                   iters: int = 2, seed: int = 0, device: torch.device | None = None,
                   minibatch: int | None = None) -> dict[str, Any]:
    """Peak memory of ``iters`` training batches of ``method``, over a baseline taken right before
    the networks are built (after imports and data), plus :func:`state_memory`.

    CUDA: the allocator's ``max_memory_allocated`` (reset at the baseline). CPU: peak RSS; run it
    in a fresh process (:func:`memory_in_subprocess`) so earlier work does not set the peak.
    """
    device = device or resolve_device()
    base: dict[str, Any] = {}

    def baseline() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base.update(bytes=torch.cuda.memory_allocated(device), peak_reset=True)
        else:
            reset = reset_peak_rss()
            base.update(bytes=rss_bytes(), peak_reset=reset, hwm_before=peak_rss_bytes())

    with quiet(), tempfile.TemporaryDirectory() as tmp:
        setup = build_method(method, model_cfg, task, tok, batch, iters, seed, device, minibatch,
                             before_models=baseline)
        trainer = fit(setup, iters, device, Path(tmp))
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else peak_rss_bytes())
        state = state_memory(setup.networks, setup.trainable, trainer.optimizers)
    return {
        "model": model_cfg.name, "method": method, "layout": setup.layout,
        "sequences": setup.sequences, "minibatch": setup.minibatch, "iters": iters,
        "device": str(device), "measure": "cuda max_memory_allocated" if device.type == "cuda"
        else "peak RSS (VmHWM)", "baseline_bytes": base["bytes"], "peak_bytes": peak,
        "delta_bytes": max(0, peak - base["bytes"]), "peak_reset": base["peak_reset"], **state,
    }


def memory_in_subprocess(method: str, preset: str, batch: int, iters: int, seed: int,
                         cache_dir: Path, n_examples: int, minibatch: int | None = None,
                         threads: int | None = None) -> dict[str, Any]:
    """:func:`measure_memory` in a fresh ``python -m harness.bench --_memory-child`` process.

    ``n_examples`` must be the parent's, so the child loads the same cached task and tokenizer.
    """
    cmd = [sys.executable, "-m", "harness.bench", "--_memory-child", method, "--models", preset,
           "--batch", str(batch), "--mem-iters", str(iters), "--seed", str(seed),
           "--cache-dir", str(cache_dir), "--device", "cpu", "--_n-examples", str(n_examples)]
    if minibatch is not None:
        cmd += ["--minibatch", str(minibatch)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_MARK):
            return json.loads(line[len(MEMORY_MARK):])
    raise RuntimeError(f"memory child for {method} on {preset} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def memory_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """GRPO / PPO ratios of the state and of the measured peak delta, per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        if "ppo" in by and "grpo" in by:
            p, g = by["ppo"], by["grpo"]
            out.append({"model": model, "state_ratio": g["state_bytes"] / p["state_bytes"],
                        "delta_ratio": g["delta_bytes"] / p["delta_bytes"] if p["delta_bytes"] else None,
                        "peak_ratio": g["peak_bytes"] / p["peak_bytes"]})
    return out


MEMORY_COLUMNS: list[Column] = [
    ("model", "model", ""), ("method", "method", ""), ("layout", "rollout", ""),
    ("minibatch", "minibatch", "d"), ("networks", "networks held", ""),
    ("param_mib", "params MiB", ".2f"), ("grad_mib", "grads MiB", ".2f"),
    ("adamw_mib", "AdamW MiB", ".2f"), ("state_mib", "state MiB", ".2f"),
    ("baseline_mib", "baseline MiB", ".1f"), ("peak_mib", "peak MiB", ".1f"),
    ("delta_mib", "measured delta MiB", ".1f"),
]
RATIO_COLUMNS: list[Column] = [
    ("model", "model", ""), ("state_ratio", "GRPO/PPO state", ".2f"),
    ("delta_ratio", "GRPO/PPO measured delta", ".2f"), ("peak_ratio", "GRPO/PPO whole peak", ".2f"),
]


def memory_table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the MiB columns the table shows."""
    keys = {"param_mib": "param_bytes", "grad_mib": "grad_bytes", "adamw_mib": "adamw_bytes",
            "state_mib": "state_bytes", "baseline_mib": "baseline_bytes", "peak_mib": "peak_bytes",
            "delta_mib": "delta_bytes"}
    return [{**r, **{k: r[v] / MIB for k, v in keys.items()}} for r in rows]


def memory_notes(device: torch.device, rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the memory table's figures mean, honestly."""
    notes = [
        "state = parameters of every network held + gradients + AdamW moments (2 x trainable), from",
        "the tensors: PPO holds policy, reference, critic and reward model and trains policy + critic;",
        "GRPO (reward_source=gold) holds policy and reference and trains the policy only.",
    ]
    if device.type == "cuda":
        notes += ["measured delta = torch.cuda.max_memory_allocated over the k batches minus the",
                  "allocated bytes right before the networks were built: it adds activations, logits,",
                  "the KV cache and temporaries to the state, so its ratio is the one that matters here."]
    else:
        notes += ["measured delta = peak RSS (VmHWM) of a fresh process over the k batches minus its RSS",
                  "right before the networks were built (after imports and data). On CPU with these small",
                  "models the Python/torch runtime baseline (hundreds of MiB) dwarfs the model state, and the",
                  "delta also holds allocator caching, thread-pool and oneDNN scratch buffers and rollout",
                  "temporaries: the measured ratio here says little about the 'GRPO needs about half'",
                  "claim, the state ratio is exact. The state's share of the peak grows with the model size."]
        if any(not r.get("peak_reset", True) for r in rows):
            notes.append("VmHWM could not be reset here: the peak may predate the baseline.")
    notes.append("grads and AdamW are the tensors allocated after the k batches (2 x the parameters that")
    notes.append("get gradients); with equal-size networks the state ratio is (2P + 3P) / (4P + 6P) = 0.5.")
    unused = [r for r in rows if r.get("unused_trainable_bytes")]
    if unused:
        notes.append("trainable but never updated, so no grad and no AdamW state (still held as params): "
                     + ", ".join(f"{r['model']} {r['method']} {r['unused_trainable_bytes'] / 1024:.1f} KiB"
                                 for r in unused)
                     + "; a ScalarHead's LM head is never used, and noisy_top_k router-noise weights are "
                       "idle in the eval-mode RL updates.")
    return notes


# ------------------------------------------------------------------------------- the CLI
QUICK = {"batch": 16, "prompt_len": 8, "new_tokens": 16, "iters": 2, "warmup": 1, "mem_iters": 1}
DEFAULTS = {"batch": 64, "prompt_len": 8, "new_tokens": 32, "iters": 5, "warmup": 1, "mem_iters": 2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset sizes take ``--quick``'s values or the defaults."""
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="model presets from conf/model (default: llama_small moe_small)")
    p.add_argument("--batch", type=int, help="sequences per batch / rollout (default 64; quick 16)")
    p.add_argument("--prompt-len", type=int, help="sampler prompt length (default 8)")
    p.add_argument("--new-tokens", type=int, help="sampler new tokens (default 32; quick 16)")
    p.add_argument("--iters", type=int, help="timed repeats / batches (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls / batches (default 1)")
    p.add_argument("--mem-iters", type=int, help="batches run for the memory peak (default 2; quick 1)")
    p.add_argument("--vocab", type=int, default=512, help="sampler vocabulary size (default 512)")
    p.add_argument("--methods", nargs="+", default=list(methods()), choices=methods(),
                   help="methods timed in the steps section (default: every registered stage)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--minibatch", type=int, help="override PPO/GRPO minibatch_size (default: conf)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, help="task/tokenizer cache (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--_memory-child", dest="memory_child", choices=("ppo", "grpo"),
                   help=argparse.SUPPRESS)
    p.add_argument("--_n-examples", dest="n_examples", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def data_size(args: argparse.Namespace) -> int:
    """Examples per task split: enough distinct batches for the longest run of any section."""
    if args.n_examples:
        return int(args.n_examples)
    return args.batch * (args.warmup + max(args.iters, args.mem_iters))


def _memory_child(args: argparse.Namespace) -> None:
    """Entry of a fresh process measuring one method's memory; prints one MEMORY_MARK line."""
    device = resolve_device(args.device)
    preset = args.models[0]
    with quiet():
        task, tok = prepare_data(data_size(args), args.cache_dir, args.seed)
    row = measure_memory(args.memory_child, model_config(preset, len(tok)), task, tok, args.batch,
                         args.mem_iters, args.seed, device, args.minibatch)
    print(MEMORY_MARK + json.dumps(row), flush=True)


def run_bench(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the chosen sections for every model, printing each table as it is done."""
    device = resolve_device(args.device)
    busy = load_note() if device.type == "cpu" else None
    if busy:
        out(busy + "\n")
    result: dict[str, Any] = {"env": {
        "load_warning": busy, "cpu_count": os.cpu_count(),
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }}
    with contextlib.ExitStack() as stack:
        cache = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="harness-bench-")))
        if "sampler" in args.sections:
            rows = [bench_sampler(model_config(m, args.vocab), args.batch, args.prompt_len,
                                  args.new_tokens, args.iters, args.warmup, args.seed, device)
                    for m in args.models]
            result["sampler"] = rows
            out(format_table("1. Sampler throughput: ours (KV cache) vs transformers.generate",
                             rows, SAMPLER_COLUMNS, sampler_notes(device)) + "\n")
        need_data = {"steps", "memory"} & set(args.sections)
        task = tok = None
        if need_data:
            with quiet():
                task, tok = prepare_data(data_size(args), cache, args.seed)
        if "steps" in args.sections:
            rows = []
            for m in args.models:
                mcfg = model_config(m, len(tok))
                rows += [bench_method_steps(meth, mcfg, task, tok, args.batch, args.iters,
                                            args.warmup, args.seed, device, args.minibatch)
                         for meth in args.methods]
            result["steps"] = rows
            out(format_table("2. Seconds per optimisation step", rows, STEP_COLUMNS,
                             step_notes(device, len(tok))) + "\n")
        if "memory" in args.sections:
            rows = []
            for m in args.models:
                for meth in ("ppo", "grpo"):
                    if device.type == "cuda":
                        rows.append(measure_memory(meth, model_config(m, len(tok)), task, tok,
                                                   args.batch, args.mem_iters, args.seed, device,
                                                   args.minibatch))
                    else:
                        rows.append(memory_in_subprocess(meth, m, args.batch, args.mem_iters,
                                                         args.seed, cache, data_size(args),
                                                         args.minibatch, args.threads))
            ratios = memory_ratios(rows)
            result["memory"], result["memory_ratios"] = rows, ratios
            out(format_table(f"3. Peak memory, PPO vs GRPO at {args.batch} sequences per rollout",
                             memory_table_rows(rows), MEMORY_COLUMNS, memory_notes(device, rows)))
            out("\n" + format_table("3b. GRPO / PPO", ratios, RATIO_COLUMNS) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        out(f"figures written to {args.json}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``python -m harness.bench``: parse the options and run (or serve as a memory child)."""
    for var in OFFLINE_ENV:
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.memory_child:
            if args.cache_dir is None:
                raise SystemExit("--_memory-child needs --cache-dir")
            _memory_child(args)
            return None
        return run_bench(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
