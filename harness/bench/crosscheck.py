"""``python -m harness.bench.crosscheck``: TRL's trainers as reference implementations, from the
harness's own starting point, scored by the harness's own evaluation.

For each seed: the harness's SFT base of that seed (from the stage cache, trained first if it is
not there) is already a Hugging Face folder; TRL 1.16's ``GRPOTrainer`` or ``RLOOTrainer``
(oracle track: the task's gold reward) or ``DPOTrainer`` (the task's preference pairs) trains a
copy of it with the harness's settings mapped to TRL's (:func:`harness.bench.vs_trl.grpo_args`,
``rloo_args``, ``dpo_args``: the same
optimiser, schedule, batch, group, clip range, KL coefficient, loss aggregation and sampling), and
the trained policy is evaluated exactly as a harness run is (:func:`harness.pipeline.evaluation.evaluate`:
held-out gold on the test split, win rate and KL against the same SFT reference). Each becomes a
results record of method ``trl_<method>`` in the group of the harness's runs (``--group``, default
``tracks``) and on the harness method's track, so the leaderboard pairs it with the harness's own
runs of the same seeds (``trl_grpo − grpo``, prompt by prompt), and its wall time is the
trainer's: the end-to-end speed for the same number of generated responses.

What does not map (and so may differ): TRL draws its own prompt order (``RepeatSampler``) and
samples with ``transformers.generate``, so the two sides see different rollouts from the same
seed; TRL's GRPO divides by the group's std with Bessel's correction (the harness by the
population std); TRL's RLOO clips the sequence's ratio where the harness clips each token's (the
same update at one pass: :func:`~harness.bench.vs_trl.rloo_args`); TRL's DPO pads and truncates
its own way. PPO needs TRL 1.12 (``--vs-steps ppo`` of the bench); online DPO is not mapped here
(TRL's ``OnlineDPOTrainer`` samples 2 responses per prompt, the harness's best-of-k against
worst-of-k takes k = 8).

TRL is an optional extra, never in CI: ``python3 -m venv .venv-trl && . .venv-trl/bin/activate &&
pip install torch==2.13.0 && pip install -e '.[trl]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("grpo", "rloo", "dpo")
"""The harness methods with a TRL trainer mapped here."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench.crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_small", help="a preset of conf/model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="where the records go (<results>/runs/)")
    p.add_argument("--cache-dir", default=None, help="the harness's cache_dir (default: its own)")
    p.add_argument("--group", default="tracks",
                   help="the records' group: the harness's runs of the same group and track are "
                        "then paired with TRL's on the leaderboard")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: as each job of a +launch=parallel sweep computes)")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="extra harness overrides for both sides (e.g. method.n_iterations=30)")
    args = p.parse_args(argv)
    if any(s < 0 for s in args.seeds):
        p.error("--seeds: must be >= 0")
    if args.threads < 1:
        p.error("--threads: must be >= 1")
    return args


