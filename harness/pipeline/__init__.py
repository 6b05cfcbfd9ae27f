"""One run, top to bottom (after torchtune's recipes):

    validate -> prepare (task, tokenizer, backbone config) -> the stage runner: the stages the
             method needs (base stages cached), then the method's stage -> evaluation (gold
             reward, win rate and KL against the reference) -> summary.json and a results record

The parts, each in its own module: :mod:`~harness.pipeline.prepare` (the set-up, as a
:class:`~harness.stage.StageContext`), :mod:`~harness.pipeline.stages` (the stage runner and the
cache keys), :mod:`~harness.pipeline.trainer` (the Lightning trainer of a stage),
:mod:`~harness.pipeline.evaluation` (a policy's evaluation from explicit arguments) and
:mod:`~harness.pipeline.outputs` (the record, the summary and the cost fields). Every stage is
built through the stage interface (:mod:`harness.stage`) from the registry
(:mod:`harness.registry`); nothing here knows a method by name.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from harness.cache import StageCache
from harness.evaluation.cost import StageMeter
from harness.evaluation.platform import platform_info
from harness.evaluation.records import finished_record, new_run_id
from harness.pipeline.evaluation import ReferenceCache, evaluate, lm_eval_stage
from harness.pipeline.outputs import RecordNotWritten, stage_costs, write_outputs
from harness.pipeline.prepare import check_data, prepare
from harness.pipeline.stages import StageRunner
from harness.registry import get_stage
from harness.settings import Settings, validate
from harness.stage import Built
from harness.tracking.loggers import RunLoggers
from harness.util.atomic import check_writable
from harness.util.console import quiet_console
from harness.util.distributed import is_rank_zero

log = logging.getLogger("harness")


def stage_runner(settings: Settings, resolved: dict[str, Any], run_dir: Path) -> StageRunner:
    """The set-up (:func:`prepare`) and stage runner of a run of ``settings``, nothing trained
    yet: what :func:`run` starts from, and what tools that train or inspect one stage (the TRL
    cross-check, tests of the cache keys) build."""
    cache = StageCache(Path(to_absolute_path(settings.cache_dir)))
    ctx = prepare(settings, cache.root)
    loggers = RunLoggers(resolved, run_dir, settings.method_name)
    return StageRunner(ctx, settings, resolved, run_dir, cache, loggers)


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
    runner = stage_runner(settings, resolved, run_dir)
    ctx = runner.ctx
    check_data(ctx, settings, name)
    built: dict[str, Built] = {}  # every stage obtained, by name: their costs go in the record
    try:
        final = runner.obtain(name, built)
        if not is_rank_zero():  # DDP's other ranks only train; rank 0 evaluates and reports
            return {**summary, "status": "ok", "rank": "not 0: trained only"}
        summary["stages"] = {n: {**b.record.to_json(), "checkpoint": str(b.checkpoint)}
                             for n, b in built.items()}
        summary["cache_keys"] = {n: b.record.key for n, b in built.items() if get_stage(n).base}
        summary["checkpoint"] = str(final.checkpoint)
        metrics = stage.summary_metrics(final.record.metrics)
        policy = final.model if stage.produces_policy else None
        reference = built[stage.reference].model if stage.reference else None
        # Lightning hands a trained module back on the CPU, and a network a module holds outside
        # its registered submodules (DPO's reference) stays where training put it: evaluate both
        # on the run's device
        for net in (policy, reference):
            if net is not None:
                net.to(t.device())
        samples: list[dict] = []
        per_prompt = None
        ref_cache: ReferenceCache | None = None
        with StageMeter() as eval_meter:
            if policy is not None:
                t_eval = time.perf_counter()
                e = settings.eval
                log.info("evaluation: %s split%s", e.split,
                         ", then lm-eval" if e.lm_eval.enabled else "")
                ref_cache = reference_cache(runner.cache.root, built[stage.reference], reference,
                                            resolved, summary["platform"]) \
                    if reference is not None else None
                eval_metrics, samples, per_prompt = evaluate(
                    policy, reference, ctx.task, ctx.tokenizer, e, settings.seed,
                    settings.eval_max_len, ref_cache)
                metrics.update(eval_metrics)
                if e.lm_eval.enabled:
                    lm_metrics, summary["lm_eval_command"] = lm_eval_stage(
                        ctx.task, ctx.tokenizer, e, final.checkpoint, run_dir)
                    metrics.update(lm_metrics)
                log.info("evaluation: done in %.1f s", time.perf_counter() - t_eval)
        summary["history"] = final.history
        summary["per_prompt"] = per_prompt
        costs = {**{n: b.cost for n, b in built.items()}, "eval": eval_meter.cost}
        cost = stage_costs(costs, name, time.perf_counter() - t0)
        if ref_cache is not None:  # an evaluation that read the reference's responses is shorter
            cost["cost/eval/reference_cached"] = float(ref_cache.hit)
        summary.update(status="ok", metrics=metrics, cost=cost, samples=samples)
        runner.loggers.finish({**metrics, **cost, "status": "ok"}, samples, final.checkpoint)
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(),
                       cost=stage_costs({n: b.cost for n, b in built.items()}, name,
                                        time.perf_counter() - t0))
        if is_rank_zero():
            with contextlib.suppress(RecordNotWritten):  # the run's own error is the one to raise
                write_outputs(summary, run_dir)
            runner.loggers.abort({"status": "failed"})
        raise
    write_outputs(summary, run_dir)
    return summary


def reference_cache(cache_root: Path, ref: Built, reference: torch.nn.Module,
                    resolved: dict[str, Any], platform: dict[str, Any]) -> ReferenceCache | None:
    """Where this run's reference keeps its greedy held-out responses for the next run from it
    (``<cache_dir>/ref_eval``; :class:`~harness.pipeline.evaluation.ReferenceCache`), or None for
    a reference that is not a cached base stage (no key names it)."""
    from harness.evaluation.stats import platform_identity

    if not ref.record.key:
        return None
    dtype = next((str(p.dtype) for p in reference.parameters()), "")
    identity = {"reference": ref.record.key, "trained_id": ref.record.trained_id,
                "dataset": resolved.get("dataset"),
                "precision": (resolved.get("trainer") or {}).get("precision"),
                "platform": platform_identity(platform), "threads": torch.get_num_threads(),
                "dtype": dtype}
    return ReferenceCache(cache_root / "ref_eval", identity)


def _in_multirun() -> bool:
    """Whether this run is a job of a multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _hydra_verbose() -> bool:
    """Whether ``hydra.verbose`` names any logger (then every logger keeps the level it names)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)
