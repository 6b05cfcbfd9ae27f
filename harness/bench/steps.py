"""2. Seconds per optimisation step of every registered stage, built as a run builds it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from harness.bench.common import Column, compose_config, median, quiet, resolve_device, sync
from harness.bench.shapes import Shape, shape, sized
from harness.config import ModelConfig, OptimConfig
from harness.models.llama import ScalarHead
from harness.settings import validate
from harness.stage import Fit
from harness.util.step_profile import PHASES, build_profiler, counts, phase_seconds, recorded


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


def share_prompt_overrides(method: str, on: bool) -> list[str]:
    """The Hydra override that makes a benched DPO stage score each pair, a GRPO or RLOO stage
    each group, with its prompt once (``method.share_prompt``); nothing for other methods or
    when ``on`` is false."""
    return ["method.share_prompt=true"] if on and method in ("dpo", "grpo", "rloo") else []


def rollout_overrides(method: str, new_tokens: int | None) -> list[str]:
    """The Hydra override that makes a benched on-policy stage (one whose config has a
    ``rollout``: PPO, GRPO, RLOO) sample ``new_tokens`` tokens per response; nothing for other
    methods or when ``new_tokens`` is None (the method config's ``max_new_tokens``)."""
    from harness.registry import get_stage

    if new_tokens is None:
        return []
    fields = {f.name for f in dataclasses.fields(get_stage(method).config)}
    return [f"method.rollout.max_new_tokens={int(new_tokens)}"] if "rollout" in fields else []


@dataclasses.dataclass
class Setup(Fit):
    """A stage ready to train, as the bench uses it: its :class:`~harness.stage.Fit` and what one
    training batch is (``shape``: :class:`~harness.bench.shapes.Shape`)."""

    shape: Shape


#: on-policy methods that step only on strictly ranked pairs: timed on the reward model's scores
LEARNS_FROM_RANKED_PAIRS = ("online_dpo",)


def build_method(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
                 n_batches: int, seed: int = 0, device: torch.device | None = None,
                 minibatch: int | None = None,
                 before_models: Callable[[], None] | None = None,
                 overrides: Sequence[str] = (), fused_adamw: bool = False) -> Setup:
    """The stage's :class:`~harness.stage.Fit` as the pipeline builds it, from random-init inputs,
    with what one of its batches is (a :class:`Setup`).

    The stage's config is its default (``conf/``, composed with the Hydra ``overrides``, e.g.
    ``method.rollout.max_new_tokens=16``) with only its sizes changed
    (:func:`harness.bench.shapes.sized`: ``batch`` sequences per batch, ``n_batches`` batches)
    and, if given, its ``minibatch_size``; ``fused_adamw`` turns on ``fused`` in each of its
    optimiser sections (``optim``, PPO's ``critic_optim``); ``before_models()`` runs before any
    network is built.
    The stages it needs (the SFT base, the reward model) are random-init networks of the preset.
    """
    from harness.cache import StageRecord
    from harness.registry import get_stage
    from harness.stage import Built, StageContext

    device = device or resolve_device()
    if method in LEARNS_FROM_RANKED_PAIRS and not any(
            o.split("=", 1)[0].lstrip("+") in ("track", "method.reward_source") for o in overrides):
        # a random-init policy earns gold reward 0 on every response: only ties, no pair, no
        # step to time; the random reward model ranks every group
        overrides = [*overrides, "track=preferences"]
    settings = validate(compose_config([f"method={method}", *overrides]))
    stage = get_stage(method)
    cfg = sized(stage, settings.stage_config(method), batch, n_batches)
    if minibatch is not None and hasattr(cfg, "minibatch_size"):
        cfg = dataclasses.replace(cfg, minibatch_size=minibatch)
    if fused_adamw:
        cfg = dataclasses.replace(cfg, **{
            f.name: dataclasses.replace(getattr(cfg, f.name), fused=True)
            for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), OptimConfig)})
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
        fit = stage.build(ctx, cfg, inputs)
    return Setup(**{f.name: getattr(fit, f.name) for f in dataclasses.fields(fit)},
                 shape=shape(stage, cfg))