def harness_run(method: str, model: str, seed: int, overrides: list[str], cache_dir: str | None,
                run_dir: Path) -> Any:
    """The harness's stage runner (:func:`harness.pipeline.stage_runner`) of ``method`` for
    ``seed`` (its settings, task, tokenizer and stage cache), composed as ``python -m harness``
    composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.pipeline import stage_runner
    from harness.settings import register_configs, validate
    from harness.util.conf_path import config_dir

    register_configs()
    track = ["track=oracle"] if method != "dpo" else []
    extra = [f"cache_dir={cache_dir}"] if cache_dir else []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}", f"model={model}",
                                                       f"seed={seed}", "logger=none", *track,
                                                       *extra, *overrides])
    settings = validate(cfg)
    return stage_runner(settings, OmegaConf.to_container(cfg, resolve=True), run_dir)


def train_with_trl(method: str, cfg: Any, weights: Path, task: Any, tok: Any, seed: int,
                   out: Path) -> float:
    """Train ``method`` with TRL from the HF folder ``weights`` (the harness's SFT base) on the
    harness's data, save the policy to ``out``; returns the seconds ``trainer.train()`` took."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

    from harness.bench.vs_trl import (
        dpo_args,
        gold_reward,
        grpo_args,
        left_padding,
        quiet_trl,
        rloo_args,
    )

    bos, device = tok.bos_token, torch.device("cpu")
    with quiet_trl(), contextlib.redirect_stderr(io.StringIO()):
        if method in ("grpo", "rloo"):
            prompts = sorted(set(task.sft_dataset("train")["prompt"]))
            trainer_cls, args_of = {"grpo": (GRPOTrainer, grpo_args),
                                    "rloo": (RLOOTrainer, rloo_args)}[method]
            trainer = trainer_cls(model=str(weights), reward_funcs=[gold_reward(task, bos)],
                                  args=args_of(cfg, cfg.n_iterations, out / "trl", seed, device),
                                  train_dataset=Dataset.from_dict({"prompt": [bos + p for p in prompts]}),
                                  processing_class=left_padding(tok))
        else:
            pairs = task.preference_dataset("train")
            data = Dataset.from_dict({"prompt": [bos + p for p in pairs["prompt"]],
                                      "chosen": list(pairs["chosen"]), "rejected": list(pairs["rejected"])})
            trainer = DPOTrainer(model=str(weights), args=dpo_args(cfg, cfg.max_steps, out / "trl", seed, device),
                                 train_dataset=data, processing_class=left_padding(tok))
    t0 = time.perf_counter()
    with quiet_trl(), contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    wall = time.perf_counter() - t0
    trainer.save_model(str(out / "policy"))
    tok.save_pretrained(str(out / "policy"))
    return wall


def crosscheck(method: str, model: str, seed: int, overrides: list[str], cache_dir: str | None,
               results: Path, group: str = "tracks") -> dict[str, Any]:
    """One TRL run of ``method`` for ``seed``, evaluated by the harness; its record, written."""
    import torch

    from harness.evaluation.platform import platform_info
    from harness.evaluation.records import new_record, new_run_id, write_record
    from harness.models.hf import load_checkpoint
    from harness.pipeline.evaluation import evaluate

    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        root = Path(tmp)
        r = harness_run(method, model, seed, overrides, cache_dir, root / "run")
        base = r.obtain("sft")  # the harness's SFT base: the cache's, or trained now
        s, task, tok = r.settings, r.ctx.task, r.ctx.tokenizer
        torch.manual_seed(seed)
        wall = train_with_trl(method, s.method, Path(base.checkpoint), task, tok, seed, root)
        policy = load_checkpoint(root / "policy")[0]
        metrics, _, per_prompt = evaluate(policy.eval(), base.model.eval(), task, tok, s.eval,
                                          seed, s.eval_max_len)
    source = "gold" if method != "dpo" else None
    record = new_record(
        run_id=new_run_id(f"trl_{method}", model, s.dataset.name, seed), method=f"trl_{method}",
        model=model, dataset=s.dataset.name, seed=seed, group=group,
        metrics=metrics, cost={"cost/method_wall_s": wall}, cache_keys={"sft": base.record.key},
        config={**r.resolved, "trl": {"trainer": {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer",
                                                  "dpo": "DPOTrainer"}[method],
                                 "version": _trl_version()}},
        platform=platform_info("cpu"), per_prompt=per_prompt, reward_source=source,
        track="oracle" if method != "dpo" else "preferences",
        repo_path=Path(__file__).resolve().parent)
    write_record(record, results / "runs")
    return record


def _trl_version() -> str:
    import trl

    return str(trl.__version__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.bench.vs_trl import require_trl

    require_trl()
    import torch

    from harness.util.console import quiet_console

    quiet_console()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for method in args.methods:
            rec = crosscheck(method, args.model, seed, args.overrides, args.cache_dir, args.results,
                             args.group)
            m = rec["metrics"]
            print(json.dumps({"method": rec["method"], "seed": seed, "gold": m.get("eval/gold_reward"),
                              "kl": m.get("eval/kl"), "wall_s": round(rec["cost"]["cost/method_wall_s"], 1),
                              "record": rec["run_id"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
