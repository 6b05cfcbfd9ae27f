"""The stage registry: every stage of the harness, by name (``method=<name>`` picks one).

Adding a method is one module with its config dataclass, its :class:`~harness.stage.Stage` and its
Lightning module; one YAML in ``conf/method/`` naming the config (``- base_<name>``); and one line
here. The pipeline, the bench, the sweeps (``conf/sweep/compare.yaml`` globs ``conf/method``) and
the leaderboard need no change.
"""

from __future__ import annotations

from harness.stage import Registry, Stage

STAGES = Registry({
    "sft": "harness.methods.sft:SFTStage",
    "rm": "harness.methods.reward:RewardStage",
    "ppo": "harness.methods.ppo:PPOStage",
    "grpo": "harness.methods.grpo:GRPOStage",
    "dpo": "harness.methods.dpo:DPOStage",
    "rloo": "harness.methods.rloo:RLOOStage",
})


def get_stage(name: str) -> Stage:
    """The stage registered as ``name`` (its module is imported on first use)."""
    return STAGES.get(name)


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES.paths)


def base_stages() -> tuple[str, ...]:
    """The stages others build on (configured in their own sections, cached): sft, rm."""
    return tuple(n for n in stage_names() if get_stage(n).base)
