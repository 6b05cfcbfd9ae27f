"""The real entry point, ``python -m harness``, with tiny overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agreement import assert_runs_agree
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_offline import find_runs, read_run

ROOT = Path(__file__).resolve().parents[1]


def harness(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_runs_started_together_keep_their_own_folders_and_records(tmp_path):
    """Run folders are named by the clock *and* a per-command id: same-second runs never share."""
    env = {**os.environ, "WANDB_MODE": "offline", "HARNESS_RUN_UID": "inherited"}
    tiny = ["method=dpo", "model=llama_tiny", "sft.max_steps=2", "method.max_steps=2",
            "eval.limit=4", "logger=none", "eval.lm_eval.enabled=false",
            f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results"]
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *tiny, f"method.beta={b}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for b in (0.1, 0.9)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    summaries = sorted(tmp_path.glob("outputs/*/*/summary.json"))
    assert len(summaries) == 2  # two folders, not one shared
    betas = sorted(json.loads(s.read_text())["config"]["method"]["beta"] for s in summaries)
    assert betas == [0.1, 0.9]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert sorted(r["config"]["method"]["beta"] for r in records) == [0.1, 0.9]
    assert all("inherited" not in s.parent.name for s in summaries)  # each command draws its own id


def test_a_truncated_cached_checkpoint_is_detected_and_retrained(tmp_path):
    tiny = ["method=dpo", "model=llama_tiny", "sft.max_steps=2", "method.max_steps=2",
            "eval.limit=4", "logger=none", "eval.lm_eval.enabled=false",
            f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results"]
    first = harness(*tiny, f"hydra.run.dir={tmp_path}/r1")
    assert first.returncode == 0, first.stderr[-3000:]
    (weights,) = (tmp_path / "cache" / "stages").glob("sft-*/checkpoint/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled up, a copy cut short
    again = harness(*tiny, f"hydra.run.dir={tmp_path}/r2")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"cached stage {weights.parents[1].name} at {weights.parents[1]} is damaged" in log
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["stages"]["sft"]["cached"] is False and summary["status"] == "ok"


def test_damaged_cached_data_and_tokenizer_are_rebuilt_and_the_run_computes_the_same(tmp_path):
    """One byte changed in a cached pairs arrow file, a truncated cached tokenizer.json: the next
    run reports each, builds them again and computes what the first run computed."""
    tiny = ["method=dpo", "model=llama_tiny", "sft.max_steps=2", "method.max_steps=2",
            "eval.limit=4", "logger=none", "eval.lm_eval.enabled=false",
            f"cache_dir={tmp_path}/cache", "results_dir=null"]
    first = harness(*tiny, f"hydra.run.dir={tmp_path}/r1")
    assert first.returncode == 0, first.stderr[-3000:]
    arrow = next((tmp_path / "cache" / "data").glob("arith-*/pairs-train/*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x01
    arrow.write_bytes(bytes(data))
    (tok,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    tok.write_text(tok.read_text()[:200])
    again = harness(*tiny, f"hydra.run.dir={tmp_path}/r2")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "pairs-train is damaged" in log and "tokenizer: cached" in log
    one, two = ({k: v for k, v in json.loads((tmp_path / r / "summary.json").read_text())["metrics"].items()
                 if "per_s" not in k} for r in ("r1", "r2"))  # every metric but the clock's
    assert one == two


def test_cfg_job_composes_and_help_lists_groups():
    out = harness("model=moe_small", "method=sft", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "name: moe_small" in out.stdout and "n_experts: 4" in out.stdout
    helped = harness("--help")
    for group in ("model:", "method:", "dataset:", "trainer:", "logger:"):
        assert group in helped.stdout


def test_unknown_option_lists_the_choices():
    out = harness("method=foo")
    assert out.returncode != 0
    assert "Could not find 'method/foo'" in out.stderr and "sft" in out.stderr


@pytest.mark.parametrize(("override", "field"), [
    ("model.n_heads=0", "model.n_heads"),
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model=moe_small model.top_k=9", "model.top_k"),
    ("method=grpo method.optim.lr=-1", "method.optim.lr"),
    ("sft.optim.lr=-1", "sft.optim.lr"),
    ("method=rloo method.group_size=1", "method.group_size"),
    ("results_dir=/proc/version/results", "results_dir"),  # a file where a folder should be
])
def test_bad_values_fail_before_any_work_naming_the_field(override, field, tmp_path):
    out = harness(*override.split(), f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/c",
                  "logger=none")
    assert out.returncode != 0
    assert field in out.stderr
    assert not (tmp_path / "c" / "stages").exists() or not any((tmp_path / "c" / "stages").iterdir())


@pytest.mark.slow
def test_sft_run_writes_summary_checkpoint_and_offline_wandb_then_reuses_cache(tmp_path):
    common = ["model=llama_tiny", "sft.max_steps=40", "sft.val_every=20", "eval.limit=20",
              f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results"]
    out = harness(*common, f"hydra.run.dir={tmp_path}/run1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{tmp_path}/run1" in out.stdout  # prints where the run went
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["config"]["model"]["name"] == "llama_tiny"
    assert summary["stages"]["sft"]["cached"] is False
    assert 0.0 <= summary["metrics"]["eval/gold_reward"] <= 1.0
    assert summary["cost"]["cost/wall_s"] > 0 and summary["cost"]["cost/peak_mem_mb"] > 0
    # lm-eval scored the checkpoint: its gold task equals the harness's own gold reward
    m = summary["metrics"]
    assert m["eval/harness_arith_gold/gold_reward"] == pytest.approx(m["eval/gold_reward"])
    assert 0.0 <= m["eval/harness_arith_pref/acc"] <= 1.0
    assert m["eval/harness_arith_ppl/byte_perplexity"] > 1.0
    assert summary["lm_eval_command"].startswith("lm_eval --model hf")
    # one results record, matching the summary
    record = json.loads(Path(summary["record"]).read_text())
    assert record["status"] == "ok" and record["metrics"] == summary["metrics"]
    assert record["cache_keys"]["sft"] == summary["cache_keys"]["sft"]
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "config.json").is_file() and (ckpt / "harness_config.yaml").is_file()
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(ckpt).eos_token == "<eos>"

    runs = find_runs(tmp_path / "run1" / "wandb")
    assert len(runs) == 1
    run = read_run(runs[0])
    assert run.job_type == "sft" and "method:sft" in run.tags and run.group == "default"
    assert "eval/samples" in run.tables
    assert run.config["model.name"] == "llama_tiny"
    losses = run.metric("train/loss")
    assert len(losses) >= 2 and all(v == v for _, v in losses)
    assert run.summary["eval/gold_reward"] == pytest.approx(summary["metrics"]["eval/gold_reward"])

    # the same command again reuses the cached stage
    again = harness(*common, f"hydra.run.dir={tmp_path}/run2")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert second["stages"]["sft"]["cached"] is True
    assert second["cache_keys"]["sft"] == summary["cache_keys"]["sft"]
    assert "reused from cache" in again.stdout
    assert second["metrics"]["eval/gold_reward"] == summary["metrics"]["eval/gold_reward"]
    # method=sft is configured under sft.*: method.* stops before any work, naming the field
    wrong = harness(*common, "method.max_steps=7", f"hydra.run.dir={tmp_path}/run3")
    assert wrong.returncode != 0 and "use sft.max_steps" in wrong.stderr
    assert not (tmp_path / "run3").exists()


@pytest.mark.parametrize("sweep", [
    ["method=grpo", "method.beta=0.1,-1"],                 # a grid on the command line
    ["+sweep=compare", "seed=0,-1"],                        # a sweep config's params (and its glob)
])
def test_a_sweep_with_one_bad_value_stops_before_its_first_job(tmp_path, sweep):
    out = harness("-m", *sweep, "logger=none", f"cache_dir={tmp_path}/cache",
                  f"results_dir={tmp_path}/results", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and "(sweep job: " in last
    assert last.endswith("; no job was launched)")
    assert ("method.beta=-1.0: must be >= 0.0" in last) if "method=grpo" in sweep else \
        ("seed=-1: must be >= 0" in last)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no sweep folder, cache or record


def test_the_sweep_check_expands_jobs_as_the_basic_sweeper():
    from hydra import compose, initialize_config_dir

    from harness.settings import register_configs
    from harness.tracking.sweep_check import sweep_jobs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=compare", "logger=none"],
                      return_hydra_config=True)
        jobs = sweep_jobs(cfg)
    # the sweep config's glob over conf/method, its models and seeds, then the command line
    assert jobs is not None and len(jobs) == 4 * 2 * 3
    assert {tuple(j) for j in jobs} == {
        (f"method={m}", f"model={mo}", f"seed={s}", "+sweep=compare", "logger=none")
        for m in ("dpo", "grpo", "ppo", "rloo") for mo in ("llama_small", "moe_small")
        for s in (0, 1, 2)}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=tracks_preferences", "seed=0"],
                      return_hydra_config=True)
        jobs = sweep_jobs(cfg)
    assert cfg.track == "preferences" and cfg.group == "tracks"
    assert sorted(j[0] for j in jobs) == [f"method={m}" for m in
                                          ("dpo", "grpo", "online_dpo", "ppo", "rloo")
                                          for _ in ("llama_small", "moe_small")]


@pytest.mark.slow
def test_multirun_sweep_shares_the_sft_base_and_rebuilds_the_leaderboard(tmp_path):
    # (overrides apply to every job, and Hydra composes the sweep's base config with the default
    # method: a sweep over methods sets their fields in a sweep config, as conf/sweep/compare.yaml)
    out = harness("-m", "model=llama_tiny", "method=rloo", "method.beta=0.0,0.1", "sft.max_steps=20",
                  "sft.val_every=10", "method.n_iterations=2", "method.group_size=2", "eval.limit=8",
                  "eval.lm_eval.enabled=false", "eval.curve_points=0", "logger=none",
                  "dataset.n_train=500", "dataset.n_pairs=100", "group=tiny_sweep",
                  f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results",
                  f"hydra.sweep.dir={tmp_path}/sweep", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    keys = {json.loads(p.read_text())["cache_keys"]["sft"] for p in summaries}
    assert len(keys) == 1  # both jobs start from the same SFT base
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "rloo" in board and "python -m harness" in board
    assert (tmp_path / "results" / "reward_kl.png").is_file()
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 2


@pytest.mark.slow
def test_preference_data_runs_end_to_end_and_reaches_the_leaderboard(tmp_path):
    """dataset=preference on a local file: DPO and the reward model train, evaluation falls back to
    held-out preference accuracy and KL (no gold reward), and the leaderboard shows them."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}: say yes.", "chosen": f" yes {i}",
                                         "rejected": f" no {i}"}) + "\n" for i in range(40)))
    data = ["dataset=preference", "dataset.path=json", f"+dataset.data_files={{train: {pairs}}}",
            "dataset.val_fraction=0.1"]
    tiny = ["model=llama_tiny", "sft.max_steps=2", "logger=none", "eval.lm_eval.enabled=false",
            f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results"]
    dpo = harness("method=dpo", "method.max_steps=2", *data, *tiny, f"hydra.run.dir={tmp_path}/dpo")
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    m = json.loads((tmp_path / "dpo" / "summary.json").read_text())["metrics"]
    assert m["eval/n_prompts"] == 4.0  # the 10% validation pairs (the file has no test split)
    for key in ("eval/pref_accuracy", "eval/ref_pref_accuracy", "eval/reward_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert "eval/kl" in m and "eval/gold_reward" not in m
    assert "pref accuracy" in dpo.stdout
    rm = harness("method=rm", "rm.max_steps=2", "rm.val_every=2", *data, *tiny, f"hydra.run.dir={tmp_path}/rm")
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert 0.0 <= json.loads((tmp_path / "rm" / "summary.json").read_text())["metrics"][
        "eval/rewards_acc"] <= 1.0
    grpo = harness("method=grpo", *data, *tiny, f"hydra.run.dir={tmp_path}/grpo")
    assert grpo.returncode != 0 and "method.reward_source='gold'" in grpo.stderr
    assert not (tmp_path / "grpo" / "summary.json").exists()  # refused before any work
    from harness.evaluation.leaderboard import build_leaderboard

    md = build_leaderboard(tmp_path / "results" / "runs", tmp_path / "lb",
                           screenshot=False)["markdown"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert "| KL | Pref ↑ | SFT pref |" in header
    assert any(line.startswith("| dpo | llama_tiny | preference |") for line in md.splitlines())


@pytest.mark.parametrize(("launch", "target"), [("parallel", "joblib"), ("slurm", "submitit"),
                                                 ("ray", "ray")])
def test_launch_configs_compose(launch, target):
    """+launch=parallel|slurm|ray select Hydra's joblib / submitit / Ray launchers."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    from harness.settings import register_configs

    plugin = {"parallel": "hydra_plugins.hydra_joblib_launcher",
              "slurm": "hydra_plugins.hydra_submitit_launcher",
              "ray": "hydra_plugins.hydra_ray_launcher"}[launch]
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed (the {launch} launcher is an optional extra)")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+launch={launch}"],
                      return_hydra_config=True)
    assert target in cfg.hydra.launcher._target_.lower()
    if launch == "parallel":
        assert cfg.trainer.threads == 1


@pytest.mark.slow
def test_a_joblib_sweep_trains_the_shared_stage_once_and_keeps_every_record(tmp_path):
    out = harness("-m", "+launch=parallel", "hydra.launcher.n_jobs=2", "method=dpo",
                  "method.beta=0.1,0.2,0.3,0.4", "model=llama_tiny", "sft.max_steps=4",
                  "method.max_steps=2", "eval.limit=4", "eval.lm_eval.enabled=false", "logger=none",
                  f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/results",
                  f"hydra.sweep.dir={tmp_path}/sweep", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert sorted(s["config"]["method"]["beta"] for s in summaries) == [0.1, 0.2, 0.3, 0.4]
    assert sorted(s["stages"]["sft"]["cached"] for s in summaries) == [False, True, True, True]
    assert len(list((tmp_path / "cache" / "stages").glob("sft-*/stage.json"))) == 1
    assert all(s["platform"]["threads"] == 1 for s in summaries)
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert sorted(r["config"]["method"]["beta"] for r in records) == [0.1, 0.2, 0.3, 0.4]
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_a_relaunched_sweep_runs_only_the_jobs_it_has_no_ok_record_of(tmp_path):
    """A sweep over seeds 0-1, then the same sweep over seeds 0-3 (as if the first had been cut
    off after two jobs): the second runs seeds 2 and 3 only, and the folder holds 4 records."""
    common = ["-m", "method=sft", "model=llama_tiny", "sft.max_steps=4", "eval.limit=4",
              "eval.lm_eval.enabled=false", "logger=none", f"cache_dir={tmp_path}/cache",
              f"results_dir={tmp_path}/results"]
    first = harness(*common, "seed=0,1", f"hydra.sweep.dir={tmp_path}/first")
    assert first.returncode == 0, first.stderr[-3000:]
    again = harness(*common, "seed=0,1,2,3", f"hydra.sweep.dir={tmp_path}/again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("-> skipped, done before") == 2
    ran = sorted(json.loads(p.read_text())["seed"] for p in (tmp_path / "again").glob("*/summary.json"))
    assert ran == [2, 3]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert sorted(r["seed"] for r in records) == [0, 1, 2, 3]
    # skip_done=false runs a done job again, as a new record beside the old one
    forced = harness(*common, "seed=0", "skip_done=false", f"hydra.sweep.dir={tmp_path}/forced")
    assert forced.returncode == 0 and "skipped" not in forced.stdout
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 5


@pytest.mark.slow
def test_records_never_replace_each_other_whatever_the_run_folders_are_called(tmp_path):
    """Run folders whose names once made records collide (a group with a slash, a space against
    an underscore) or be refused (a non-ASCII name): every run keeps its own record."""
    common = ["method=sft", "model=llama_tiny", "sft.max_steps=2", "eval.limit=4",
              "eval.lm_eval.enabled=false", "logger=none", f"cache_dir={tmp_path}/cache",
              f"results_dir={tmp_path}/results"]
    runs = [("group=team/exp", "sft.optim.lr=0.003", f"hydra.run.dir={tmp_path}/team/exp/0"),
            ("group=team/exp", "sft.optim.lr=0.001", f"hydra.run.dir={tmp_path}/team/exp/1"),
            ("seed=0", f"hydra.run.dir='{tmp_path}/D/exp 1/run'"),
            ("seed=1", f"hydra.run.dir='{tmp_path}/D/exp_1/run'"),
            ("seed=2", f"hydra.run.dir='{tmp_path}/D/α/run'")]
    for extra in runs:
        out = harness(*common, *extra)
        assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert len(records) == 5 and len({r["run_id"] for r in records}) == 5
    assert sorted(r["config"]["sft"]["optim"]["lr"] for r in records if r["group"] == "team/exp") \
        == [0.001, 0.003]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo", "ppo"])
def test_every_method_runs_under_two_process_ddp_and_reports_once(method, tmp_path):
    """trainer=ddp on CPU (gloo, 2 processes, one thread each): the stage chain trains in both
    ranks without waiting on its own cache lock, rank 0 alone commits stages and writes the
    summary and the single results record."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WANDB_MODE": "offline"}
    budget = {"dpo": ["method.max_steps=2"], "grpo": ["method.n_iterations=2"],
              "ppo": ["method.n_iterations=2", "rm.max_steps=2"]}[method]
    out = subprocess.run([sys.executable, "-m", "harness", f"method={method}", "trainer=ddp",
                          "model=llama_tiny", "sft.max_steps=4", *budget, "eval.limit=4",
                          "logger=none", "eval.lm_eval.enabled=false", f"cache_dir={tmp_path}/cache",
                          # a resume checkpoint after every batch: a collective save on both ranks
                          "trainer.resume_every=1",
                          f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(f"run: {method} |") == 1  # rank 0 prints the summary, rank 1 not
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["platform"]["threads"] == 1
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 1
    assert not list((tmp_path / "cache" / "resume").glob("*/*"))  # finished stages leave none
    committed = list((tmp_path / "cache" / "stages").glob("*/stage.json"))
    assert {p.parent.name.split("-")[0] for p in committed} == ({"sft", "rm"} if method == "ppo" else {"sft"})


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    """SFT then DPO under DDP: 2 ranks of batch B against 1 rank of batch 2B (the same
    DistributedSampler order, so the same global batches). Gradients are all-reduced and every
    logged metric is reduced over the ranks, so the metrics agree as ``tests/agreement.py`` says:
    continuous ones to float rounding (1e-5 absolute: the ranks sum half-batch gradients where one
    process sums one batch), counts of decisions (the pair accuracy of the last batch of 8 pairs,
    gold and win rate over the 8 held-out prompts) within 2 decisions."""
    common = ["method=dpo", "trainer=ddp", "model=llama_tiny", "sft.max_steps=6",
              "method.max_steps=4", "eval.limit=8", "logger=none", "eval.lm_eval.enabled=false",
              "dataset.n_train=2000", "dataset.n_pairs=400", "trainer.enable_progress_bar=false",
              "results_dir=null"]
    summaries = {}
    for devices, sft_batch, dpo_batch in ((1, 16, 8), (2, 8, 4)):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WANDB_MODE": "offline"}
        run_dir = tmp_path / f"devices{devices}"
        out = subprocess.run([sys.executable, "-m", "harness", *common, f"trainer.devices={devices}",
                              f"sft.batch_size={sft_batch}", f"method.batch_size={dpo_batch}",
                              f"cache_dir={tmp_path}/cache{devices}", f"hydra.run.dir={run_dir}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        summaries[devices] = json.loads((run_dir / "summary.json").read_text())
    one, two = summaries[1], summaries[2]
    sft1, sft2 = one["stages"]["sft"]["metrics"], two["stages"]["sft"]["metrics"]
    assert sft2["train/loss"] == pytest.approx(sft1["train/loss"], abs=1e-5)
    keys = [k for k in one["metrics"] if k.startswith(("train/", "eval/")) and "per_s" not in k]
    assert {"train/loss", "train/rewards_margin", "eval/kl", "eval/gold_reward"} <= set(keys)
    assert_runs_agree(one["metrics"], two["metrics"], keys, {"pairs": 8, "prompts": 8})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_on_policy_ddp_samples_and_updates_as_one_process(method, tmp_path):
    """GRPO and PPO under DDP: 2 ranks of half the prompts against 1 rank of the global batch
    (minibatch = the rank's rollout). Every rank draws the global batch's sampling noise and keeps
    its rows, advantages are whitened and token losses normalised over the global batch, so the
    rollouts are the same tokens and the updates the same steps: the metrics agree as
    ``tests/agreement.py`` says, continuous ones to 1e-5 (float rounding of half-batch sums),
    clip fractions within 2 of the rollout's response tokens (one pass's worth: the epochs'
    fractions are averaged), gold and win rate within 2 of the 8 held-out prompts. Rewards come
    from a reward model, whose
    scores differ between responses even on a barely trained policy (gold rewards would all be 0,
    a test of nothing)."""
    common = [f"method={method}", "trainer=ddp", "model=llama_tiny", "sft.max_steps=6",
              "method.n_iterations=3", "rm.max_steps=4", "eval.limit=8",
              "logger=none", "eval.lm_eval.enabled=false", "dataset.n_train=2000",
              "dataset.n_pairs=400", "trainer.enable_progress_bar=false", "results_dir=null"]
    if method == "grpo":  # PPO always scores with the reward model
        common += ["method.group_size=4", "method.reward_source=rm"]
    prompts = {"grpo": 4, "ppo": 8}[method]
    rows = prompts * (4 if method == "grpo" else 1)
    summaries = {}
    for devices in (1, 2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WANDB_MODE": "offline"}
        run_dir = tmp_path / f"devices{devices}"
        out = subprocess.run([sys.executable, "-m", "harness", *common, f"trainer.devices={devices}",
                              f"sft.batch_size={16 // devices}", f"rm.batch_size={8 // devices}",
                              f"method.rollout.prompts_per_batch={prompts // devices}",
                              f"method.minibatch_size={rows // devices}",
                              f"cache_dir={tmp_path}/cache{devices}", f"hydra.run.dir={run_dir}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        summaries[devices] = json.loads((run_dir / "summary.json").read_text())
    one, two = summaries[1]["metrics"], summaries[2]["metrics"]
    keys = [k for k in one if k.startswith(("train/", "eval/")) and "per_s" not in k]
    assert {"train/loss", "train/reward", "train/reward_std", "train/adv_std", "train/kl",
            "eval/kl"} <= set(keys)
    assert one["train/reward_std"] > 0.1  # the rewards differ: the update has something to fit
    tokens = int(rows * one["train/response_len"])
    assert_runs_agree(one, two, keys, {"tokens": tokens, "prompts": 8})
