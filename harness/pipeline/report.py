"""The short human-readable summary printed at the end of a run."""

from __future__ import annotations

from typing import Any

#: the few numbers that matter, in this order (label, key); the rest is in summary.json
HEADLINE = (("gold reward", "eval/gold_reward"), ("SFT reference", "eval/ref_gold_reward"),
            ("pref accuracy", "eval/pref_accuracy"), ("SFT pref accuracy", "eval/ref_pref_accuracy"),
            ("implicit-reward acc", "eval/reward_accuracy"),
            ("win rate", "eval/win_rate"), ("KL (nats/seq)", "eval/kl"),
            ("RM accuracy", "eval/rewards_acc"), ("method time (s)", "cost/method_wall_s"),
            ("method memory (MiB)", "cost/method_peak_mem_mb"), ("run time (s)", "cost/wall_s"))


def print_summary(summary: dict[str, Any]) -> None:
    """Print the run directory, the stages (trained or reused) and the headline metrics."""
    print(f"\nrun: {summary['method']} | model {summary['model']} | dataset {summary['dataset']}"
          f" | seed {summary['seed']} -> {summary['status']}")
    for name, stage in summary.get("stages", {}).items():
        how = "reused from cache" if stage.get("cached") else "trained"
        key = stage.get("key") or "this run"
        print(f"  stage {name:<5} {key} ({how}) -> {stage['checkpoint']}")
    values = {**summary.get("metrics", {}), **summary.get("cost", {})}
    n = int(values.get("eval/n_prompts", 0))
    for label, key in HEADLINE:
        if key in values:
            note = f"  ({n} held-out prompts, {summary['config']['eval']['split']} split)" \
                if key in ("eval/gold_reward", "eval/pref_accuracy") and n else ""
            print(f"  {label:<20} {values[key]:.4g}{note}")
    print(f"  summary: {summary['run_dir']}/summary.json")
