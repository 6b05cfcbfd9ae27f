"""Stages and methods: cache keys, the DPO reference cache, NaN guards, and short end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from harness.cache import stage_key
from harness.config import ConfigError, RolloutConfig
from harness.data.datamodule import AlignmentDataModule
from harness.data.tasks import build_task
from harness.data.tokenizer import build_tokenizer
from harness.methods.dpo import DPOConfig
from harness.methods.dpo.stage import (
    DPOModule,
    ReferenceLogps,
    pair_logps,
    reference_logps,
)
from harness.methods.grpo import GRPOConfig
from harness.methods.grpo.stage import GRPOModule
from harness.methods.losses import NonFiniteError
from harness.models.architecture import ModelConfig
from harness.models.hf import load_checkpoint
from harness.models.llama import CausalLM
from harness.pipeline import run
from harness.settings import register_configs

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY_SFT = ["model=llama_tiny", "sft.max_steps=30", "sft.val_every=15", "rm.max_steps=10",
            "rm.val_every=5", "eval.limit=16", "logger=none", "dataset.n_train=2000",
            "dataset.n_pairs=400", "trainer.enable_progress_bar=false", "eval.lm_eval.enabled=false"]


def composed(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data")
    task = build_task({"name": "arith", "seed": 0, "n_train": 200, "n_pairs": 64, "n_eval": 16},
                      cache_dir=cache)
    tok = build_tokenizer(task.corpus(), vocab_size=300)
    return task, tok


def tiny_model(tok) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=64, max_seq_len=64))


def test_stage_key_is_canonical_and_sensitive():
    a = stage_key("sft", {"model": {"d": 1, "e": 2}, "seed": 0})
    assert a == stage_key("sft", {"seed": 0, "model": {"e": 2, "d": 1}})  # order-free
    assert a != stage_key("sft", {"model": {"d": 1, "e": 2}, "seed": 1})
    assert a != stage_key("rm", {"model": {"d": 1, "e": 2}, "seed": 0})
    assert a.startswith("sft-") and len(a) == 4 + 16


def test_an_experiment_sets_the_sft_budget_and_an_override_wins():
    assert composed([]).sft.max_steps == 2000                                   # SFTConfig's
    assert composed(["experiment=courier"]).sft.max_steps == 1000
    assert composed(["experiment=courier"]).dataset.name == "courier"
    assert composed(["experiment=courier", "sft.max_steps=7"]).sft.max_steps == 7
    assert composed(["dataset=courier"]).sft.max_steps == 2000                  # no budget in data


def _run(overrides: list[str], tmp_path: Path):
    from omegaconf import OmegaConf

    from harness.pipeline import stage_runner
    from harness.settings import validate

    cfg = composed(overrides)
    return stage_runner(validate(cfg), OmegaConf.to_container(cfg, resolve=True), tmp_path)


def _decides(r, name: str, inputs=None) -> dict:
    from harness.pipeline.stages import decides

    return decides(r.ctx, r.settings, r.settings.stage_config(name), inputs or {})


def test_a_retrained_sft_base_gets_a_new_reward_model_key(tmp_path):
    from harness.cache import StageCache, StageRecord
    from harness.stage import Built

    cache = StageCache(tmp_path)
    first = StageRecord(key="sft-x", path=cache.path("sft-x"), trained_id="a" * 32)
    cache.commit(first)
    assert cache.load("sft-x").trained_id == "a" * 32            # round trip through stage.json
    r = _run(["method=ppo", "model=llama_tiny", f"cache_dir={tmp_path}", "dataset.n_train=200",
              "dataset.n_pairs=50"], tmp_path)
    retrained = StageRecord(key="sft-x", path=first.path, trained_id="b" * 32)  # force_retrain

    def key(rec):
        return stage_key("rm", _decides(r, "rm", {"sft": Built("sft", None, None, rec, rec.path)}))

    assert key(first) != key(retrained)
    assert key(first) == key(cache.load("sft-x"))


def test_a_damaged_cached_stage_is_reported_and_uncommitted(tmp_path, caplog):
    from harness.cache import StageCache, StageRecord

    cache = StageCache(tmp_path)
    rec = StageRecord(key="sft-y", path=cache.path("sft-y"))
    (rec.checkpoint / "sub").mkdir(parents=True)
    (rec.checkpoint / "model.safetensors").write_bytes(b"0123456789")
    (rec.checkpoint / "sub" / "tok.json").write_text("{}")
    cache.commit(rec)
    files = json.loads((rec.path / "stage.json").read_text())["files"]
    assert files["model.safetensors"][0] == 10 and set(files) == {"model.safetensors", "sub/tok.json"}
    assert cache.load("sft-y") is not None
    for damage, why in ((lambda: (rec.checkpoint / "model.safetensors").write_bytes(b"01234"),
                         "model.safetensors has 5 bytes, 10 when it was committed"),
                        (lambda: (rec.checkpoint / "model.safetensors").write_bytes(b"0123456780"),
                         "model.safetensors changed since it was committed"),
                        (lambda: (rec.checkpoint / "sub" / "tok.json").unlink(),
                         "sub/tok.json is missing")):
        (rec.checkpoint / "model.safetensors").write_bytes(b"0123456789")
        (rec.checkpoint / "sub" / "tok.json").write_text("{}")
        cache.commit(rec)
        damage()
        caplog.clear()
        with caplog.at_level("WARNING", logger="harness"):
            assert cache.load("sft-y") is None
        assert why in caplog.text and "sft-y" in caplog.text and str(rec.path) in caplog.text
        assert not (rec.path / "stage.json").exists()  # un-committed: the next run retrains it
    (rec.path / "stage.json").write_text('{"key": "sft-y", "metr')  # a torn stage.json
    assert cache.load("sft-y") is None


def test_sft_key_ignores_the_method_and_logger(tmp_path):
    keys = set()
    for method, logger in (("sft", "none"), ("dpo", "csv"), ("grpo", "none"), ("rloo", "none")):
        r = _run([f"method={method}", f"logger={logger}", "model=llama_tiny",
                  f"cache_dir={tmp_path}", "dataset.n_train=200", "dataset.n_pairs=50"], tmp_path)
        keys.add(stage_key("sft", _decides(r, "sft")))
    assert len(keys) == 1
    r = _run(["model=llama_tiny", f"cache_dir={tmp_path}", "sft.max_steps=7", "method=dpo",
              "dataset.n_train=200", "dataset.n_pairs=50"], tmp_path)
    assert stage_key("sft", _decides(r, "sft")) not in keys


def test_fused_adamw_is_off_in_the_cache_key_unless_set(tmp_path):
    """``optim.fused`` off leaves a base stage's key what it was before the option existed (the
    optimiser's seven fields); on, the stage (SFT, reward model) is another stage."""
    base = ["method=ppo", "model=llama_tiny", f"cache_dir={tmp_path}", "dataset.n_train=200",
            "dataset.n_pairs=50"]
    plain = _run(base, tmp_path)
    old_fields = {"lr", "weight_decay", "beta1", "beta2", "warmup_steps", "min_lr_ratio", "grad_clip"}
    for name in ("sft", "rm"):
        assert set(_decides(plain, name)["config"]["optim"]) == old_fields
        fused = _run([*base, f"{name}.optim.fused=true"], tmp_path)
        assert _decides(fused, name)["config"]["optim"]["fused"] is True
        assert stage_key(name, _decides(fused, name)) != stage_key(name, _decides(plain, name))


