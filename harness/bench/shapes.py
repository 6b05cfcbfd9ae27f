"""What one training batch of a stage is, for the bench's comparable steps.

The bench times and measures every stage at the same number of sequences per batch, so it sizes
each stage's config (:func:`sized`) and says what one batch of it is (:func:`shape`). The stages
know nothing of this: both follow from the stage's ``data`` (``sft`` demonstrations, preference
``pairs``, ``prompts`` for the on-policy methods) and the config's fields (``group_size`` for the
group methods), so a new method whose config follows the conventions of its kind joins the bench
without an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from harness.stage import Stage


@dataclass(frozen=True)
class Shape:
    """One training batch: ``sequences`` forwarded, ``layout`` in words (``"8 prompts x 8"``),
    and for the on-policy methods the optimisation ``passes`` over it and their ``minibatch``."""

    sequences: int
    layout: str
    passes: int | None = None
    minibatch: int | None = None


def group_layout(batch: int, group_size: int) -> tuple[int, int]:
    """(prompts, group size) with prompts * group == ``batch``: the largest group <= ``group_size``
    (the bench's sizes for the group methods)."""
    g = min(group_size, batch)
    while g > 2 and batch % g:
        g -= 1
    if g < 2 or batch % g:
        raise ValueError(f"batch={batch}: a group method needs an even batch of >= 2 sequences "
                         f"(prompts x group_size with group_size >= 2)")
    return batch // g, g


def sized(stage: Stage, cfg: Any, batch: int, n_batches: int) -> Any:
    """``cfg`` with only its sizes changed, so one training batch forwards ``batch`` sequences
    and training lasts ``n_batches`` batches: ``batch`` demonstrations (SFT), ``batch // 2``
    pairs (reward model, DPO), ``batch`` prompts (PPO) or ``batch / group`` prompts of a group
    (:func:`group_layout`; GRPO, RLOO, online DPO)."""
    if stage.data == "sft":
        return replace(cfg, batch_size=batch, max_steps=n_batches)
    if stage.data == "pairs":
        return replace(cfg, batch_size=max(1, batch // 2), max_steps=n_batches)
    if hasattr(cfg, "group_size"):
        prompts, group = group_layout(batch, cfg.group_size)
        return replace(cfg, n_iterations=n_batches, group_size=group,
                       rollout=replace(cfg.rollout, prompts_per_batch=prompts))
    return replace(cfg, n_iterations=n_batches, rollout=replace(cfg.rollout, prompts_per_batch=batch))


def shape(stage: Stage, cfg: Any) -> Shape:
    """What one training batch of ``stage`` under ``cfg`` is (see :class:`Shape`)."""
    if stage.data == "sft":
        return Shape(cfg.batch_size, f"{cfg.batch_size} demos")
    if stage.data == "pairs":
        return Shape(2 * cfg.batch_size, f"{cfg.batch_size} pairs")
    prompts = cfg.rollout.prompts_per_batch
    if hasattr(cfg, "group_size"):
        return Shape(prompts * cfg.group_size, f"{prompts} prompts x {cfg.group_size}",
                     cfg.update_epochs, cfg.minibatch_size)
    return Shape(prompts, f"{prompts} prompts", cfg.update_epochs, cfg.minibatch_size)


__all__ = ["Shape", "group_layout", "shape", "sized"]
