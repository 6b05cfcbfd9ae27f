"""One run, top to bottom (after torchtune's recipes):

    validate -> task + tokenizer -> SFT base (cached) -> [reward model (cached)] -> method stage
             -> evaluation (gold reward, win rate and KL against the SFT reference) -> summary.json

SFT and reward-model stages are cached under keys hashed from exactly the config that decides them
(:mod:`harness.stages`), so every method of a sweep starts from the same reference.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
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

from harness.config import RMConfig, SFTConfig, differing_fields, to_dataclass, validate
from harness.data.datamodule import AlignmentDataModule
from harness.data.tasks import build_task
from harness.data.tokenizer import load_or_build_tokenizer
from harness.evaluation.cost import StageCost, StageMeter
from harness.evaluation.curves import HeldOutGoldCurve
from harness.evaluation.drift import sequence_kl
from harness.evaluation.gold import gold_eval, win_rate
from harness.evaluation.platform import platform_info
from harness.models.hf import load_checkpoint, save_checkpoint
from harness.models.llama import CausalLM, ScalarHead
from harness.seeding import seed_stage, stream_seed
from harness.stages import StageCache, StageRecord, stage_key, write_json_atomic
from harness.tracking.loggers import build_logger, finish, log_model_artifact

log = logging.getLogger("harness")


class _DropNoise(logging.Filter):
    """Hide Lightning's advertising tips from the run's console and log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Route Lightning's messages through Hydra's handlers once (no duplicated console lines)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    for h in logging.getLogger().handlers:
        h.addFilter(_DropNoise())