def test_fused_adamw_takes_the_same_step_as_the_per_tensor_loop():
    """The same AdamW update (decoupled weight decay, bias-corrected moments) in one kernel:
    parameters agree with the per-tensor loop's to rounding after a few steps."""
    from harness.config import OptimConfig
    from harness.methods.optim import build_optimizer

    nets, opts = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, fused=fused)
        nets.append(net)
        opts.append(build_optimizer([net], cfg, max_steps=10)["optimizer"])
    assert opts[1].defaults["fused"] is True and not opts[0].defaults["fused"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    for a, b, s in zip(nets[0].parameters(), nets[1].parameters(), start.parameters(), strict=True):
        assert not torch.equal(a, s)                                   # the steps moved them
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dpo_reference_table_is_computed_once_and_matches(tiny_task):
    task, tok = tiny_task
    ref = tiny_model(tok).eval()
    dm = AlignmentDataModule(task, tok, kind="pairs", batch_size=16, max_len=32, seed=0)
    dm.setup("fit")
    table = reference_logps(ref, dm)
    assert table.shape == (dm.n_train, 2) and torch.isfinite(table).all()
    # up front, in the in-order batches of the reference loader; under no_grad the LM head
    # skips the prompt columns every row shares (the sums agree with the full head's to rounding)
    rows: list[int] = []
    hook = ref.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    for batch in dm.reference_dataloader():
        with torch.no_grad():
            assert torch.equal(torch.stack(pair_logps(ref, batch)[:2], 1), table[batch["index"]])
        c, r, _ = pair_logps(ref, batch)
        torch.testing.assert_close(table[batch["index"]], torch.stack((c, r), 1), atol=1e-5,
                                   rtol=1e-6)
        assert rows[-2] < rows[-1]  # the no_grad pass ran the head on fewer positions
    hook.remove()
    batch = next(iter(dm.train_dataloader()))
    c, r, _ = pair_logps(ref, batch)
    torch.testing.assert_close(table[batch["index"], 0], c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table[batch["index"], 1], r, atol=1e-5, rtol=1e-5)
    # lazily: only the in-order batches a training batch touches, with the very same numbers
    lazy = ReferenceLogps(ref, dm.datasets["train"], dm.collate, dm.batch_size)
    first = batch["index"][:2]
    assert torch.equal(lazy.lookup(first), table[first])
    touched = {int(i) // 16 for i in first}
    assert lazy.computed == sum(min(16, dm.n_train - 16 * k) for k in touched) < dm.n_train
    assert torch.equal(lazy.lookup(batch["index"]), table[batch["index"]])
    # the module holds no reference network: only the table (and the policy's parameters)
    module = DPOModule(tiny_model(tok), lazy, DPOConfig())
    assert sum(p.numel() for p in module.parameters()) == sum(
        p.numel() for p in module.policy.parameters())
    loss, rc, rr, _ = module._losses(batch)
    # policy == reference at the start: rewards 0, loss log 2
    assert float(loss) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    assert torch.allclose(rc, torch.zeros_like(rc), atol=1e-4)


def test_a_shared_prompt_packs_each_pair_in_one_row_by_hand():
    """[bos + prompt, chosen, rejected]: positions restart at P for the rejected tokens, which do
    not see the chosen ones; both sides' first tokens are predicted from position P - 1."""
    from harness.data.collate import PairCollator, _pair_from_ids
    from harness.methods.dpo.stage import pack_shared_prompt

    rows = [_pair_from_ids(1, 2, [5, 6], [7], [8, 9], 64, "truncate"),      # P 3, C 2, R 3
            _pair_from_ids(1, 2, [5], [7, 7], [9], 64, "truncate")]        # P 2, C 3, R 2
    packed = pack_shared_prompt(PairCollator(0)(rows))
    assert packed.ids.tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 5, 7, 7, 2, 9, 2, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 4, 2, 3, 0]]
    assert packed.chosen_at.tolist() == [[2, 3, 0], [1, 2, 3]]
    assert packed.chosen_tokens.tolist() == [[7, 2, 0], [7, 7, 2]]
    assert packed.chosen_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert packed.rejected_at.tolist() == [[2, 5, 6], [1, 5, 0]]
    assert packed.rejected_tokens.tolist() == [[8, 9, 2], [9, 2, 0]]
    assert packed.rejected_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert packed.mask.shape == (2, 1, 8, 8) and packed.first_at == 1      # shortest prompt: P 2
    # row 0: "8" (position 5) sees bos + prompt and itself; its EOS (7) sees 8 and 9 too
    assert packed.mask[0, 0, 5].tolist() == [True, True, True, False, False, True, False, False]
    assert packed.mask[0, 0, 7].tolist() == [True, True, True, False, False, True, True, True]
    assert packed.mask[0, 0, 4].tolist() == [True] * 5 + [False] * 3       # chosen: causal


