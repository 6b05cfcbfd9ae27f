"""One run, top to bottom (after torchtune's recipes):

    validate -> task + tokenizer -> the stages the method needs (base stages cached)
             -> the method's stage -> evaluation (gold reward, win rate and KL against the
             reference) -> summary.json and a results record

Every stage is built through the stage interface (:mod:`harness.stage`) from the registry
(:mod:`harness.registry`); nothing here knows a method by name. Base stages (the SFT base, the
reward model) are cached under keys hashed from exactly what decides them (:mod:`harness.cache`),
so every method of a sweep starts from the same reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness import resume
from harness.atomic import check_writable, write_json
from harness.cache import StageCache, StageRecord, stage_key
from harness.config import ConfigError, OptimConfig, TrainerConfig
from harness.console import quiet_console
from harness.data.prompt_format import FormattedTask, effective_format
from harness.data.tasks import build_task
from harness.data.tokenizer import load_or_build_tokenizer
from harness.distributed import broadcast_from_rank_zero, is_rank_zero
from harness.evaluation.cost import StageCost, StageMeter
from harness.evaluation.curves import HeldOutGoldCurve
from harness.evaluation.drift import sequence_kl
from harness.evaluation.gold import gold_eval, win_rate
from harness.evaluation.platform import platform_info
from harness.evaluation.records import finished_record, new_run_id
from harness.models.llama import CausalLM
from harness.registry import get_stage
from harness.seeding import seed_stage, stream_seed
from harness.settings import Settings, validate
from harness.stage import Budget, Built, Fit, Stage, StageContext, set_gradient_checkpointing
from harness.step_profile import BATCH_ACTION, build_profiler, format_split, phase_seconds, recorded
from harness.tracking.loggers import RunLoggers
from harness.tracking.progress import stage_progress_bar

log = logging.getLogger("harness")


def build_trainer(trainer: TrainerConfig, logger, ckpt_dir: Path, run_dir: Path, budget: Budget,
                  extra_callbacks: tuple = (), stage: str = "stage") -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` group plus the stage's budget; with
    ``trainer.profiler``, that profiler writing to ``<run_dir>/profile/fit-<stage>.txt``."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks: list = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0),
                       HistoryRecorder(), *extra_callbacks]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if trainer.enable_progress_bar:
        callbacks.append(stage_progress_bar(stage))
    kwargs: dict[str, Any] = {}
    if budget.val_every is not None:
        kwargs.update(val_check_interval=budget.val_every, check_val_every_n_epoch=None)
    if budget.limit_train_batches is not None:
        kwargs.update(limit_train_batches=budget.limit_train_batches, max_epochs=1,
                      limit_val_batches=0)
    trainer_kwargs = trainer.kwargs()
    if budget.log_every_n_steps is not None:
        trainer_kwargs["log_every_n_steps"] = budget.log_every_n_steps
    profiler = build_profiler(trainer.profiler, run_dir / "profile", stage)
    if profiler is not None:
        kwargs["profiler"] = profiler
    return L.Trainer(**trainer_kwargs, max_steps=budget.max_steps,
                     gradient_clip_val=budget.grad_clip or None,
                     logger=logger if logger is not None else False, callbacks=callbacks,
                     default_root_dir=str(run_dir), **kwargs)


class HistoryRecorder(L.Callback):
    """Keeps the training curves the leaderboard plots (``[[step, value], ...]`` per metric).

    ``step`` counts the stage's training steps (Lightning batches) across epochs.
    """

    KEYS = ("train/loss", "train/reward", "train/kl", "train/rewards_margin")
    VAL_KEYS = ("val/loss", "val/rewards_acc")  # at each validation

    def __init__(self) -> None:
        self.history: dict[str, list[list[float]]] = {}
        self._step = 0

    def state_dict(self) -> dict[str, Any]:  # kept in resume checkpoints
        return {"history": self.history, "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self._step = state_dict["history"], state_dict["step"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, self.KEYS)
        self._step += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, self.VAL_KEYS)

    def _record(self, trainer, keys: tuple[str, ...]) -> None:
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append([float(self._step), float(value)])


def key_config(cfg: Any) -> dict[str, Any]:
    """A stage config as its cache key reads it: ``asdict``, with every optimiser section
    (``optim``, PPO's ``critic_optim``) as :meth:`OptimConfig.key_fields` gives it."""
    out = asdict(cfg)
    for name, value in vars(cfg).items():
        if isinstance(value, OptimConfig):
            out[name] = value.key_fields()
    return out


class Run:
    """The state of one run: its settings, the stage cache, the task and tokenizer, the stages
    finished so far, what each cost, and where things go."""

    def __init__(self, settings: Settings, resolved: dict[str, Any], run_dir: Path) -> None:
        self.s = settings
        self.cfg = resolved  # the resolved config as a dict: checkpoints and loggers carry it
        self.run_dir = run_dir
        #: the training curves of each stage fitted in this run (by stage name); the summary keeps
        #: the final stage's, so it does not depend on which base stages came from the cache
        self.histories: dict[str, dict[str, list[list[float]]]] = {}
        #: what each stage of this run spent (cached stages: what they spent when trained)
        self.costs: dict[str, StageCost] = {}
        #: token counts, rates and curve time of each stage fitted in this run (by stage name)
        self.fitted: dict[str, dict[str, float]] = {}
        self.built: dict[str, Built] = {}
        self.cache = StageCache(Path(to_absolute_path(settings.cache_dir)))
        self.loggers = RunLoggers(resolved, run_dir, settings.method_name)
        task = build_task(settings.dataset, cache_dir=self.cache.root / "data")
        model_cfg = settings.model
        #: a pretrained checkpoint's folder and weights sha256 (harness.models.pretrained)
        self.pretrained: tuple[Path, str] | None = None
        if model_cfg.pretrained is not None:
            from harness.models.pretrained import pretrained_tokenizer, resolve, weights_identity

            folder = resolve(model_cfg.pretrained, model_cfg.revision, self.cache.root)
            self.pretrained = (folder, weights_identity(folder))
            tokenizer = pretrained_tokenizer(folder, model_cfg.max_seq_len)
        else:
            tokenizer = load_or_build_tokenizer(task, resolved["dataset"],
                                                self.cache.root / "tokenizers",
                                                model_max_length=model_cfg.max_seq_len)
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = len(tokenizer)
        elif model_cfg.pretrained is None and model_cfg.vocab_size < len(tokenizer):
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size}: smaller than the "
                              f"tokenizer's {len(tokenizer)} tokens (null takes the tokenizer's)")
        #: the prompt format in effect (``auto`` resolved for the tokenizer)
        try:
            self.prompt_format = effective_format(settings.dataset.prompt_format, tokenizer)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.prompt_format != "raw":
            task = FormattedTask(task, self.prompt_format, tokenizer)
        get_stage(settings.method_name).check_model(settings.stage_config(settings.method_name),
                                                    model_cfg)
        self.ctx = StageContext(task=task, tokenizer=tokenizer, model_cfg=model_cfg,
                                seed=settings.seed,
                                pretrained=self.pretrained[0] if self.pretrained else None)

    @property
    def task(self):
        return self.ctx.task

    def check_data(self, name: str) -> None:
        """Read the training data of stage ``name`` and every stage it builds on, so bad data
        (a :class:`~harness.data.errors.DataError` naming file, row and column) stops the run
        before any stage trains."""
        todo, seen = [name], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            stage = get_stage(n)
            todo += stage.needs(self.s.stage_config(n))
            if stage.data == "pairs":
                self.task.preference_dataset("train")
            elif stage.data == "sft":
                self.task.sft_dataset("train")

    @property
    def tokenizer(self):
        return self.ctx.tokenizer

    # ---------------------------------------------------------------- stages
    def obtain(self, name: str) -> Built:
        """Stage ``name`` with everything it needs: needed stages first (recursively), then the
        stage itself — from the cache for a base stage trained before, else trained now."""
        if name in self.built:
            return self.built[name]
        stage = get_stage(name)
        cfg = self.s.stage_config(name)
        inputs = {need: self.obtain(need) for need in stage.needs(cfg)}
        built = (self.cached(stage, cfg, inputs) if stage.base
                 else self.train(stage, cfg, inputs, key=None, decides={}))
        self.built[name] = built
        return built

    def decides(self, stage: Stage, cfg: Any, inputs: dict[str, Built]) -> dict[str, Any]:
        """What decides a base stage's output (its cache key's input): the backbone, the data, the
        stage's config, the seed, the numerics, and the stages it builds on (key and training id)."""
        t = self.cfg["trainer"]
        # a pretrained model is identified by its weights, not by where they were found (and a
        # model trained from scratch keeps the key it had before pretrained models existed)
        model = self.s.model.key_fields()
        if self.pretrained is not None:
            model["pretrained_sha256"] = self.pretrained[1]
        # prompt_format enters only when it changes the prompts, so raw runs keep their keys
        dataset = {k: v for k, v in self.cfg["dataset"].items() if k != "prompt_format"}
        if self.prompt_format != "raw":
            dataset["prompt_format"] = self.prompt_format
        return {"model": model, "dataset": dataset,
                "data_fingerprint": self.task.fingerprint, "config": key_config(cfg),
                "seed": self.s.seed, "precision": t["precision"], "devices": t["devices"],
                "inputs": {n: [b.record.key, b.record.trained_id] for n, b in inputs.items()}}

    def cached(self, stage: Stage, cfg: Any, inputs: dict[str, Built]) -> Built:
        """The base stage under its key: loaded if cached, else trained and committed.

        A lock per key makes parallel sweep jobs train a stage once and share it.
        """
        decides = self.decides(stage, cfg, inputs)
        key = stage_key(stage.name, decides)
        seed_stage(self.s.seed)  # an untrained stage may still draw (an upcycled model's routers)
        model = stage.untrained(self.ctx, cfg)
        if model is not None:  # validate() allows it only with a pretrained model
            folder, sha = self.pretrained
            log.info("%s stage: not trained (%s.enabled=false): the pretrained model %s is the base",
                     stage.name.upper(), stage.name, folder)
            self.costs[stage.name] = StageCost(cached=True)
            record = StageRecord(key=key, path=folder, cached=True, decides=decides, trained_id=sha)
            return Built(stage.name, cfg, model, record, folder)
        with self.cache.lock(key):
            found = None if self.s.force_retrain else self.cache.load(key)
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
                self.costs[stage.name] = StageCost(
                    wall_s=m.get("cost/train_wall_s", float("nan")),
                    peak_mem_mb=m.get("cost/train_peak_mem_mb", float("nan")),
                    cached=True, extra=_throughput(m))
                return Built(stage.name, cfg, model, found, found.checkpoint)
            built = self.train(stage, cfg, inputs, key, decides)
            cost = self.costs[stage.name]
            built.record.metrics.update({"cost/train_wall_s": cost.wall_s,
                                         "cost/train_peak_mem_mb": cost.peak_mem_mb})
            # one id on every rank: the stages built on this one put it in their keys
            built.record.trained_id = broadcast_from_rank_zero(uuid.uuid4().hex)
            self.cache.commit(built.record)
            return built

    def train(self, stage: Stage, cfg: Any, inputs: dict[str, Built], key: str | None,
              decides: dict) -> Built:
        """Build ``stage`` (global RNGs seeded first), fit it, save its model; metered. The log
        says when it starts (with its cache key, for a base stage) and when it is done."""
        log.info("%s stage: training%s", stage.name.upper(), f" {key}" if key else "")
        with self.meter(stage.name):
            seed_stage(self.s.seed)
            job = stage.build(self.ctx, cfg, inputs)
            set_gradient_checkpointing(job.trainable, self.ctx.model_cfg.gradient_checkpointing)
            path = self.cache.path(key) if key else self.run_dir / stage.name
            # keyed by what decides the stage, so the same command finds it from a new run dir
            resume_key = key or stage_key(stage.name, self.decides(stage, cfg, inputs))
            record = self.fit(stage, job, path, key, decides, self.cache.root / "resume" / resume_key)
            checkpoint = record.checkpoint if key else self.run_dir / "checkpoint"
            if is_rank_zero():  # the other ranks of a DDP run hold the same weights
                stage.save(job.model, checkpoint, self.tokenizer, self.cfg)
        self.loggers.close(stage.name)
        log.info("%s stage: trained in %.1f s", stage.name.upper(), self.costs[stage.name].wall_s)
        model = job.model
        if stage.base:  # what later stages build on is what the cache would give them: merged,
            from harness.models.lora import has_lora, merged

            model = merged(model) if has_lora(model) else model
            # and in eval mode, as a loaded checkpoint is: Lightning keeps a module's mode, so a
            # base left in training mode would train the next stage with noisy MoE routing when
            # its base was trained in this process and without it when the base was cached
            model.eval()
        return Built(stage.name, cfg, model, record, checkpoint)

    def fit(self, stage: Stage, job: Fit, path: Path, key: str | None,
            decides: dict, resume_dir: Path) -> StageRecord:
        """Train ``job.module`` with the stage's logger and budget; its record (not committed).

        Saves a resume checkpoint in ``resume_dir`` every ``trainer.resume_every`` batches and,
        when a killed run left one there, resumes from it (:mod:`harness.resume`); the folder is
        removed once the stage has trained.
        """
        logger = self.loggers.open(stage.name)
        steps = job.budget.steps
        curve = self.curve(steps) if stage.produces_policy and steps > 0 else None
        if self.s.force_retrain and is_rank_zero():
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
        saver = resume.ResumeCheckpoint(resume_dir, self.s.trainer.resume_every, total=steps)
        trainer = build_trainer(self.s.trainer, logger, path / "lightning", self.run_dir,
                                job.budget, extra_callbacks=(*([curve] if curve else []), saver),
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
        self.fitted[stage.name] = _throughput(metrics)
        history.update(next(c for c in trainer.callbacks if isinstance(c, HistoryRecorder)).history)
        self.histories[stage.name] = history
        return StageRecord(key=key or stage.name, path=path, metrics=metrics, decides=decides)

    def report_phases(self, stage: str, trainer: L.Trainer) -> None:
        """With ``trainer.profiler=simple``: the stage's seconds per training batch by phase
        (:mod:`harness.step_profile`) in the log, in ``<run dir>/profile/<stage>-phases.json`` and,
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

    @contextlib.contextmanager
    def meter(self, stage: str) -> Iterator[None]:
        """Time the block and measure its peak memory as the cost of ``stage``."""
        with StageMeter() as m:
            yield
        m.cost.extra = self.fitted.get(stage, {})
        m.cost.wall_s -= m.cost.extra.get("curve_s", 0.0)
        self.costs[stage] = m.cost

    def eval_prompts(self, split: str | None = None, limit: int | None = None) -> list[str]:
        """Held-out prompts of ``split``: ``test`` (the task's eval pool, never tuned on) or
        ``validation`` (distinct prompts of the validation split, for tuning; as many as test)."""
        e = self.s.eval
        split = split or e.split
        test = list(self.task.eval_dataset()["prompt"])
        if split == "test":
            prompts = test
        else:
            prompts = list(dict.fromkeys(self.task.sft_dataset("validation")["prompt"]))[:len(test)]
        limit = e.limit if limit is None else limit
        return prompts[:limit] if limit else prompts

    def curve(self, steps: int) -> HeldOutGoldCurve | None:
        """The held-out gold curve callback for a stage of ``steps`` training steps."""
        e = self.s.eval
        if not self.task.has_gold_reward or not e.curve_points:
            return None
        prompts = self.eval_prompts("validation", e.curve_prompts)
        return HeldOutGoldCurve(self.task, self.tokenizer, prompts,
                                every=max(1, steps // e.curve_points),
                                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                max_len=self.s.eval_max_len, cuda_graph=e.cuda_graph)


def _throughput(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's token counts and rates (``AlignmentModule.throughput``), without the prefix."""
    names = ("train_tokens", "train_tokens_per_s", "gen_tokens", "gen_tokens_per_s", "curve_s")
    return {n: metrics[f"cost/{n}"] for n in names if f"cost/{n}" in metrics}


def evaluate(run: Run, policy: CausalLM, reference: CausalLM | None,
             max_len: int) -> tuple[dict[str, float], list[dict], dict[str, Any]]:
    """Gold reward on held-out prompts; with a reference also its gold reward, win rate and KL.

    Returns (metrics, samples, per_prompt): ``per_prompt`` holds the split, a hash of the prompts
    and each prompt's gold reward (and the reference's), the unit of the leaderboard's paired test.
    """
    if not run.task.has_gold_reward:
        return evaluate_preferences(run, policy, reference, max_len)
    e = run.s.eval
    prompts = run.eval_prompts()
    args = (prompts, e.max_new_tokens, e.batch_size, max_len)
    res = gold_eval(policy, run.tokenizer, run.task, *args, cuda_graph=e.cuda_graph)
    best = run.task.gold_max
    metrics = {"eval/gold_reward": res.mean_reward, "eval/gold_accuracy": res.accuracy(best),
               "eval/gold_max": float(best), "eval/n_prompts": float(len(prompts))}
    per_prompt: dict[str, Any] = {
        "split": e.split,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "gold_reward": [float(r) for r in res.rewards]}
    samples = [{"prompt": p, "response": r, "reward": w} for p, r, w in
               zip(res.prompts, res.responses, res.rewards, strict=True)][: e.n_samples]
    if reference is not None:
        ref = gold_eval(reference, run.tokenizer, run.task, *args, cuda_graph=e.cuda_graph)
        per_prompt["ref_gold_reward"] = [float(r) for r in ref.rewards]
        metrics["eval/ref_gold_reward"] = ref.mean_reward
        metrics["eval/ref_gold_accuracy"] = ref.accuracy(best)
        metrics["eval/win_rate"] = win_rate(res.rewards, ref.rewards)
        metrics["eval/kl"] = sequence_kl(policy, reference, run.tokenizer, prompts,
                                         e.max_new_tokens, e.batch_size, max_len,
                                         stream_seed(run.s.seed, "eval_kl"), e.cuda_graph)
        for s, r in zip(samples, ref.responses, strict=False):
            s["reference"] = r
    return metrics, samples, per_prompt


def evaluate_preferences(run: Run, policy: CausalLM, reference: CausalLM | None,
                         max_len: int) -> tuple[dict[str, float], list[dict], dict[str, Any]]:
    """Evaluation for data without a gold reward: held-out preference accuracy and KL.

    The held-out pairs are the task's eval pairs (``eval.split=test``) or its validation pairs;
    ``eval/pref_accuracy`` (and the reference's, and the implicit-reward accuracy) are defined in
    :mod:`harness.evaluation.preference_eval`. Data with responses but no pairs gets only KL.
    """
    from harness.evaluation.gold import complete
    from harness.evaluation.preference_eval import (
        implicit_reward_correct,
        pair_logps_table,
        prefers_chosen,
    )

    e = run.s.eval
    ds = run.task.eval_dataset() if e.split == "test" else run.task.preference_dataset("validation")
    if e.limit:
        ds = ds.select(range(min(e.limit, len(ds))))
    prompts = list(ds["prompt"])
    metrics: dict[str, float] = {"eval/n_prompts": float(len(prompts))}
    per_prompt: dict[str, Any] = {
        "split": e.split, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    if {"chosen", "rejected"} <= set(ds.column_names):
        pairs = (prompts, list(ds["chosen"]), list(ds["rejected"]), e.batch_size, max_len)
        table = pair_logps_table(policy, run.tokenizer, *pairs)
        per_prompt["pref_accuracy"] = prefers_chosen(table)
        metrics["eval/pref_accuracy"] = sum(per_prompt["pref_accuracy"]) / len(prompts)
        if reference is not None:
            ref_table = pair_logps_table(reference, run.tokenizer, *pairs)
            per_prompt["ref_pref_accuracy"] = prefers_chosen(ref_table)
            metrics["eval/ref_pref_accuracy"] = sum(per_prompt["ref_pref_accuracy"]) / len(prompts)
            correct = implicit_reward_correct(table, ref_table)
            metrics["eval/reward_accuracy"] = sum(correct) / len(prompts)
    shown = prompts[: e.n_samples]
    responses = complete(policy, run.tokenizer, shown, e.max_new_tokens, e.batch_size, max_len,
                         cuda_graph=e.cuda_graph)
    samples = [{"prompt": p, "response": r} for p, r in zip(shown, responses, strict=True)]
    if reference is not None:
        metrics["eval/kl"] = sequence_kl(policy, reference, run.tokenizer, prompts,
                                         e.max_new_tokens, e.batch_size, max_len,
                                         stream_seed(run.s.seed, "eval_kl"), e.cuda_graph)
    return metrics, samples, per_prompt


def lm_eval_stage(run: Run, checkpoint: Path) -> tuple[dict[str, float], str]:
    """lm-evaluation-harness on the HF checkpoint; returns metrics and the equivalent CLI command."""
    from harness.evaluation.lm_eval_runner import lm_eval_command, run_lm_eval
    from harness.evaluation.tasks.export import export_task_data

    e = run.s.eval.lm_eval
    include = None
    if not e.include_defaults:
        include = export_task_data(run.task, run.run_dir / "lm_eval_tasks", limit=e.limit,
                                   tokenizer=run.tokenizer, max_gen_toks=run.s.eval.max_new_tokens)
    tasks = list(e.tasks) if e.tasks is not None else [f"harness_{run.task.name}"]
    kwargs = dict(limit=e.limit, batch_size=e.batch_size, num_fewshot=e.num_fewshot,
                  add_bos_token=e.add_bos_token)
    metrics = run_lm_eval(checkpoint, include, tasks, include_defaults=e.include_defaults,
                          output_path=run.run_dir / "lm_eval_results.json", **kwargs)
    return metrics, lm_eval_command(checkpoint, include, tasks, **kwargs)


def record_for(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The results record of a finished or failed run (see :mod:`harness.evaluation.records`)."""
    from harness.evaluation.records import new_record

    cfg = summary.get("config", {})
    return new_record(run_id=summary["run_id"], method=summary["method"], model=summary["model"],
                      dataset=summary["dataset"], seed=int(summary["seed"]),
                      status=summary["status"], error=summary.get("error"),
                      group=cfg.get("group"), metrics=summary.get("metrics", {}),
                      cost=summary.get("cost", {}), cache_keys=summary.get("cache_keys", {}),
                      config=cfg, history=summary.get("history"),
                      platform=summary.get("platform"), per_prompt=summary.get("per_prompt"),
                      reward_source=summary.get("reward_source"),
                      # the code's commit, wherever the command was started from
                      repo_path=Path(__file__).resolve().parent)


class RecordNotWritten(RuntimeError):
    """The run's results record could not be written (its ``summary.json`` was)."""


def write_outputs(summary: dict[str, Any], run_dir: Path) -> None:
    """One record in ``<results_dir>/runs/``, then ``summary.json`` in the run directory.

    Each is written whatever happens to the other: a summary that cannot be written does not stop
    the record, and a record that cannot be written (a results folder gone bad, a record of the
    same id already there) is noted in the summary (``record_error``), which is written first;
    then :class:`RecordNotWritten` is raised, so the run fails rather than lose its record.
    """
    from harness.evaluation.records import write_record

    results = summary.get("config", {}).get("results_dir")
    error = None
    if results:
        runs = Path(to_absolute_path(results)) / "runs"
        try:
            summary["record"] = str(write_record(record_for(summary, run_dir), runs))
        except Exception as exc:  # the run's own summary must survive a results folder gone bad
            summary["record_error"] = f"{type(exc).__name__}: {exc}"
            error = f"could not write the results record to {runs}: {summary['record_error']}"
    write_json(run_dir / "summary.json", summary)
    if error is not None:
        raise RecordNotWritten(f"{error} (the run's summary is in {run_dir / 'summary.json'})")


def stage_costs(costs: dict[str, StageCost], method_stage: str, total_s: float) -> dict[str, float]:
    """The run's ``cost/*`` fields: per stage, the method's own stage, and the whole run.

    ``cost/peak_mem_mb`` is the largest peak of the stages computed in this run (not cached);
    ``cost/method_*`` alias the aligning method's stage (for ``method=sft`` the SFT stage).
    """
    out: dict[str, float] = {"cost/wall_s": total_s}
    for stage, c in costs.items():
        out.update(c.as_metrics(stage))
    live = [c.peak_mem_mb for c in costs.values() if not c.cached]
    out["cost/peak_mem_mb"] = max(live) if live else float("nan")
    own = costs.get(method_stage)
    if own is not None:
        out["cost/method_wall_s"] = own.wall_s
        out["cost/method_peak_mem_mb"] = own.peak_mem_mb
        for name in ("train_tokens_per_s", "gen_tokens_per_s"):
            if name in own.extra:
                out[f"cost/{name}"] = own.extra[name]
        if "train_tokens_per_s" in own.extra:
            out["cost/tokens_per_s"] = own.extra["train_tokens_per_s"]
    return out


def run(cfg: DictConfig, run_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Run the pipeline for ``cfg`` and write ``<run_dir>/summary.json``; returns the summary.

    ``settings``: ``validate(cfg)``, when the caller has it already (the entry point checks the
    config before importing this module). Config errors (:class:`~harness.config.ConfigError`)
    and bad data (:class:`~harness.data.errors.DataError`) are raised before any work and leave
    no record.
    """
    t0 = time.perf_counter()
    settings = validate(cfg) if settings is None else settings
    check_writable(run_dir, "hydra.run.dir")
    check_writable(to_absolute_path(settings.cache_dir), "cache_dir")
    if settings.results_dir:
        check_writable(Path(to_absolute_path(settings.results_dir)) / "runs", "results_dir")
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    name = settings.method_name
    stage = get_stage(name)
    # what the method learns from, known before any work: a failed run's record has it too, so
    # that it joins its method's row of the right track
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run_dir), "method": name,
                               "run_id": new_run_id(name, settings.model.name,
                                                    settings.dataset.name, settings.seed),
                               "model": settings.model.name, "dataset": settings.dataset.name,
                               "seed": settings.seed, "config": resolved,
                               "reward_source": stage.reward_source(settings.stage_config(name))}
    quiet_console(settings.log_level, verbose=_hydra_verbose())
    t = settings.trainer
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    elif str(t.devices) != "1" and t.accelerator != "gpu":
        torch.set_num_threads(1)
    summary["platform"] = platform_info(t.device())
    if settings.skip_done and settings.results_dir and _in_multirun():
        done = finished_record(Path(to_absolute_path(settings.results_dir)) / "runs", resolved,
                               summary["platform"])
        if done is not None:  # a relaunched sweep: this job finished before
            log.info("skipped: an ok record of this config on this platform exists: %s "
                     "(skip_done=false runs it again)", done)
            return {**summary, "status": "skipped", "record": str(done)}
    # the data and the tokenizer are read here, before the try: bad data (a DataError naming the
    # file, row and column) stops the run before any work, like a config error, with no record
    r = Run(settings, resolved, run_dir)
    r.check_data(name)
    try:
        final = r.obtain(name)
        if not is_rank_zero():  # DDP's other ranks only train; rank 0 evaluates and reports
            return {**summary, "status": "ok", "rank": "not 0: trained only"}
        summary["stages"] = {n: {**b.record.to_json(), "checkpoint": str(b.checkpoint)}
                             for n, b in r.built.items()}
        summary["cache_keys"] = {n: b.record.key for n, b in r.built.items()
                                 if get_stage(n).base}
        summary["checkpoint"] = str(final.checkpoint)
        metrics = stage.summary_metrics(final.record.metrics)
        policy = final.model if stage.produces_policy else None
        reference = r.built[stage.reference].model if stage.reference else None
        # Lightning hands a trained module back on the CPU, and a network a module holds outside
        # its registered submodules (DPO's reference) stays where training put it: evaluate both
        # on the run's device
        for net in (policy, reference):
            if net is not None:
                net.to(t.device())
        with r.meter("eval"):
            samples: list[dict] = []
            per_prompt = None
            if policy is not None:
                t_eval = time.perf_counter()
                log.info("evaluation: %s split%s", settings.eval.split,
                         ", then lm-eval" if settings.eval.lm_eval.enabled else "")
                eval_metrics, samples, per_prompt = evaluate(r, policy, reference,
                                                             settings.eval_max_len)
                metrics.update(eval_metrics)
                if settings.eval.lm_eval.enabled:
                    lm_metrics, summary["lm_eval_command"] = lm_eval_stage(r, final.checkpoint)
                    metrics.update(lm_metrics)
                log.info("evaluation: done in %.1f s", time.perf_counter() - t_eval)
        summary["history"] = r.histories.get(name, {})
        summary["per_prompt"] = per_prompt
        cost = stage_costs(r.costs, name, time.perf_counter() - t0)
        summary.update(status="ok", metrics=metrics, cost=cost, samples=samples)
        r.loggers.finish({**metrics, **cost, "status": "ok"}, samples, final.checkpoint)
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(),
                       cost=stage_costs(r.costs, name, time.perf_counter() - t0))
        if is_rank_zero():
            with contextlib.suppress(RecordNotWritten):  # the run's own error is the one to raise
                write_outputs(summary, run_dir)
            r.loggers.abort({"status": "failed"})
        raise
    write_outputs(summary, run_dir)
    return summary


def _in_multirun() -> bool:
    """Whether this run is a job of a multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _hydra_verbose() -> bool:
    """Whether ``hydra.verbose`` names any logger (then every logger keeps the level it names)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)
