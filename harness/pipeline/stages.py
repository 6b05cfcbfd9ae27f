"""The stage runner: a stage and every stage it builds on, each from the cache (a base stage
trained before) or trained now; each :class:`~harness.stage.Built` it returns carries what the
stage cost and the curves its training recorded.

Base stages are cached under keys hashed from exactly what decides them (:func:`decides`), so
every method of a sweep starts from the same SFT base and reward model.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L

from harness import resume
from harness.cache import StageCache, StageRecord, stage_key
from harness.config import OptimConfig
from harness.evaluation.cost import StageCost, StageMeter
from harness.pipeline.evaluation import held_out_curve
from harness.pipeline.trainer import HistoryRecorder, build_trainer
from harness.registry import get_stage
from harness.settings import Settings
from harness.stage import Built, Fit, Stage, StageContext, set_gradient_checkpointing
from harness.tracking.loggers import RunLoggers
from harness.util.atomic import write_json
from harness.util.distributed import broadcast_from_rank_zero, is_rank_zero
from harness.util.seeding import seed_stage
from harness.util.step_profile import BATCH_ACTION, format_split, phase_seconds, recorded

log = logging.getLogger("harness")


def key_config(cfg: Any) -> dict[str, Any]:
    """A stage config as its cache key reads it: ``asdict``, with every optimiser section
    (``optim``, PPO's ``critic_optim``) as :meth:`OptimConfig.key_fields` gives it."""
    out = asdict(cfg)
    for name, value in vars(cfg).items():
        if isinstance(value, OptimConfig):
            out[name] = value.key_fields()
    return out


def decides(ctx: StageContext, settings: Settings, cfg: Any,
            inputs: dict[str, Built]) -> dict[str, Any]:
    """What decides a base stage's output (its cache key's input): the backbone, the data, the
    stage's config ``cfg``, the seed, the numerics (precision, devices), and the stages it builds
    on (``inputs``: key and training id of each)."""
    # a pretrained model is identified by its weights, not by where they were found (and a
    # model trained from scratch keeps the key it had before pretrained models existed)
    model = ctx.model_cfg.key_fields()
    if ctx.weights_sha256 is not None:
        model["pretrained_sha256"] = ctx.weights_sha256
    # prompt_format enters only when it changes the prompts, so raw runs keep their keys
    dataset = {k: v for k, v in asdict(settings.dataset).items() if k != "prompt_format"}
    if ctx.prompt_format != "raw":
        dataset["prompt_format"] = ctx.prompt_format
    t = settings.trainer
    return {"model": model, "dataset": dataset,
            "data_fingerprint": ctx.task.fingerprint, "config": key_config(cfg),
            "seed": settings.seed, "precision": t.precision, "devices": t.devices,
            "inputs": {n: [b.record.key, b.record.trained_id] for n, b in inputs.items()}}


class StageRunner:
    """Obtains stages for one run: from the cache, or trained with a Lightning trainer, the run's
    loggers and a resume checkpoint; every stage it trains is metered (:class:`StageMeter`).

    ``resolved``: the run's resolved config, saved with each checkpoint.
    """

    def __init__(self, ctx: StageContext, settings: Settings, resolved: dict[str, Any],
                 run_dir: Path, cache: StageCache, loggers: RunLoggers) -> None:
        self.ctx, self.settings, self.resolved = ctx, settings, resolved
        self.run_dir, self.cache, self.loggers = run_dir, cache, loggers

    def obtain(self, name: str, into: dict[str, Built] | None = None) -> Built:
        """Stage ``name`` with everything it needs: needed stages first (recursively), then the
        stage itself — from the cache for a base stage trained before, else trained now.

        ``into`` collects every stage obtained, by name, in the order they finished (a stage
        already there is not obtained again); the caller keeps it, so a run that fails in a later
        stage still knows what the earlier ones cost.
        """
        into = {} if into is None else into
        if name in into:
            return into[name]
        stage = get_stage(name)
        cfg = self.settings.stage_config(name)
        inputs = {need: self.obtain(need, into) for need in stage.needs(cfg)}
        built = (self.cached(stage, cfg, inputs) if stage.base
                 else self.train(stage, cfg, inputs, key=None, decided={}))
        into[name] = built
        return built

    def cached(self, stage: Stage, cfg: Any, inputs: dict[str, Built]) -> Built:
        """The base stage under its key: loaded if cached, else trained and committed.

        A lock per key makes parallel sweep jobs train a stage once and share it.
        """
        decided = decides(self.ctx, self.settings, cfg, inputs)
        key = stage_key(stage.name, decided)
        seed_stage(self.settings.seed)  # an untrained stage may still draw (an upcycled model's routers)
        model = stage.untrained(self.ctx, cfg)
        if model is not None:  # validate() allows it only with a pretrained model
            folder = self.ctx.pretrained
            log.info("%s stage: not trained (%s.enabled=false): the pretrained model %s is the base",
                     stage.name.upper(), stage.name, folder)
            record = StageRecord(key=key, path=folder, cached=True, decides=decided,
                                 trained_id=self.ctx.weights_sha256)
            return Built(stage.name, cfg, model, record, folder, cost=StageCost(cached=True))
        with self.cache.lock(key):
            found = None if self.settings.force_retrain else self.cache.load(key)
            model = None
            if found is not None:
                try:
                    model = stage.load(found.checkpoint)
                except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is retrained
                    log.warning("cached stage %s at %s cannot be loaded (%s: %s); training it again",
                                key, found.path, type(exc).__name__, exc)
                    self.cache.uncommit(key)
            if found is not None and model is not None:
                log.info("%s stage: reusing cached %s (%s)", stage.name.upper(), key, found.path)
                m = found.metrics
                cost = StageCost(wall_s=m.get("cost/train_wall_s", float("nan")),
                                 peak_mem_mb=m.get("cost/train_peak_mem_mb", float("nan")),
                                 cached=True, extra=_throughput(m))
                return Built(stage.name, cfg, model, found, found.checkpoint, cost=cost)
            built = self.train(stage, cfg, inputs, key, decided)
            built.record.metrics.update({"cost/train_wall_s": built.cost.wall_s,
                                         "cost/train_peak_mem_mb": built.cost.peak_mem_mb})
            # one id on every rank: the stages built on this one put it in their keys
            built.record.trained_id = broadcast_from_rank_zero(uuid.uuid4().hex)
            self.cache.commit(built.record)
            return built

    def train(self, stage: Stage, cfg: Any, inputs: dict[str, Built], key: str | None,
              decided: dict) -> Built:
        """Build ``stage`` (global RNGs seeded first), fit it, save its model; metered. The log
        says when it starts (with its cache key, for a base stage) and when it is done."""
        log.info("%s stage: training%s", stage.name.upper(), f" {key}" if key else "")
        with StageMeter() as meter:
            seed_stage(self.settings.seed)
            job = stage.build(self.ctx, cfg, inputs)
            set_gradient_checkpointing(job.trainable, self.ctx.model_cfg.gradient_checkpointing)
            path = self.cache.path(key) if key else self.run_dir / stage.name
            # keyed by what decides the stage, so the same command finds it from a new run dir
            resume_key = key or stage_key(stage.name, decides(self.ctx, self.settings, cfg, inputs))
            record, history = self.fit(stage, job, path, key, decided,
                                       self.cache.root / "resume" / resume_key)
            checkpoint = record.checkpoint if key else self.run_dir / "checkpoint"
            if is_rank_zero():  # the other ranks of a DDP run hold the same weights
                stage.save(job.model, checkpoint, self.ctx.tokenizer, self.resolved)
        cost = meter.cost
        cost.extra = _throughput(record.metrics)
        cost.wall_s -= cost.extra.get("curve_s", 0.0)  # the held-out curve is evaluation's
        self.loggers.close(stage.name)
        log.info("%s stage: trained in %.1f s", stage.name.upper(), cost.wall_s)
        model = job.model
        if stage.base:  # what later stages build on is what the cache would give them: merged,
            from harness.models.lora import has_lora, merged

            model = merged(model) if has_lora(model) else model
            # and in eval mode, as a loaded checkpoint is: Lightning keeps a module's mode, so a
            # base left in training mode would train the next stage with noisy MoE routing when
            # its base was trained in this process and without it when the base was cached
            model.eval()
        return Built(stage.name, cfg, model, record, checkpoint, cost=cost, history=history)

    def fit(self, stage: Stage, job: Fit, path: Path, key: str | None, decided: dict,
            resume_dir: Path) -> tuple[StageRecord, dict[str, list[list[float]]]]:
        """Train ``job.module`` with the stage's logger and budget; its record (not committed) and
        its training curves.

        Saves a resume checkpoint in ``resume_dir`` every ``trainer.resume_every`` batches and,
        when a killed run left one there, resumes from it (:mod:`harness.resume`); the folder is
        removed once the stage has trained.
        """
        s = self.settings
        logger = self.loggers.open(stage.name)
        steps = job.budget.steps
        curve = (held_out_curve(self.ctx.task, self.ctx.tokenizer, s.eval, steps, s.eval_max_len)
                 if stage.produces_policy and steps > 0 else None)
        if s.force_retrain and is_rank_zero():
            resume.discard(resume_dir)
        ckpt, resumed_at = resume.resumable(resume_dir), None
        if ckpt is not None:
            try:
                resumed_at = resume.checkpoint_batch(ckpt)
            except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is trained over
                log.warning("%s stage: resume checkpoint %s cannot be read (%s: %s); training from "
                            "the start", stage.name.upper(), ckpt, type(exc).__name__, exc)
                ckpt = None
        if ckpt is not None:
            log.info("%s stage: resuming from %s (batch %d of %d)", stage.name.upper(), ckpt,
                     resumed_at, steps)
        saver = resume.ResumeCheckpoint(resume_dir, s.trainer.resume_every, total=steps)
        trainer = build_trainer(s.trainer, logger, path / "lightning", self.run_dir, job.budget,
                                extra_callbacks=(*([curve] if curve else []), saver),
                                stage=stage.name)
        t0 = time.perf_counter()
        ckpt_path = str(ckpt) if ckpt is not None else None
        if isinstance(job.data, L.LightningDataModule):
            trainer.fit(job.module, datamodule=job.data, ckpt_path=ckpt_path)
        else:
            trainer.fit(job.module, train_dataloaders=job.data, ckpt_path=ckpt_path)
        if is_rank_zero():
            resume.discard(resume_dir)
        fit_s = time.perf_counter() - t0 - (curve.seconds if curve else 0.0)
        self.report_phases(stage.name, trainer)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if resumed_at is not None:
            metrics["train/resumed_from_batch"] = float(resumed_at)
        metrics.update(job.module.throughput(fit_s))
        metrics.update(job.module.final_metrics())
        history: dict[str, list[list[float]]] = {}
        if curve is not None:
            metrics["cost/curve_s"] = curve.seconds
            history["eval/gold_reward"] = curve.points
        history.update(next(c for c in trainer.callbacks if isinstance(c, HistoryRecorder)).history)
        record = StageRecord(key=key or stage.name, path=path, metrics=metrics, decides=decided)
        return record, history

    def report_phases(self, stage: str, trainer: L.Trainer) -> None:
        """With ``trainer.profiler=simple``: the stage's seconds per training batch by phase
        (:mod:`harness.util.step_profile`) in the log, in ``<run dir>/profile/<stage>-phases.json`` and,
        as ``profile/<phase>_s``, in the stage's logger (its W&B run's summary)."""
        durations = recorded(trainer.profiler)
        if not durations or not is_rank_zero():
            return
        try:
            split = phase_seconds(durations)
        except ValueError:  # no batch ran (a resumed stage that had finished)
            return
        log.info("%s", format_split(split, f"{stage.upper()} stage: seconds per training batch "
                                           f"by phase ({BATCH_ACTION} = batch)"))
        write_json(self.run_dir / "profile" / f"{stage}-phases.json", split)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"profile/{k}_s": v for k, v in split.items()},
                                       step=trainer.global_step)
            trainer.logger.save()


def _throughput(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's token counts and rates (``AlignmentModule.throughput``), without the prefix."""
    names = ("train_tokens", "train_tokens_per_s", "gen_tokens", "gen_tokens_per_s", "curve_s")
    return {n: metrics[f"cost/{n}"] for n in names if f"cost/{n}" in metrics}