@pytest.mark.parametrize("moe", [False, True])
def test_shared_prompt_log_probs_equal_the_two_row_layout(tiny_task, moe):
    """The packed layout gives pair_logps' sums and gradients (to rounding), dense and MoE."""
    from harness.methods.dpo.stage import shared_prompt_pair_logps

    _, tok = tiny_task
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=2, d_ff=64, max_seq_len=64,
                                 n_experts=4 if moe else 0, top_k=2))
    model.eval()  # deterministic routing
    # pairs of random token ids with prompts and responses of 1-6 tokens each
    from harness.data.collate import PairCollator, _pair_from_ids

    g = torch.Generator().manual_seed(1)

    def ids() -> list[int]:
        n = int(torch.randint(1, 7, (1,), generator=g))
        return torch.randint(3, len(tok), (n,), generator=g).tolist()

    batch = PairCollator(0)([_pair_from_ids(1, 2, ids(), ids(), ids(), 32, "truncate")
                             for _ in range(12)])
    assert len(set(batch["prompt_len"].tolist())) > 2        # prompts of several lengths
    grads = []
    for logps in (pair_logps, shared_prompt_pair_logps):
        model.zero_grad()
        c, r, _ = logps(model, batch)
        (c.sum() - 2 * r.sum()).backward()
        grads.append(([c.detach(), r.detach()], [p.grad.clone() for p in model.parameters()]))
    (two_rows, g2), (packed, g1) = grads
    for a, b in zip(two_rows, packed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dpo_with_a_shared_prompt_scores_its_reference_the_same_way(tiny_task):
    """policy == reference at step 0 gives a margin of exactly 0 (both packed) and the loss log 2;
    the run's loss agrees with the two-row layout's to rounding."""
    from harness.methods.dpo.stage import shared_prompt_pair_logps

    task, tok = tiny_task
    ref = tiny_model(tok).eval()
    dm = AlignmentDataModule(task, tok, kind="pairs", batch_size=16, max_len=32, seed=0)
    dm.setup("fit")
    # the reference table's first in-order batch: the same shapes on both sides, so the same
    # kernels (a shuffled batch pads to another width; its sums may differ in the last bit)
    batch = dm.collate([dm.datasets["train"][i] for i in range(16)])
    losses = []
    for share in (True, False):
        table = ReferenceLogps(ref, dm.datasets["train"], dm.collate, dm.batch_size,
                               shared_prompt_pair_logps if share else None)
        module = DPOModule(tiny_model(tok), table, DPOConfig(share_prompt=share))
        loss, rc, rr, _ = module._losses(batch)
        if share:
            assert torch.equal(rc, torch.zeros_like(rc)) and torch.equal(rr, torch.zeros_like(rr))
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)