def build_trainer(cfg: dict[str, Any], logger, ckpt_dir: Path, run_dir: Path,
                  max_steps: int = -1, grad_clip: float | None = None,
                  val_every: int | None = None, limit_train_batches: int | None = None,
                  log_every_n_steps: int | None = None, extra_callbacks: tuple = ()) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` group plus the stage's budget."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks: list = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0),
                       HistoryRecorder(), *extra_callbacks]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs: dict[str, Any] = {}
    if val_every is not None:
        kwargs.update(val_check_interval=val_every, check_val_every_n_epoch=None)
    if limit_train_batches is not None:
        kwargs.update(limit_train_batches=limit_train_batches, max_epochs=1,
                      limit_val_batches=0)
    trainer_kwargs = dict(cfg["trainer"])
    if log_every_n_steps is not None:
        trainer_kwargs["log_every_n_steps"] = log_every_n_steps
    return L.Trainer(**trainer_kwargs, max_steps=max_steps, gradient_clip_val=grad_clip or None,
                     logger=logger if logger is not None else False, callbacks=callbacks,
                     default_root_dir=str(run_dir), **kwargs)


class HistoryRecorder(L.Callback):
    """Keeps the training curves the leaderboard plots (``[[step, value], ...]`` per metric).

    ``step`` counts the stage's training steps (Lightning batches) across epochs.
    """

    KEYS = ("train/loss", "train/reward", "train/kl", "train/rewards_margin")

    def __init__(self) -> None:
        self.history: dict[str, list[list[float]]] = {}
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key in self.KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append([float(self._step), float(value)])
        self._step += 1


class Run:
    """The state of one run: config, cache, task, tokenizer, and where things go."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.model_cfg, self.method_cfg = validate(cfg)
        self.sft_cfg: SFTConfig = (self.method_cfg if self.method_cfg.name == "sft"
                                   else to_dataclass(SFTConfig, cfg.sft))
        self.sft_cfg.check("sft")
        self.rm_cfg: RMConfig = (self.method_cfg if self.method_cfg.name == "rm"
                                 else to_dataclass(RMConfig, cfg.rm))
        self.rm_cfg.check("rm")
        self.cfg: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore
        stage = self.method_cfg.name
        if stage in ("sft", "rm") and stage in self.cfg:
            lost = differing_fields(self.cfg["method"], self.cfg[stage], ("method", stage))
            if lost:
                log.warning("method=%s trains the %s stage from the `method` section; these "
                            "overrides of `%s` are not used: %s (set method.* instead)",
                            stage, stage.upper(), stage, "; ".join(lost))
        self.run_dir = run_dir
        self.history: dict[str, list[list[float]]] = {}
        #: what each stage of this run spent (cached stages: what they spent when trained)
        self.costs: dict[str, StageCost] = {}
        #: token counts, rates and curve time of each stage fitted in this run (by stage name)
        self.fitted: dict[str, dict[str, float]] = {}
        self.cache = StageCache(Path(to_absolute_path(cfg.cache_dir)))
        self.force = bool(cfg.force_retrain)
        self.seed = int(cfg.seed)
        self.task = build_task(self.cfg["dataset"], cache_dir=self.cache.root / "data")
        self.tokenizer = load_or_build_tokenizer(self.task, self.cfg["dataset"],
                                                 self.cache.root / "tokenizers",
                                                 model_max_length=self.model_cfg.max_seq_len)
        if self.model_cfg.vocab_size is None:
            self.model_cfg.vocab_size = len(self.tokenizer)

    # ---------------------------------------------------------------- stages
    def sft_decides(self) -> dict[str, Any]:
        return {"model": asdict(self.model_cfg), "dataset": self.cfg["dataset"],
                "data_fingerprint": self.task.fingerprint,
                "sft": asdict(self.sft_cfg), "seed": self.seed,
                "precision": self.cfg["trainer"].get("precision"),
                "devices": self.cfg["trainer"].get("devices")}

    def sft_stage(self) -> tuple[StageRecord, CausalLM, Any]:
        """Find the SFT base for this (model, dataset, SFT config, seed), or train it."""

        def train(key: str, decides: dict) -> tuple[StageRecord, CausalLM, Any]:
            from harness.methods.sft import SFTModule

            policy = CausalLM(self.model_cfg)
            record, logger = self.fit_cached(key, decides, SFTModule(policy, self.sft_cfg), "sft",
                                             self.sft_cfg)
            save_checkpoint(policy, record.checkpoint, tokenizer=self.tokenizer,
                            resolved_config=self.cfg)
            return record, policy, logger

        return self.cached_stage("sft", self.sft_decides(),
                                 lambda path: load_checkpoint(path)[0], train)

    def rm_decides(self, sft: StageRecord) -> dict[str, Any]:
        """The RM's key input: the SFT base it starts from (key and training id) and its config."""
        return {"sft": sft.key, "sft_trained_id": sft.trained_id, "rm": asdict(self.rm_cfg)}

    def rm_stage(self, sft: StageRecord, sft_policy: CausalLM) -> tuple[StageRecord, ScalarHead, Any]:
        """Find or train the Bradley–Terry reward model on top of this SFT base."""

        def train(key: str, decides: dict) -> tuple[StageRecord, ScalarHead, Any]:
            from harness.methods.reward import RewardModule

            rm = ScalarHead(copy.deepcopy(sft_policy))
            record, logger = self.fit_cached(key, decides, RewardModule(rm, self.rm_cfg), "pairs",
                                             self.rm_cfg)
            save_reward_model(rm, record.checkpoint, self.tokenizer, self.cfg)
            return record, rm, logger

        return self.cached_stage("rm", self.rm_decides(sft),
                                 load_reward_model, train)

    def cached_stage(self, kind: str, decides: dict, load, train) -> tuple[StageRecord, Any, Any]:
        """The stage under ``stage_key(kind, decides)``: loaded if cached, else trained and committed.

        A lock per key makes parallel sweep jobs train a stage once and share it.
        """
        key = stage_key(kind, decides)
        with self.cache.lock(key):
            found = None if self.force else self.cache.load(key)
            if found is not None:
                log.info("%s stage: reusing cached %s (%s)", kind.upper(), key, found.path)
                model = load(found.checkpoint)
                m = found.metrics
                self.costs[kind] = StageCost(wall_s=m.get("cost/train_wall_s", float("nan")),
                                             peak_mem_mb=m.get("cost/train_peak_mem_mb", float("nan")),
                                             cached=True, extra=_throughput(m))
                return found, model, None
            log.info("%s stage: training %s", kind.upper(), key)
            seed_stage(self.seed)
            with self.meter(kind):
                record, model, logger = train(key, decides)
            cost = self.costs[kind]
            record.metrics.update({"cost/train_wall_s": cost.wall_s,
                                   "cost/train_peak_mem_mb": cost.peak_mem_mb})
            record.trained_id = uuid.uuid4().hex
            self.cache.commit(record)
            return record, model, logger

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
        e = self.cfg["eval"]
        split = split or e["split"]
        test = list(self.task.eval_dataset()["prompt"])
        if split == "test":
            prompts = test
        else:
            prompts = list(dict.fromkeys(self.task.sft_dataset("validation")["prompt"]))[:len(test)]
        limit = e["limit"] if limit is None else limit
        return prompts[:limit] if limit else prompts

    def curve(self, steps: int) -> HeldOutGoldCurve | None:
        """The held-out gold curve callback for a stage of ``steps`` training steps."""
        e = self.cfg["eval"]
        if not self.task.has_gold_reward or not e["curve_points"]:
            return None
        prompts = self.eval_prompts("validation", e["curve_prompts"])
        return HeldOutGoldCurve(self.task, self.tokenizer, prompts,
                                every=max(1, steps // e["curve_points"]),
                                max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"],
                                max_len=self.sft_cfg.max_len)

    def datamodule(self, kind: str, c) -> AlignmentDataModule:
        """The task's ``kind`` data batched as the stage config ``c`` says, shuffled by the seed."""
        return AlignmentDataModule(self.task, self.tokenizer, kind=kind, batch_size=c.batch_size,
                                   max_len=c.max_len, overflow=c.overflow, seed=self.seed)

    def fit_cached(self, key: str, decides: dict, module, kind: str, c) -> tuple[StageRecord, Any]:
        """Fit a cached stage's module on the task's ``kind`` data with its config's budget."""
        dm = self.datamodule(kind, c)
        return self.fit_stage(c.stage, key, decides, module, dm, max_steps=c.max_steps,
                              grad_clip=c.optim.grad_clip, val_every=c.val_every)

    def fit_stage(self, stage: str, key: str | None, decides: dict, module, data,
                  **budget) -> tuple[StageRecord, Any]:
        """Train ``module`` with a logger for ``stage``; returns its record (not yet committed)."""
        path = self.cache.path(key) if key else self.run_dir / stage
        logger = build_logger(self.cfg, stage, self.run_dir)
        steps = budget.get("max_steps") or budget.get("limit_train_batches") or 0
        curve = self.curve(steps) if hasattr(module, "policy") and steps > 0 else None
        trainer = build_trainer(self.cfg, logger, path / "lightning", self.run_dir, **budget,
                                extra_callbacks=(curve,) if curve else ())
        t0 = time.perf_counter()
        if isinstance(data, L.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
        fit_s = time.perf_counter() - t0 - (curve.seconds if curve else 0.0)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(module.throughput(fit_s))
        if curve is not None:
            metrics["cost/curve_s"] = curve.seconds
            self.history["eval/gold_reward"] = curve.points
        self.fitted[stage] = _throughput(metrics)
        self.history.update(next(c for c in trainer.callbacks if isinstance(c, HistoryRecorder)).history)
        return StageRecord(key=key or stage, path=path, metrics=metrics, decides=decides), logger


def _throughput(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's token counts and rates (``AlignmentModule.throughput``), without the prefix."""
    names = ("train_tokens", "train_tokens_per_s", "gen_tokens", "gen_tokens_per_s", "curve_s")
    return {n: metrics[f"cost/{n}"] for n in names if f"cost/{n}" in metrics}


def save_reward_model(rm: ScalarHead, out: Path, tokenizer, resolved: dict) -> None:
    """The backbone as an HF folder plus ``score_head.pt`` for the scalar head."""
    save_checkpoint(rm.backbone, out, tokenizer=tokenizer, resolved_config=resolved)
    torch.save(rm.score.state_dict(), out / "score_head.pt")


def load_reward_model(path: Path) -> ScalarHead:
    backbone, _, _ = load_checkpoint(path)
    rm = ScalarHead(backbone)
    rm.score.load_state_dict(torch.load(path / "score_head.pt", weights_only=True))
    return rm


def evaluate(run: Run, policy: CausalLM, reference: CausalLM | None,
             max_len: int) -> tuple[dict[str, float], list[dict], dict[str, Any]]:
    """Gold reward on held-out prompts; with a reference also its gold reward, win rate and KL.

    Returns (metrics, samples, per_prompt): ``per_prompt`` holds the split, a hash of the prompts
    and each prompt's gold reward (and the reference's), the unit of the leaderboard's paired test.
    """
    e = run.cfg["eval"]
    prompts = run.eval_prompts()
    args = (prompts, e["max_new_tokens"], e["batch_size"], max_len)
    res = gold_eval(policy, run.tokenizer, run.task, *args)
    best = run.task.gold_max
    metrics = {"eval/gold_reward": res.mean_reward, "eval/gold_accuracy": res.accuracy(best),
               "eval/gold_max": float(best), "eval/n_prompts": float(len(prompts))}
    per_prompt: dict[str, Any] = {
        "split": e["split"],
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "gold_reward": [float(r) for r in res.rewards]}
    samples = [{"prompt": p, "response": r, "reward": w} for p, r, w in
               zip(res.prompts, res.responses, res.rewards, strict=True)][: e["n_samples"]]
    if reference is not None:
        ref = gold_eval(reference, run.tokenizer, run.task, *args)
        per_prompt["ref_gold_reward"] = [float(r) for r in ref.rewards]
        metrics["eval/ref_gold_reward"] = ref.mean_reward
        metrics["eval/ref_gold_accuracy"] = ref.accuracy(best)
        metrics["eval/win_rate"] = win_rate(res.rewards, ref.rewards)
        metrics["eval/kl"] = sequence_kl(policy, reference, run.tokenizer, prompts,
                                         e["max_new_tokens"], e["batch_size"], max_len,
                                         stream_seed(run.seed, "eval_kl"))
        for s, r in zip(samples, ref.responses, strict=False):
            s["reference"] = r
    return metrics, samples, per_prompt


def lm_eval_stage(run: Run, checkpoint: Path) -> tuple[dict[str, float], str]:
    """lm-evaluation-harness on the HF checkpoint; returns metrics and the equivalent CLI command."""
    from harness.evaluation.lm_eval_runner import lm_eval_command, run_lm_eval
    from harness.evaluation.tasks.export import export_task_data

    e = run.cfg["eval"]["lm_eval"]
    include = None
    if not e.get("include_defaults"):
        include = export_task_data(run.task, run.run_dir / "lm_eval_tasks", limit=e.get("limit"),
                                   tokenizer=run.tokenizer,
                                   max_gen_toks=run.cfg["eval"]["max_new_tokens"])
    kwargs = dict(limit=e["limit"], batch_size=e["batch_size"],
                  num_fewshot=e["num_fewshot"], add_bos_token=e["add_bos_token"])
    metrics = run_lm_eval(checkpoint, include, list(e["tasks"]),
                          include_defaults=e.get("include_defaults"),
                          output_path=run.run_dir / "lm_eval_results.json", **kwargs)
    return metrics, lm_eval_command(checkpoint, include, list(e["tasks"]), **kwargs)


def record_for(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The results record of a finished or failed run (see :mod:`harness.evaluation.records`)."""
    from harness.evaluation.records import new_record

    cfg = summary.get("config", {})
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run_dir.parent.name}_{run_dir.name}")
    return new_record(run_id=run_id, method=summary["method"], model=summary["model"],
                      dataset=summary["dataset"], seed=int(summary["seed"]),
                      status=summary["status"], error=summary.get("error"),
                      group=cfg.get("experiment"), metrics=summary.get("metrics", {}),
                      cost=summary.get("cost", {}), cache_keys=summary.get("cache_keys", {}),
                      config=cfg, history=summary.get("history"),
                      platform=summary.get("platform"), per_prompt=summary.get("per_prompt"),
                      reward_source=summary.get("reward_source"))


def write_outputs(summary: dict[str, Any], run_dir: Path) -> None:
    """``summary.json`` in the run directory and one record in ``<results_dir>/runs/``."""
    from harness.evaluation.records import write_record

    results = summary.get("config", {}).get("results_dir")
    if results:
        path = write_record(record_for(summary, run_dir), Path(to_absolute_path(results)) / "runs")
        summary["record"] = str(path)
    write_json_atomic(run_dir / "summary.json", summary)


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


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the pipeline for ``cfg`` and write ``<run_dir>/summary.json``; returns the summary."""
    from harness.methods.stage_runners import run_method

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run_dir),
                               "method": cfg.method.name, "model": cfg.model.name,
                               "dataset": cfg.dataset.name, "seed": cfg.seed,
                               "config": OmegaConf.to_container(cfg, resolve=True)}
    quiet_lightning()
    if str(cfg.trainer.get("devices", 1)) != "1" and cfg.trainer.get("accelerator") != "gpu":
        torch.set_num_threads(1)
    summary["platform"] = platform_info("cuda" if cfg.trainer.get("accelerator") == "gpu" else "cpu")
    logger = None
    r: Run | None = None
    try:
        r = Run(cfg, run_dir)
        sft, sft_policy, logger = r.sft_stage()
        summary["stages"] = {"sft": sft.to_json()}
        summary["cache_keys"] = {"sft": sft.key, "rm": None}
        method = r.method_cfg.name
        reference = None
        policy = sft_policy
        metrics: dict[str, float] = {k: v for k, v in sft.metrics.items()
                                     if k.startswith(("train/", "val/"))}
        summary["reward_source"] = None
        if method != "sft":
            if logger is not None:
                finish(logger)
            reference = sft_policy
            outcome = run_method(r, sft, sft_policy)
            summary["stages"].update(outcome.stages)
            summary["cache_keys"].update(outcome.cache_keys)
            policy, logger, metrics = outcome.policy, outcome.logger, outcome.metrics
            summary["checkpoint"] = str(outcome.checkpoint)
            summary["reward_source"] = outcome.reward_source
        else:
            summary["checkpoint"] = str(sft.checkpoint)
        if method == "rm":
            reference = None
        with r.meter("eval"):
            eval_metrics, samples, per_prompt = (evaluate(r, policy, reference, r.sft_cfg.max_len)
                                                 if policy is not None else ({}, [], None))
            metrics.update(eval_metrics)
            if policy is not None and r.cfg["eval"]["lm_eval"]["enabled"]:
                lm_metrics, summary["lm_eval_command"] = lm_eval_stage(r, Path(summary["checkpoint"]))
                metrics.update(lm_metrics)
        summary["history"] = r.history
        summary["per_prompt"] = per_prompt
        cost = stage_costs(r.costs, method, time.perf_counter() - t0)
        summary.update(status="ok", metrics=metrics, cost=cost, samples=samples)
        logger = logger or build_logger(r.cfg, method, run_dir)
        if logger is not None and hasattr(logger, "log_table") and samples:
            cols = list(samples[0])
            logger.log_table("eval/samples", columns=cols, data=[[s[c] for c in cols]
                                                                  for s in samples])
        if r.cfg["logger"].get("log_model"):
            log_model_artifact(logger, Path(summary["checkpoint"]), f"{method}-{r.cfg['model']['name']}")
        finish(logger, {**metrics, **cost, "status": "ok"})
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(),
                       cost=stage_costs(r.costs if r is not None else {}, cfg.method.name,
                                        time.perf_counter() - t0))
        write_outputs(summary, run_dir)
        if logger is not None:
            finish(logger, {"status": "failed"})
        raise
    write_outputs(summary, run_dir)
    return summary
