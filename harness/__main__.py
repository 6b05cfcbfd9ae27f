"""``python -m harness [overrides]``: the Hydra entry point. Thin: compose -> run the pipeline."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from harness.pipeline import run  # heavy imports only once a run really starts
    from harness.report import print_summary

    summary = run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))
    print_summary(summary)
    return summary.get("metrics", {}).get("eval/gold_reward")


if __name__ == "__main__":
    main()
