"""Where a step's time goes (:mod:`harness.util.step_profile`): the phase split from a profiler's
durations, the regions the methods mark, and ``trainer.profiler`` on the real entry point."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler

from harness.config import ConfigError, TrainerConfig
from harness.util.step_profile import (
    BATCH_ACTION,
    action,
    build_profiler,
    counts,
    format_split,
    phase_rows,
    phase_seconds,
)


def test_manual_optimisation_phases_are_their_regions_and_other_is_the_rest():
    durations = {BATCH_ACTION: [1.0, 1.2], action("sample"): [0.3, 0.5],
                 action("reference"): [0.1, 0.1], action("forward"): [0.1, 0.1, 0.1, 0.1],
                 action("backward"): [0.15, 0.15, 0.15, 0.15], action("optimizer"): [0.05] * 4}
    split = phase_seconds(durations)
    # per batch: totals / 2 batches
    assert split["batch"] == pytest.approx(1.1)
    assert split["sample"] == pytest.approx(0.4)
    assert split["reference"] == pytest.approx(0.1)
    assert split["forward"] == pytest.approx(0.2)
    assert split["backward"] == pytest.approx(0.3)
    assert split["optimizer"] == pytest.approx(0.1)
    assert split["other"] == pytest.approx(1.1 - 0.4 - 0.1 - 0.2 - 0.3 - 0.1)
    assert "value" not in split and "reward" not in split  # phases the method never ran


def test_automatic_optimisation_splits_the_step_around_its_closure():
    # optimizer_step = 0.5 holds the closure 0.4 (training_step + zero_grad + backward 0.25)
    durations = {BATCH_ACTION: [0.55], action("step"): [0.5], action("closure"): [0.4],
                 action("backward"): [0.25]}
    split = phase_seconds(durations)
    assert split["forward"] == pytest.approx(0.15)
    assert split["backward"] == pytest.approx(0.25)
    assert split["optimizer"] == pytest.approx(0.1)
    assert split["other"] == pytest.approx(0.05)
    # a phase training_step marks itself (DPO's reference look-up) is not forward's
    split = phase_seconds({**durations, action("reference"): [0.05]})
    assert split["reference"] == pytest.approx(0.05) and split["forward"] == pytest.approx(0.1)
    assert split["other"] == pytest.approx(0.05)


def test_since_leaves_the_warm_up_out():
    durations = {BATCH_ACTION: [9.0, 1.0], action("forward"): [8.0, 0.4]}
    warm = {BATCH_ACTION: 1, action("forward"): 1}
    split = phase_seconds(durations, warm)
    assert split["batch"] == pytest.approx(1.0) and split["forward"] == pytest.approx(0.4)
    assert counts(durations) == {BATCH_ACTION: 2, action("forward"): 2}
    with pytest.raises(ValueError, match="no training batch recorded"):
        phase_seconds(durations, counts(durations))


def test_rows_and_text_give_each_phase_its_share():
    split = {"forward": 0.3, "backward": 0.5, "other": 0.2, "batch": 1.0}
    rows = phase_rows(split)
    assert [r["phase"] for r in rows] == ["forward", "backward", "other"]
    assert [r["share"] for r in rows] == pytest.approx([30.0, 50.0, 20.0])
    text = format_split(split, "title")
    assert text.splitlines()[0] == "title" and "backward" in text and "50.0%" in text


def test_profiler_choices_are_lightnings_and_a_bad_one_names_the_field(tmp_path):
    assert build_profiler(None) is None
    assert isinstance(build_profiler("simple"), SimpleProfiler)
    assert isinstance(build_profiler("advanced", tmp_path, "x"), AdvancedProfiler)
    with pytest.raises(ValueError, match="profiler='fast'"):
        build_profiler("fast")
    TrainerConfig(profiler="simple").check()
    with pytest.raises(ConfigError, match=r"trainer\.profiler"):
        TrainerConfig(profiler="fast").check()
    assert "profiler" not in TrainerConfig(profiler="simple").kwargs()


def test_dpo_step_regions_cover_forward_backward_and_optimizer(tmp_path):
    """A real DPO stage under SimpleProfiler: every automatic-optimisation phase is recorded and
    the phases add up to no more than the batch."""
    from pathlib import Path

    from harness.bench.common import model_config, quiet
    from harness.bench.steps import bench_method_steps, prepare_data

    with quiet():
        task, tok = prepare_data(32, Path(tmp_path), 0)
    row = bench_method_steps("dpo", model_config("llama_tiny", len(tok)), task, tok, 4, iters=2,
                             warmup=1, device=torch.device("cpu"), profile=True)
    split = row["phases"]
    # the steps section scores a pair's reference log-probs when a batch first needs them
    assert set(split) == {"reference", "forward", "backward", "optimizer", "other", "batch"}
    assert all(split[k] > 0 for k in ("reference", "forward", "backward", "optimizer", "batch"))
    assert split["other"] >= -1e-3  # the rest of the batch, up to timer resolution
    unprofiled = bench_method_steps("dpo", model_config("llama_tiny", len(tok)), task, tok, 4,
                                    iters=1, warmup=1, device=torch.device("cpu"))
    assert unprofiled["phases"] is None


def _timing(key: str) -> bool:
    return key.startswith("cost/") or "per_s" in key or key.endswith("_s")


def test_a_profiled_run_reports_phases_and_computes_what_an_unprofiled_one_does(tmp_path):
    """``trainer.profiler=simple`` on a PPO run (SFT and reward model: automatic optimisation;
    PPO: manual, with its critic): a report and a phase split per stage (file and logger), and
    every metric that is not a timing equal to the same run without a profiler."""
    from hydra import compose, initialize_config_dir

    from harness.pipeline import run
    from harness.settings import register_configs
    from harness.util.conf_path import config_dir

    def composed(overrides: list[str]):
        register_configs()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    tiny = ["model=llama_tiny", "method=ppo", "sft.max_steps=4", "rm.max_steps=4",
            "method.n_iterations=2", "method.rollout.prompts_per_batch=4",
            "method.minibatch_size=2", "eval.limit=4", "logger=csv", "dataset.n_train=200",
            "dataset.n_pairs=64", "trainer.enable_progress_bar=false",
            "eval.lm_eval.enabled=false", "results_dir=null"]
    runs = {}
    for kind in ("simple", "null"):
        out = tmp_path / kind
        runs[kind] = run(composed([*tiny, f"trainer.profiler={kind}",
                                   f"cache_dir={tmp_path}/cache-{kind}"]), out)
        assert runs[kind]["status"] == "ok"
    profiled = tmp_path / "simple" / "profile"
    for stage, phases in (("sft", {"forward", "backward", "optimizer"}),
                          ("rm", {"forward", "backward", "optimizer"}),
                          ("ppo", {"sample", "reward", "reference", "value", "forward",
                                   "backward", "optimizer"})):
        assert (profiled / f"fit-{stage}.txt").is_file(), stage  # Lightning's own report
        split = json.loads((profiled / f"{stage}-phases.json").read_text())
        assert phases | {"other", "batch"} == set(split), stage
        assert all(split[p] > 0 for p in phases), (stage, split)
        assert sum(split[p] for p in phases) <= split["batch"] * 1.01, (stage, split)
    assert not (tmp_path / "null" / "profile").exists()
    # the split is in each stage's logger too (CSV here; W&B: the stage run's summary)
    for kind, present in (("simple", True), ("null", False)):
        (csv,) = [p for p in (tmp_path / kind).rglob("metrics.csv") if p.parent.name == "ppo"]
        assert ("profile/batch_s" in csv.read_text().splitlines()[0]) is present, kind
    a, b = runs["simple"]["metrics"], runs["null"]["metrics"]
    compared = [k for k in a if not _timing(k)]
    assert len(compared) > 10 and {k for k in b if not _timing(k)} == set(compared)
    for k in compared:
        assert a[k] == b[k], k