def test_grpo_stops_on_non_finite_reward(tiny_task):
    task, tok = tiny_task
    policy, ref = tiny_model(tok), tiny_model(tok)
    cfg = GRPOConfig(group_size=2, rollout=RolloutConfig(prompts_per_batch=2, max_new_tokens=3))

    def nan_scores(prompts, responses, *_):
        return torch.full((len(prompts),), float("nan"))

    module = GRPOModule(policy, ref, tok, cfg, nan_scores, seed=0)
    with pytest.raises(NonFiniteError, match="train/reward"):
        module.training_step(["1+2=", "3+4="], 0)


def test_failed_run_writes_a_failed_summary(tmp_path, monkeypatch):
    from harness.data.tasks.arith import ArithTask

    monkeypatch.setattr(ArithTask, "rewards", lambda self, p, r: [float("nan")] * len(p))
    cfg = composed([*TINY_SFT, "method=grpo", "method.n_iterations=2", f"cache_dir={tmp_path}/c"])
    with pytest.raises(NonFiniteError):
        run(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "train/reward" in summary["error"]


def test_an_moe_sft_base_trained_in_this_run_trains_dpo_as_the_cached_one_does(tmp_path):
    """A base stage trained in this process is handed on in eval mode, as a cached checkpoint is
    loaded: with noisy top-k routing a base left in training mode gave DPO a noisy policy against
    its deterministic reference (a non-zero margin at step 0) only when the SFT base was trained in
    the same run."""
    common = [*TINY_SFT, "model=moe_tiny", "method=dpo", "method.max_steps=3", "results_dir=null",
              f"cache_dir={tmp_path}/cache"]
    fresh = run(composed(common), tmp_path / "fresh")
    cached = run(composed(common), tmp_path / "cached")
    assert fresh["stages"]["sft"]["cached"] is False and cached["stages"]["sft"]["cached"] is True
    assert fresh["status"] == cached["status"] == "ok"
    trained = sorted(k for k in fresh["stages"]["dpo"]["metrics"]
                     if k.startswith("train/") and not k.endswith("tokens_per_s"))
    assert "train/rewards_margin" in trained
    for key in trained:
        assert fresh["stages"]["dpo"]["metrics"][key] == cached["stages"]["dpo"]["metrics"][key], key
    assert fresh["metrics"]["eval/kl"] == cached["metrics"]["eval/kl"]


def test_a_run_reads_the_references_responses_that_a_run_from_the_same_base_kept(tmp_path):
    """GRPO then RLOO from one cached SFT base: RLOO's evaluation reads the reference's greedy
    responses GRPO's kept (cost/eval/reference_cached 1) and scores what an RLOO run that decodes
    them afresh scores, prompt by prompt."""
    import shutil

    common = [*TINY_SFT, "method.n_iterations=2", "method.group_size=4", "results_dir=null",
              f"cache_dir={tmp_path}/cache"]
    grpo = run(composed([*common, "method=grpo"]), tmp_path / "grpo")
    rloo = run(composed([*common, "method=rloo"]), tmp_path / "rloo")
    assert grpo["cost"]["cost/eval/reference_cached"] == 0.0
    assert rloo["cost"]["cost/eval/reference_cached"] == 1.0
    assert rloo["per_prompt"]["ref_gold_reward"] == grpo["per_prompt"]["ref_gold_reward"]
    shutil.rmtree(tmp_path / "cache" / "ref_eval")
    fresh = run(composed([*common, "method=rloo"]), tmp_path / "fresh")
    assert fresh["cost"]["cost/eval/reference_cached"] == 0.0
    assert fresh["per_prompt"] == rloo["per_prompt"]
    for key in ("eval/gold_reward", "eval/ref_gold_reward", "eval/win_rate", "eval/kl"):
        assert fresh["metrics"][key] == rloo["metrics"][key], key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rm", "dpo", "grpo", "ppo", "rloo", "online_dpo"])
def test_each_method_runs_end_to_end_on_llama_tiny(method, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "shared-cache"
    budget = {"rm": [], "dpo": ["method.max_steps=6", "method.val_every=3"],
              "grpo": ["method.n_iterations=3", "method.group_size=4"],
              "rloo": ["method.n_iterations=3", "method.group_size=4", "method.update_epochs=2",
                       "method.minibatch_size=8"],
              "ppo": ["method.n_iterations=3", "method.rollout.prompts_per_batch=8",
                      "method.minibatch_size=4", "method.update_epochs=2"],
              # reward-model scores differ between responses, so every prompt gives a pair
              "online_dpo": ["method.n_iterations=3", "method.group_size=4",
                             "method.reward_source=rm"]}[method]
    out = tmp_path_factory.mktemp(method)
    cfg = composed([*TINY_SFT, f"method={method}", *budget, f"cache_dir={cache}"])
    summary = run(cfg, out)
    assert summary["status"] == "ok"
    stored = json.loads((out / "summary.json").read_text())
    assert stored["cache_keys"]["sft"] == summary["cache_keys"]["sft"]
    if method == "rm":
        assert 0.0 <= summary["metrics"]["eval/rewards_acc"] <= 1.0
        return
    m = summary["metrics"]
    for key in ("eval/gold_reward", "eval/ref_gold_reward", "eval/win_rate", "eval/kl"):
        assert key in m and m[key] == m[key]
    # arith's gold reward is 0/1, so its accuracy (share at the task's best reward) is its mean
    assert m["eval/gold_accuracy"] == pytest.approx(m["eval/gold_reward"])
    assert Path(summary["checkpoint"], "model.safetensors").is_file()
    # the budget it spent, as its config plans it: responses sampled and scored, pairs, steps
    if method in ("grpo", "rloo", "online_dpo"):
        assert m["budget/responses"] == m["budget/reward_calls"] == 3 * 8 * 4
    if method == "ppo":
        assert m["budget/responses"] == 3 * 8 and m["budget/optimizer_steps"] == 3 * 2 * 2
    if method == "dpo":
        assert m["budget/pairs"] == 6 * 32 and m["budget/optimizer_steps"] == 6
    assert m["budget/trained_tokens"] > 0
    if method in ("grpo", "ppo", "rloo"):
        assert "train/reward" in m and "train/clip_frac" in m
        assert summary["reward_source"] == ("rm" if method == "ppo" else "gold")
    if method == "ppo":
        assert summary["cache_keys"]["rm"] and "train/value_loss" in m and "train/entropy" in m
    if method == "dpo":
        assert "train/rewards_acc" in m
    if method == "online_dpo":
        assert summary["reward_source"] == "rm" and summary["cache_keys"]["rm"]
        assert m["train/pair_frac"] == 1.0 and "train/rewards_margin" in m


def test_ppo_learns_from_the_gold_reward_with_a_critic_from_the_sft_base(tmp_path):
    """reward_source=gold: no reward-model stage is trained or read, the critic starts from the SFT
    base, and the rollout's scores are the task's 0/1 gold rewards."""
    cfg = composed([*TINY_SFT, "method=ppo", "method.reward_source=gold", "method.n_iterations=2",
                    "method.rollout.prompts_per_batch=8", "method.minibatch_size=8",
                    "results_dir=null", f"cache_dir={tmp_path}/cache"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "ok" and summary["reward_source"] == "gold"
    assert set(summary["stages"]) == {"sft", "ppo"} and "rm" not in summary["cache_keys"]
    assert not list((tmp_path / "cache" / "stages").glob("rm-*"))
    m = summary["metrics"]
    assert 0.0 <= m["train/reward"] <= 1.0 and "train/value_loss" in m
    assert summary["config"]["method"]["critic_init"] is None


@pytest.mark.slow
def test_same_seed_same_metrics_and_sft_reused(tmp_path):
    summaries = []
    for i in range(2):
        cfg = composed([*TINY_SFT, "method=grpo", "method.n_iterations=2", "method.group_size=4",
                        f"cache_dir={tmp_path}/c"])
        summaries.append(run(cfg, tmp_path / f"run{i}"))
    a, b = summaries
    assert a["stages"]["sft"]["cached"] is False and b["stages"]["sft"]["cached"] is True
    for key in ("eval/gold_reward", "eval/kl", "eval/win_rate", "train/reward"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-6)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_zero_kl_coefficient_skips_the_reference_pass(tiny_task, method):
    """beta = 0: nothing reads the reference's log-probs, so the rollout runs no reference forward
    (a sixth of a GRPO step) and logs no train/kl; beta > 0 runs it once per rollout."""
    from harness.methods.rloo import RLOOConfig
    from harness.methods.rloo.stage import RLOOModule

    task, tok = tiny_task
    config, module_cls = (GRPOConfig, GRPOModule) if method == "grpo" else (RLOOConfig, RLOOModule)

    def gold(prompts, responses, *_):
        return torch.as_tensor(task.rewards(prompts, responses), dtype=torch.float32)

    for beta, calls in ((0.0, 0), (0.05, 1)):
        policy, ref = tiny_model(tok), tiny_model(tok)
        seen: list[int] = []
        ref.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        cfg = config(group_size=2, beta=beta,
                     rollout=RolloutConfig(prompts_per_batch=2, max_new_tokens=3))
        ro = module_cls(policy, ref, tok, cfg, gold, seed=0).group_rollout(["1+2=", "3+4="])
        assert len(seen) == calls and (ro.ref_logp is None) == (beta == 0)


def test_the_reward_model_keeps_its_best_validated_checkpoint_normalised(tmp_path):
    """rm.keep=best: of the checkpoints validated every 4 steps, the stage hands on the one with
    the best pair accuracy (the earliest of equals), and says which; its score head is normalised
    so that the SFT policy's sampled responses score mean 0, std 1; the SFT policy's own pair
    accuracy on the same pairs stands beside its own."""
    from harness.methods.rm.stage import RewardStage, sft_score_moments
    from harness.util.seeding import generator

    cfg = composed([*TINY_SFT, "method=rm", "rm.max_steps=12", "rm.val_every=4",
                    "rm.norm_samples=64", "results_dir=null", f"cache_dir={tmp_path}/cache"])
    summary = run(cfg, tmp_path / "run")
    m, curve = summary["metrics"], summary["history"]["val/rewards_acc"]
    assert [step for step, _ in curve] == [4, 8, 12]
    best = max(acc for _, acc in curve)
    first_best = next(step for step, acc in curve if acc == best)
    assert m["eval/rewards_acc"] == best and m["train/kept_step"] == first_best
    assert m["val/last_rewards_acc"] == curve[-1][1]
    assert 0.0 <= m["eval/sft_pair_acc"] <= 1.0 and m["train/rm_norm_std"] > 0
    # the handed-on (cached) reward model scores the SFT policy's responses 0 +- 1
    rm = RewardStage().load(Path(summary["checkpoint"]))
    sft = load_checkpoint(Path(summary["stages"]["sft"]["checkpoint"]))[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(summary["checkpoint"])
    prompts = [f"{a}+{b}=" for a, b in ((12, 7), (403, 88), (5, 611), (250, 250))] * 16
    mean, std = sft_score_moments(rm, sft, tok, prompts, 8, 128, "last", generator(1, "rm_norm"))
    assert abs(mean) < 0.5 and 0.5 < std < 2.0


def test_folding_the_normalisation_into_the_score_head_by_hand(tiny_task):
    from harness.methods.rm.stage import fold_normalisation, moments, pool_scores
    from harness.models.llama import ScalarHead

    _, tok = tiny_task
    rm = ScalarHead(tiny_model(tok))
    ids = torch.randint(3, len(tok), (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 9)
    with torch.no_grad():
        before = rm(ids)[0]
        fold_normalisation(rm, 2.0, 4.0)
        after = rm(ids)[0]
    torch.testing.assert_close(after, (before - 2.0) / 4.0, rtol=1e-5, atol=1e-6)
    for pooling in ("last", "mean"):  # both poolings are affine in the scores
        torch.testing.assert_close(pool_scores(after, mask, pooling),
                                   (pool_scores(before, mask, pooling) - 2.0) / 4.0,
                                   rtol=1e-5, atol=1e-6)
    assert moments(torch.tensor([1.0, 3.0])) == (2.0, 1.0)
    assert moments(torch.tensor([5.0, 5.0])) == (5.0, 1.0)  # a constant reward model only shifts


class _Sched:
    steps = 0

    def step(self) -> None:
        self.steps += 1


def _online_dpo_step(tok, scores: list[float], beta: float = 0.5):
    """One online DPO training step outside Lightning: k = 4 responses to each of 2 prompts scored
    ``scores``; returns (module, rollout, the losses it stepped on, the scheduler, logged stats)."""
    from harness.methods.online_dpo import OnlineDPOConfig
    from harness.methods.online_dpo.stage import OnlineDPOModule

    torch.manual_seed(1)
    policy = CausalLM(ModelConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_ff=64, max_seq_len=64))
    cfg = OnlineDPOConfig(group_size=4, minibatch_size=2, beta=beta,
                          rollout=RolloutConfig(prompts_per_batch=2, max_new_tokens=4))
    module = OnlineDPOModule(policy, tiny_model(tok), tok, cfg,
                             lambda *_: torch.tensor(scores), seed=0)
    seen: dict = {"losses": []}
    sched = _Sched()
    rollout = module.group_rollout
    module.group_rollout = lambda batch: seen.setdefault("ro", rollout(batch))
    module.optimizers, module.lr_schedulers = (lambda: None), (lambda: sched)
    module.step = lambda loss, *_: (seen["losses"].append(loss.detach()), sched.step())
    module.log_rollout = lambda ro, adv, stats, it: seen.update(adv=adv, stats=stats)
    module.training_step(["1+2=", "13+4="], 0)
    return module, seen, sched


def test_online_dpo_trains_on_the_best_and_worst_response_of_each_prompt(tiny_task):
    """Prompt 0's responses score (0, 1, 1, 0): the pair is rows (1, 0); prompt 1's all tie: no
    pair. The step's loss is DPO's on that one pair, from the policy's log-probs of the two rows
    and the rollout's reference log-probs: -log sigma(beta h)."""
    from harness.methods.rollout import response_logprobs

    _, tok = tiny_task
    module, seen, sched = _online_dpo_step(tok, [0.0, 1, 1, 0, 2, 2, 2, 2])
    ro = seen["ro"]
    with torch.no_grad():
        logp, _, _ = response_logprobs(module.policy, ro.input_ids[[1, 0]],
                                       ro.attention_mask[[1, 0]], ro.prompt_len)
    pol = (logp * ro.mask[[1, 0]]).sum(-1)
    ref = (ro.ref_logp[[1, 0]] * ro.mask[[1, 0]]).sum(-1)
    h = (pol[0] - ref[0]) - (pol[1] - ref[1])
    assert abs(float(h)) > 1e-3  # policy and reference differ: the test can tell the pair apart
    (loss,) = seen["losses"]
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.5 * h), rtol=1e-5,
                               atol=1e-6)
    assert sched.steps == 1 and seen["adv"] is None
    assert seen["stats"]["pair_frac"][0].item() == 0.5
    assert seen["stats"]["rewards_margin"][0].item() == pytest.approx(0.5 * float(h), rel=1e-4)


def test_online_dpo_takes_no_step_when_every_prompt_ties(tiny_task):
    _, tok = tiny_task
    _, seen, sched = _online_dpo_step(tok, [1.0] * 8)
    assert seen["losses"] == [] and sched.steps == 1  # the schedule still advances
    assert seen["stats"]["pair_frac"][0].item() == 0.0 and "loss" not in seen["stats"]


def test_a_packed_grpo_step_samples_the_same_rollout_and_loses_the_same(tiny_task):
    """share_prompt changes how log-probs are computed, not what is sampled: the same tokens, the
    same reference log-probs and loss to rounding, a reference and policy forward per group."""
    task, tok = tiny_task

    def gold(prompts, responses, *_):
        return torch.as_tensor(task.rewards(prompts, responses), dtype=torch.float32)

    runs = []
    for share in (False, True):
        policy, ref = tiny_model(tok), tiny_model(tok)
        rows: list[int] = []
        ref.register_forward_hook(lambda _m, args, _o, rows=rows: rows.append(args[0].shape[0]))
        cfg = GRPOConfig(group_size=4, minibatch_size=8, share_prompt=share, beta=0.1,
                         rollout=RolloutConfig(prompts_per_batch=2, max_new_tokens=5))
        module = GRPOModule(policy, ref, tok, cfg, gold, seed=0)
        ro = module.group_rollout(["1+2=", "13+4="])
        logp, _, _ = module.logprobs(ro.input_ids, ro.attention_mask, ro.prompt_len)
        runs.append((ro, logp.detach(), rows))
    (ro_a, lp_a, rows_a), (ro_b, lp_b, rows_b) = runs
    assert torch.equal(ro_a.input_ids, ro_b.input_ids) and ro_a.input_ids.shape[0] == 8
    assert rows_a == [8] and rows_b == [2]           # the reference: 8 rows, or 2 packed groups
    torch.testing.assert_close(ro_b.ref_logp, ro_a.ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_b * ro_b.mask, lp_a * ro_a.mask, rtol=1e-5, atol=1e-5)


def test_share_prompt_runs_from_the_entry_point_and_rejects_split_groups(tmp_path):
    """``method.share_prompt=true`` through Hydra: a minibatch that would split a group is refused
    before any stage trains; a whole-group one runs end to end."""
    common = [*TINY_SFT, "method=rloo", "method.n_iterations=2", "method.group_size=4",
              "method.share_prompt=true", "results_dir=null", f"cache_dir={tmp_path}/c"]
    with pytest.raises(ConfigError, match="method.minibatch_size=6: must be a multiple of "
                                          "group_size=4"):
        run(composed([*common, "method.minibatch_size=6"]), tmp_path / "refused")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("stages/*"))
    summary = run(composed([*common, "method.minibatch_size=8"]), tmp_path / "ok")
    assert summary["status"] == "ok" and summary["config"]["method"]["share_prompt"] is True
    assert "train/entropy" in summary["metrics"] and summary["metrics"]["eval/n_prompts"] == 16

def test_the_rloo_loss_without_a_reference_is_its_loss_at_zero_beta():
    from harness.methods.losses import rloo_policy_loss

    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(4, 5, generator=g) * 0.1 - 1 for _ in range(3))
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 5)
    mask[0, 3:] = 0
    with_ref, stats = rloo_policy_loss(logp, old, ref, adv, mask, 0.2, 0.0)
    without, stats0 = rloo_policy_loss(logp, old, None, adv, mask, 0.2, 0.0)
    assert torch.equal(with_ref, without) and "kl_k3" in stats and "kl_k3" not in stats0
    with pytest.raises(ValueError, match="beta"):
        rloo_policy_loss(logp, old, None, adv, mask, 0.2, 0.1)