class StepTimer(L.Callback):
    """Wall time of every training batch (``on_train_batch_start`` -> ``on_train_batch_end``) and
    the number of steps of the first optimiser (the policy's, or the reward model's) in it;
    ``marks``: the trainer's profiler durations counted at the start of every batch
    (:func:`harness.util.step_profile.counts`), so a phase split can leave the warm-up out."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.opt_steps: list[int] = []
        self.marks: list[dict[str, int]] = []
        self._t0 = 0.0
        self._count = 0
        self._handle: Any = None

    def _on_step(self, *_: Any) -> None:
        self._count += 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_post_hook(self._on_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        durations = recorded(trainer.profiler)
        if durations is not None:
            self.marks.append(counts(durations))
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
        callbacks: Sequence[L.Callback] = (), precision: str = "32-true",
        profiler: Any = None) -> L.Trainer:
    """Train a stage's :class:`~harness.stage.Fit` for ``n_batches`` batches (plain Trainer at
    Lightning's ``precision``, with Lightning's ``profiler`` if given)."""
    trainer = L.Trainer(
        profiler=profiler,
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
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


def precompute_reference(module: Any, device: torch.device) -> None:
    """Score every pair's reference log-probs before the clock starts (DPO's ``ref``,
    :class:`harness.methods.dpo.stage.ReferenceLogps`, otherwise scores them when a batch first needs
    them): TRL's ``precompute_ref_log_probs=True`` does the same before its training loop."""
    ref = getattr(module, "ref", None)
    if ref is not None:
        ref.lookup(torch.arange(len(ref.table), device=device))


def bench_method_steps(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
                       iters: int = 5, warmup: int = 1, seed: int = 0,
                       device: torch.device | None = None, minibatch: int | None = None,
                       root: Path | None = None, overrides: Sequence[str] = (),
                       before_fit: Callable[[Any], None] | None = None,
                       fused_adamw: bool = False, precision: str = "32-true",
                       profile: bool = False) -> dict[str, Any]:
    """Median seconds per training batch of ``method`` over ``iters`` batches after ``warmup``.

    ``overrides``: Hydra overrides of the method's config, ``fused_adamw``: its optimisers fused
    (:func:`build_method`); ``precision``: the Trainer's (``trainer.precision``);
    ``before_fit(setup)`` sees the built :class:`~harness.stage.Fit` before it trains (the
    comparison with TRL exports the initial policy there); ``profile``: Lightning's
    ``SimpleProfiler`` records the method's phases, and ``phases`` holds their seconds per batch
    over the timed batches (:func:`harness.util.step_profile.phase_seconds`).
    """
    device = device or resolve_device()
    n = warmup + iters
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        setup = build_method(method, model_cfg, task, tok, batch, n, seed, device, minibatch,
                             overrides=overrides, fused_adamw=fused_adamw)
        if before_fit is not None:
            before_fit(setup)
        timer = StepTimer(device)
        profiler = build_profiler("simple") if profile else None
        fit(setup, n, device, Path(root or tmp), [timer], precision, profiler)
    if len(timer.times) != n:
        raise RuntimeError(f"{method}: {len(timer.times)} batches ran, expected {n}")
    times, steps = timer.times[warmup:], timer.opt_steps[warmup:]
    s_batch = median(times)
    opt = int(round(median(steps)))
    if opt < 1:
        raise RuntimeError(f"{method}: no optimiser step was taken in a batch")
    phases = (phase_seconds(recorded(profiler), timer.marks[warmup])
              if profiler is not None else None)
    return {
        "model": model_cfg.name, "vocab": model_cfg.vocab_size, "method": method,
        "layout": setup.shape.layout,
        "sequences": setup.shape.sequences, "minibatch": setup.shape.minibatch,
        "passes": setup.shape.passes, "s_per_batch": s_batch, "opt_steps_per_batch": opt,
        # tokens trained on per batch (attention-mask tokens, summed over optimisation passes)
        "tokens_per_batch": setup.module.tokens_trained / n,
        "s_per_opt_step": s_batch / opt, "seq_per_s": setup.shape.sequences / s_batch,
        "times": times, "iters": iters, "device": str(device), "precision": precision,
        "phases": phases,
    }


