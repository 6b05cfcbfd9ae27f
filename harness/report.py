"""The short human-readable summary printed at the end of a run."""

from __future__ import annotations

from typing import Any


def print_summary(summary: dict[str, Any]) -> None:
    """Print the run directory, the stages (trained or reused) and the headline metrics."""
    print(f"\nrun: {summary['method']} | model {summary['model']} | dataset {summary['dataset']}"
          f" | seed {summary['seed']} -> {summary['status']}")
    for name, stage in summary.get("stages", {}).items():
        how = "reused from cache" if stage.get("cached") else "trained"
        key = stage.get("key") or "this run"
        print(f"  stage {name:<5} {key} ({how}) -> {stage['checkpoint']}")
    for k, v in {**summary.get("metrics", {}), **summary.get("cost", {})}.items():
        if k.startswith(("eval/", "cost/")):
            print(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
    print(f"  summary: {summary['run_dir']}/summary.json")
