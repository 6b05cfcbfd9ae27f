"""What makes a comparison hold: seeded random streams, the platform and per-stage cost of every
record, per-prompt results for the paired test, the dapo normalisation, held-out validation
prompts for tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import RolloutConfig
from harness.data.tasks import build_task
from harness.data.tokenizer import build_tokenizer
from harness.evaluation.cost import StageCost, StageMeter
from harness.evaluation.platform import platform_info
from harness.evaluation.stats import platform_identity
from harness.methods.grpo import GRPOConfig
from harness.methods.grpo.stage import GRPOModule
from harness.methods.losses import aggregate_loss, ppo_clipped_surrogate
from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM
from harness.pipeline.outputs import stage_costs
from harness.util.seeding import STREAMS, generator, stream_seed

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- seeding
def test_stream_seeds_are_deterministic_distinct_and_named():
    assert stream_seed(0, "rollout") == stream_seed(0, "rollout")
    seeds = {stream_seed(s, n) for s in (0, 1, 2) for n in STREAMS}
    assert len(seeds) == 3 * len(STREAMS)  # no two streams of any two runs share a seed
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="unknown random stream 'rolout'"):
        stream_seed(0, "rolout")
    a = torch.rand(4, generator=generator(3, "eval_kl"))
    assert torch.equal(a, torch.rand(4, generator=generator(3, "eval_kl")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    task = build_task({"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 64, "n_eval": 16},
                      cache_dir=tmp_path_factory.mktemp("data"))
    return task, build_tokenizer(task.corpus(), vocab_size=300)


def _gold(task):
    from harness.stage import StageContext

    return StageContext(task=task, tokenizer=None, model_cfg=None, seed=0).gold_scorer()


def _grpo(tok, task, seed: int) -> GRPOModule:
    torch.manual_seed(0)  # the same weights for every module: only the rollout seed differs
    cfg = ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=64, max_seq_len=64)
    policy, ref = CausalLM(cfg), CausalLM(cfg)
    ref.load_state_dict(policy.state_dict())
    grpo = GRPOConfig(group_size=4, rollout=RolloutConfig(prompts_per_batch=4, max_new_tokens=6))
    return GRPOModule(policy, ref, tok, grpo, _gold(task), seed=seed)


def test_the_run_seed_decides_the_rollouts(tiny):
    task, tok = tiny
    prompts = [p for p in list(task.eval_dataset()["prompt"])[:4] for _ in range(4)]
    ro = {s: _grpo(tok, task, s).rollout(prompts, 64, _gold(task)) for s in (0, 1)}
    again = _grpo(tok, task, 0).rollout(prompts, 64, _gold(task))
    assert torch.equal(ro[0].response, again.response)          # same seed: same tokens
    assert torch.equal(ro[0].old_logp, again.old_logp)
    assert not torch.equal(ro[0].response, ro[1].response)      # another seed: other samples


# ------------------------------------------------------------------------------------- dapo
def test_dapo_divides_by_the_whole_rollout_batch_token_count():
    # a rollout of 2 sequences split into 2 minibatches of 1: lengths 1 and 3 tokens
    loss = torch.tensor([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    n_active = mask.sum()  # 4 tokens in the rollout
    dapo = [aggregate_loss(loss[i:i + 1], mask[i:i + 1], "dapo", n_active=n_active) for i in (0, 1)]
    bnpo = [aggregate_loss(loss[i:i + 1], mask[i:i + 1], "bnpo") for i in (0, 1)]
    assert [float(x) for x in dapo] == [1.0, 1.5]               # 4/4 and 6/4
    assert [float(x) for x in bnpo] == [4.0, 2.0]               # 4/1 and 6/3: per minibatch
    assert float(sum(dapo)) == pytest.approx(10 / 4)            # = the rollout's token mean
    whole = aggregate_loss(loss, mask, "dapo", n_active=n_active)
    assert float(whole) == pytest.approx(float(aggregate_loss(loss, mask, "bnpo")))
    # the surrogate passes it through: with A = 1, ratio 1 and no clipping l_t = -1
    adv = torch.ones_like(loss)
    pg, _ = ppo_clipped_surrogate(torch.zeros_like(loss)[:1], torch.zeros_like(loss)[:1], adv[:1],
                                  mask[:1], 0.2, aggregation="dapo", n_active=n_active)
    assert float(pg) == pytest.approx(-1 / 4)


# ------------------------------------------------------------------------------------- cost
def test_stage_meter_counts_the_stage_rise_not_what_came_before():
    with StageMeter(interval=0.01) as first:
        big = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        big += 1
        del big
    with StageMeter(interval=0.01) as second:
        small = np.ones(2**20 // 8)
        small += 1
    if not torch.cuda.is_available():
        assert first.cost.peak_mem_mb >= 150
        assert second.cost.peak_mem_mb < 50   # the first stage's peak does not carry over
    assert first.cost.wall_s > 0 and second.cost.wall_s > 0


def test_stage_costs_name_each_stage_and_the_method_own_stage():
    costs = {"sft": StageCost(100.0, 500.0, cached=True, extra={"train_tokens_per_s": 9.0}),
             "grpo": StageCost(20.0, 80.0, extra={"train_tokens_per_s": 1000.0,
                                                   "gen_tokens_per_s": 3000.0}),
             "eval": StageCost(5.0, 120.0)}
    out = stage_costs(costs, "grpo", 130.0)
    assert out["cost/wall_s"] == 130.0
    assert out["cost/sft/cached"] == 1.0 and out["cost/sft/wall_s"] == 100.0
    assert out["cost/grpo/cached"] == 0.0
    assert out["cost/method_wall_s"] == 20.0 and out["cost/method_peak_mem_mb"] == 80.0
    assert out["cost/gen_tokens_per_s"] == 3000.0 and out["cost/train_tokens_per_s"] == 1000.0
    assert out["cost/peak_mem_mb"] == 120.0   # stages run in this process; the cached SFT is not


def test_platform_info_says_where_a_result_came_from(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):  # a suite run under them
        monkeypatch.delenv(name, raising=False)
    info = platform_info("cpu")
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads() and info["gpu"] is None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    other = platform_info("cpu")
    assert other["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert platform_identity(other) != platform_identity(info)


# ------------------------------------------------------------------------------------- end to end
def _harness(tmp: Path, name: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "harness", "method=grpo", "model=llama_tiny", "sft.max_steps=30",
         "sft.val_every=15", "method.n_iterations=3", "method.rollout.prompts_per_batch=4",
         "dataset.n_train=400", "dataset.n_pairs=64", "dataset.n_eval=24", "eval.curve_points=2",
         "eval.curve_prompts=8", "eval.lm_eval.enabled=false", "logger=none",
         f"cache_dir={tmp}/cache-{name}", f"results_dir={tmp}/results",
         f"hydra.run.dir={tmp}/{name}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp / name / "summary.json").read_text())


@pytest.mark.slow
def test_one_seed_gives_the_same_run_in_two_processes_and_another_seed_another(tmp_path):
    a = _harness(tmp_path, "a", "seed=0")
    b = _harness(tmp_path, "b", "seed=0")       # another process, its own (cold) cache
    c = _harness(tmp_path, "c", "seed=1")
    timing = ("train/tokens_per_s",)  # wall-clock throughput, the only figure that may differ
    same = {k: v for k, v in a["metrics"].items() if k not in timing}
    assert same == {k: v for k, v in b["metrics"].items() if k not in timing}
    assert len(same) > 15
    assert a["per_prompt"] == b["per_prompt"]
    assert a["history"]["train/kl"] == b["history"]["train/kl"]
    assert a["history"]["train/kl"] != c["history"]["train/kl"]  # other samples (the reward of
    # a 30-step SFT model is 0 for every sample, so the KL of the sampled responses tells)
    # the record carries its platform, per-prompt rewards and per-stage cost
    record = json.loads(Path(a["record"]).read_text())
    assert record["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    pp = record["per_prompt"]
    assert pp["split"] == "test" and len(pp["gold_reward"]) == 24 == len(pp["ref_gold_reward"])
    assert np.mean(pp["gold_reward"]) == pytest.approx(record["metrics"]["eval/gold_reward"])
    assert record["reward_source"] == "gold"
    for stage in ("sft", "grpo", "eval"):
        assert record["cost"][f"cost/{stage}/wall_s"] > 0
        assert f"cost/{stage}/peak_mem_mb" in record["cost"]
    assert record["cost"]["cost/method_wall_s"] == record["cost"]["cost/grpo/wall_s"]
    assert record["cost"]["cost/gen_tokens_per_s"] > 0
    # the held-out gold curve: [step, value, trained tokens, wall s], from step 0 to the end
    curve = record["history"]["eval/gold_reward"]
    assert curve[0][0] == 0 and curve[-1][0] == 3 and len(curve[0]) == 4
    assert curve[-1][2] > curve[0][2] == 0
    # sequence-level KL, and the per-token figure under its own name
    assert "train/kl_per_token" in record["metrics"] and "train/kl" in record["metrics"]


def test_validation_prompts_never_overlap_the_test_prompts(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.pipeline.evaluation import eval_prompts
    from harness.pipeline.prepare import prepare
    from harness.settings import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=llama_tiny", "dataset.n_train=200", "dataset.n_pairs=32", "dataset.n_eval=50",
            f"cache_dir={tmp_path}/cache", "logger=none"])
    from harness.settings import validate

    settings = validate(cfg)
    task, e = prepare(settings, tmp_path / "cache").task, settings.eval
    test, val = eval_prompts(task, e, "test"), eval_prompts(task, e, "validation")
    assert len(test) == 50 and len(val) == 50 and len(set(val)) == 50
    assert not set(test) & set(val)
    assert eval_prompts(task, e, "validation", limit=8) == val[:8]


# ------------------------------------------------------------------------------------- tuning
def _tune_record(method: str, seed: int, kl: float, lr: float, gold: float, split="validation",
                 created="2026-12-01T00:00:00+00:00", track: str | None = None,
                 iterations: int = 300) -> dict:
    field = "beta"
    out = {"run_id": f"{method}-{seed}-{kl}-{lr}-{created}-{track}", "status": "ok",
           "method": method, "model": "m", "dataset": "d", "seed": seed, "group": "tune",
           "created": created, "metrics": {"eval/gold_reward": gold}, "per_prompt": {"split": split},
           "config": {"seed": seed, "dataset": {"name": "d", "seed": seed},
                      "method": {field: kl, "n_iterations": iterations, "optim": {"lr": lr}}}}
    if track is not None:
        out["track"] = track
    return out


def test_tuning_picks_the_best_mean_validation_gold_per_method():
    from harness.tuning import best_settings

    recs = [_tune_record("dpo", 0, 0.1, 1e-4, 0.70), _tune_record("dpo", 1, 0.1, 1e-4, 0.80),  # 0.75
            _tune_record("dpo", 0, 0.5, 1e-4, 0.90), _tune_record("dpo", 1, 0.5, 1e-4, 0.50),  # 0.70
            # a repeated seed is one sample (the latest), never an extra seed
            _tune_record("dpo", 1, 0.5, 1e-4, 0.20, created="2026-12-01T00:00:01+00:00"),
            # test-split results never decide the tuning
            _tune_record("dpo", 0, 1.0, 1e-4, 0.99, split="test"),
            _tune_record("ppo", 0, 0.2, 3e-5, 0.6), _tune_record("ppo", 0, 1.0, 3e-5, 0.6)]
    best = best_settings(recs)
    dpo = best[("dpo", "m", "d", "preferences")]  # an offline pair method's track
    assert (dpo["kl"], dpo["lr"], dpo["n_seeds"]) == (0.1, 1e-4, 2)
    assert dpo["gold"] == pytest.approx(0.75)
    ppo = best[("ppo", "m", "d", "")]  # a record that names no track nor reward source
    assert ppo["kl"] == 0.2  # a tie goes to the smaller KL coefficient
    assert ppo["overrides"] == "method=ppo method.beta=0.2 method.optim.lr=3e-05"


def test_tuning_picks_a_setting_per_track():
    """GRPO on the gold reward is best at a small KL, on the reward model at a large one: each
    track gets its own winner, and its overrides name the track."""
    from harness.tuning import best_settings

    recs = [_tune_record("grpo", s, kl, 3e-4, gold, track=track)
            for s in (0, 1)
            for track, kl, gold in (("oracle", 0.04, 0.8), ("oracle", 0.1, 0.7),
                                    ("preferences", 0.04, 0.1), ("preferences", 0.1, 0.4))]
    best = best_settings(recs)
    assert best[("grpo", "m", "d", "oracle")]["kl"] == 0.04
    assert best[("grpo", "m", "d", "preferences")]["kl"] == 0.1
    assert best[("grpo", "m", "d", "preferences")]["overrides"] == \
        "method=grpo track=preferences method.beta=0.1 method.optim.lr=0.0003"


def test_tuning_compares_the_newest_grid_only():
    """A grid run under an older budget never competes with the current one, however well it
    scored; its records are counted as left out. The seeds of one grid are one family."""
    from harness.tuning import best_settings, grid_family

    new = "2026-12-07T00:00:00+00:00"
    recs = [_tune_record("grpo", s, kl, 3e-4, gold, created=new, track="oracle")
            for s in (0, 1) for kl, gold in ((0.04, 0.7), (0.1, 0.6))]
    recs += [_tune_record("grpo", s, 0.0, 1e-3, 0.99, track="oracle", iterations=100)
             for s in (0, 1)]  # an older grid at another budget
    assert len({grid_family(r) for r in recs[:4]}) == 1
    best = best_settings(recs)[("grpo", "m", "d", "oracle")]
    assert (best["kl"], best["lr"], best["n_seeds"], best["left_out"]) == (0.04, 3e-4, 2, 2)
    assert best["gold"] == pytest.approx(0.7)


def test_tuning_names_a_winner_at_its_grids_edge(monkeypatch, capsys):
    """A winner on the edge of its grid is named (extend the grid there before trusting it); an
    interior winner, or one at a KL coefficient of 0 (the floor), is not. The printed line keeps
    the overrides after its last ': ' (sweeps/tuned.sh reads them there)."""
    from harness.tuning import best_settings, grid_edges, main

    assert grid_edges(0.1, 3e-4, [0.05, 0.1, 0.2], [1e-4, 3e-4, 1e-3]) == []
    assert grid_edges(0.2, 1e-4, [0.05, 0.1, 0.2], [1e-4, 3e-4, 1e-3]) == ["largest β", "smallest lr"]
    assert grid_edges(0.05, 1e-3, [0.05, 0.1, 0.2], [1e-4, 3e-4, 1e-3]) == ["smallest β", "largest lr"]
    assert grid_edges(0.0, 3e-4, [0.0, 0.04, 0.1], [1e-4, 3e-4, 1e-3]) == []  # β 0 is the floor
    assert grid_edges(0.1, 3e-4, [0.1], [3e-4]) == []  # one value: no axis to extend

    recs = [_tune_record("rloo", s, kl, lr, gold, track="oracle")
            for s in (0, 1) for kl, lr, gold in ((0.01, 3e-4, 0.8), (0.05, 3e-4, 0.7),
                                                 (0.05, 1e-4, 0.6), (0.05, 1e-3, 0.5))]
    best = best_settings(recs)[("rloo", "m", "d", "oracle")]
    assert (best["kl"], best["edges"]) == (0.01, ["smallest β"])
    recs += [_tune_record("rloo", s, 0.005, 3e-4, 0.75, track="oracle") for s in (0, 1)]
    assert best_settings(recs)[("rloo", "m", "d", "oracle")]["edges"] == []  # extended: interior

    import harness.tuning

    monkeypatch.setattr(harness.tuning, "load_records", lambda runs: recs[:8])  # before extending
    assert main([]) == 0
    line = capsys.readouterr().out.strip()
    assert "at the grid's smallest β)" in line
    assert line.rsplit(": ", 1)[1] == "method=rloo track=oracle method.beta=0.01 method.optim.lr=0.0003"


TUNED = ("dpo", "grpo", "online_dpo", "ppo", "rloo")


def test_every_aligning_method_has_a_tuning_grid_of_one_size():
    """One budget for every method: 3 KL coefficients x 3 learning rates x 2 seeds each, and a
    grid for every aligning method in conf/method."""
    import yaml

    methods = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")} - {"sft", "rm"}
    methods = {m for m in methods if not m.startswith("base_")}
    assert methods == set(TUNED)
    sizes = {}
    for path in (ROOT / "conf" / "sweep").glob("tune_*.yaml"):  # a track's own grids too
        params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
        params = {"seed": "0,1", **params}  # a track's grid keeps its base grid's seeds
        sizes[path.stem] = tuple(len(str(params[k]).split(","))
                                 for k in ("method.beta", "method.optim.lr", "seed"))
    assert {f"tune_{m}" for m in TUNED} <= set(sizes)
    assert set(sizes.values()) == {(3, 3, 2)}, sizes


@pytest.mark.parametrize("method", [*TUNED, *(f"{m}_preferences" for m in TUNED if m != "dpo")])
def test_tuning_sweeps_evaluate_on_the_validation_split(method):
    from hydra import compose, initialize_config_dir

    from harness.settings import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep=tune_{method}"],
                      return_hydra_config=True)
    assert cfg.method.name == method.removesuffix("_preferences")
    assert cfg.eval.split == "validation" and cfg.group == "tune"
    assert cfg.track == ("preferences" if method.endswith("_preferences") else None)
    params = cfg.hydra.sweeper.params
    assert "method.optim.lr" in params and len(str(params["seed"]).split(",")) >= 2


@pytest.mark.parametrize(("override", "field"), [("eval.split=train", "eval.split"),
                                                   ("eval.curve_points=-1", "eval.curve_points")])
def test_bad_eval_values_are_refused_naming_the_field(override, field):
    from hydra import compose, initialize_config_dir

    from harness.config import ConfigError
    from harness.settings import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError, match=field):
        validate(cfg)