def test_the_reward_model_counts_the_tokens_it_trains_on(tiny_task):
    """cost/rm/train_tokens(_per_s): the RM stage counted none, so its cost read 0 tokens/s."""
    from harness.methods.rm import RMConfig
    from harness.methods.rm.stage import RewardModule
    from harness.models.llama import ScalarHead

    task, tok = tiny_task
    dm = AlignmentDataModule(task, tok, kind="pairs", batch_size=8, max_len=32, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = RewardModule(ScalarHead(tiny_model(tok)), RMConfig())
    module.training_step(batch, 0)
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert module.tokens_trained == tokens > 0
    assert module.throughput(2.0)["cost/train_tokens_per_s"] == tokens / 2.0


def test_global_rows_deal_prompts_to_ranks_in_turn_and_keep_groups_whole():
    from harness.methods.rl_base import global_rows

    # rank 1 of 2, 2 prompts of groups of 3: global prompts 1 and 3 -> rows 3-5 and 9-11
    assert global_rows(2, 3, rank=1, world=2).tolist() == [3, 4, 5, 9, 10, 11]
    assert global_rows(4, 1, rank=0, world=1).tolist() == [0, 1, 2, 3]
    every = torch.cat([global_rows(3, 2, r, 3) for r in range(3)])
    assert sorted(every.tolist()) == list(range(18))  # the ranks' rows partition the batch


@pytest.mark.parametrize("on", [True, False])
def test_a_rollout_hands_its_cuda_graph_switch_to_the_sampler(tiny_task, monkeypatch, on):
    """method.rollout.cuda_graph reaches the decode step's choice (a GPU's graphed step)."""
    import harness.models.generation as generation
    from harness.methods.rollout import make_rollout

    task, tok = tiny_task
    seen: list = []
    real = generation.decode_step
    monkeypatch.setattr(generation, "decode_step",
                        lambda *a, **k: seen.append(k.get("cuda_graph")) or real(*a, **k))
    prompts = list(task.eval_dataset()["prompt"])[:2]
    ro = make_rollout(tiny_model(tok), None, tok, prompts,
                      RolloutConfig(prompts_per_batch=2, max_new_tokens=3, cuda_graph=on), 64,
                      lambda p, r, ids, mask, n: torch.zeros(len(p)))
    assert ro.response.shape[0] == 2 and seen == [on]


@pytest.mark.parametrize("on", [True, False])
def test_evaluation_hands_eval_cuda_graph_to_the_sampler(tmp_path, monkeypatch, on):
    """eval.cuda_graph reaches every decode step evaluation takes: the held-out gold curve, the
    gold reward of the policy and the reference, and the KL's sampling (a DPO run samples nowhere
    else); the library's own default is the eager step."""
    import inspect

    import harness.models.generation as generation
    from harness.evaluation.drift import sequence_kl
    from harness.evaluation.gold import complete, gold_eval
    from harness.methods.rollout import sample_with_reference

    seen: list = []
    real = generation.decode_step
    monkeypatch.setattr(generation, "decode_step",
                        lambda *a, **k: seen.append(k.get("cuda_graph")) or real(*a, **k))
    cfg = composed(["model=llama_tiny", "method=dpo", "sft.max_steps=2", "method.max_steps=2",
                    "eval.limit=4", "eval.curve_points=1", "eval.curve_prompts=4", "logger=none",
                    "dataset.n_train=200", "dataset.n_pairs=64", "eval.lm_eval.enabled=false",
                    "trainer.enable_progress_bar=false", f"eval.cuda_graph={str(on).lower()}",
                    f"cache_dir={tmp_path}/cache", "results_dir=null"])
    assert run(cfg, tmp_path / "out")["status"] == "ok"
    assert len(seen) >= 4 and set(seen) == {on}  # curve points, gold x 2, KL
    for fn in (generation.generate, sample_with_reference, complete, gold_eval, sequence_kl):
        assert inspect.signature(fn).parameters["cuda_graph"].default is False, fn.__name__


def test_without_an_entropy_bonus_the_entropy_needs_no_gradient(tiny_task):
    """PPO at ent_coef 0 computes the entropy for logging only: the loss's gradients equal, bit
    for bit, those of the graph that carried the entropy with a zero coefficient (it adds exact
    zeros), so runs at ent_coef 0 repeat."""
    from harness.methods.rollout import response_logprobs

    task, tok = tiny_task
    ids = torch.randint(4, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    grads = []
    for entropy_grad in (True, False):
        model = tiny_model(tok)
        logp, ent, _ = response_logprobs(model, ids, mask, 4, 0.9, with_entropy=True,
                                         entropy_grad=entropy_grad)
        assert ent.requires_grad is entropy_grad
        ((logp * torch.linspace(-1, 1, 5)).sum() - 0.0 * ent.mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_an_empty_minibatch_advances_the_schedule_without_torch_warning_of_the_order():
    """A minibatch with nothing to learn from steps the schedule alone (``advance_schedules``):
    the lr moves on as if a step had been taken, and torch's "scheduler before optimizer"
    warning, which this intended order would raise on a run's first minibatch, is not shown."""
    import warnings

    from harness.config import OptimConfig
    from harness.methods.rl_base import advance_schedules

    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        advance_schedules((opt, sched, OptimConfig()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="before `optimizer.step"):  # what it silences
        torch.optim.lr_scheduler.LambdaLR(opt2 := torch.optim.SGD([w], lr=1.0),
                                          lambda step: 1.0).step()
    assert opt2.param_groups[0]["lr"] == 1.0
