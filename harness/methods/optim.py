"""AdamW with linear warm-up and cosine decay, shared by every method."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from harness.config import OptimConfig


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: ``step/warmup`` during warm-up, then ``min + (1-min) (1+cos(pi p))/2``, p in [0,1]."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and 1-D gains get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: Iterable[nn.Module], cfg: OptimConfig, max_steps: int) -> dict:
    """Lightning ``configure_optimizers`` dict: AdamW + per-step warm-up/cosine scheduler."""
    # PyTorch's default (per-tensor) AdamW unless ``cfg.fused``: the fused kernel is faster but
    # rounds differently, and arith's SFT (a task with a phase transition) is sensitive to that
    # (results/FINDINGS.md), so it is not switched on silently.
    opt = torch.optim.AdamW(param_groups(modules, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), fused=True if cfg.fused else None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