STEP_COLUMNS: list[Column] = [
    ("model", "model", ""), ("vocab", "vocab", "d"), ("method", "method", ""),
    ("precision", "precision", ""), ("layout", "one batch", ""),
    ("sequences", "seqs", "d"), ("minibatch", "minibatch", "d"), ("passes", "passes", "d"),
    ("s_per_batch", "s/batch", ".4f"), ("opt_steps_per_batch", "opt steps/batch", "d"),
    ("s_per_opt_step", "s/opt step", ".4f"), ("seq_per_s", "seqs/s", ",.1f"),
]


def step_notes(device: torch.device, vocab: int) -> list[str]:
    """What the step table's figures mean."""
    return [
        "s/batch: median wall time of one Lightning training batch (on_train_batch_start -> _end),",
        "after the warm-up batch(es); includes the method's logging. Random-init policy, arith task,",
        f"token ids from its {vocab}-token tokenizer (vocab: the model's; a pretrained preset keeps its",
        "checkpoint's); each stage's default config with only its sizes set (Stage.sized).",
        "sft/rm/dpo: one batch = one optimiser step (rm/dpo: B/2 pairs = B sequences; DPO scores the",
        "reference log-probs of a pair when a batch first needs it, inside the timed batches).",
        "ppo/grpo/rloo: one batch = one rollout",
        "(sampling + reference and reward scoring + every optimisation pass over it); 'opt steps' counts",
        "the policy optimiser's steps (PPO steps its critic alongside); s/opt step = s/batch / opt steps.",
        f"device {device}, torch threads {torch.get_num_threads()}.",
    ]


def phase_table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps rows that carry a phase split, as table rows: model, method, s/batch, and each
    phase as ``seconds (share of the batch)``; a phase the method does not run shows ``-``."""
    out = []
    for r in rows:
        split = r.get("phases")
        if not split:
            continue
        row: dict[str, Any] = {"model": r["model"], "method": r["method"],
                               "layout": r["layout"], "batch": f"{split['batch']:.4f}"}
        for name in (*PHASES, "other"):
            if name in split:
                row[name] = f"{split[name]:.4f} ({100 * split[name] / split['batch']:.0f}%)"
        out.append(row)
    return out


PHASE_COLUMNS: list[Column] = [
    ("model", "model", ""), ("method", "method", ""), ("layout", "one batch", ""),
    ("batch", "s/batch", ""), *[(p, p, "") for p in (*PHASES, "other")],
]


def phase_notes() -> list[str]:
    """What the phase table's figures mean."""
    return [
        "Seconds per training batch of each phase (share of the batch), summed over the timed",
        "batches by Lightning's SimpleProfiler around the regions the methods mark",
        "(harness.util.step_profile): sample = KV-cached sampling, reward = decoding + scoring,",
        "reference = the frozen reference's log-probs, value = the critic's values before the",
        "update, forward = the trained networks' forward passes and losses (SFT/RM/DPO: the whole",
        "training_step with its logging, and zero_grad), backward, optimizer = clipping + AdamW +",
        "scheduler; other = the batch (run_training_batch) minus the phases: Lightning's loop,",
        "on-policy logging, advantages, Python between the phases. The profiler's own calls add a",
        "little to every phase, so s/batch here runs slightly above the steps table's.",
    ]
