"""3. Peak memory of PPO against GRPO at the same number of sequences per rollout."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.bench.common import MEMORY_MARK, MIB, Column, quiet, resolve_device, sync, tensor_bytes
from harness.bench.steps import build_method, fit
from harness.config import ModelConfig


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
    the ``optimizers``), grads and AdamW are the tensors actually allocated instead: a trainable
    parameter that never gets a gradient has neither, and ``unused_trainable_bytes`` says how much
    that is (a :class:`ScalarHead` freezes its unused LM head, so it is not trainable at all).
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
        "model": model_cfg.name, "method": method, "layout": setup.shape.layout,
        "sequences": setup.shape.sequences, "minibatch": setup.shape.minibatch, "iters": iters,
        "device": str(device), "measure": "cuda max_memory_allocated" if device.type == "cuda"
        else "peak RSS (VmHWM)", "baseline_bytes": base["bytes"], "peak_bytes": peak,
        "delta_bytes": max(0, peak - base["bytes"]), "peak_reset": base["peak_reset"], **state,
    }


def memory_in_subprocess(method: str, preset: str, batch: int, iters: int, seed: int,
                         cache_dir: Path, n_examples: int, minibatch: int | None = None,
                         threads: int | None = None, lora: int = 0) -> dict[str, Any]:
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
    if lora:
        cmd += ["--lora", str(lora)]
    root = str(Path(__file__).resolve().parents[2])
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


