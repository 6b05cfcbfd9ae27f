"""4. ``--vs trl``: the harness's GRPO and DPO steps beside TRL's ``GRPOTrainer`` / ``DPOTrainer``.

Both sides run in one process, interleaved round by round (harness GRPO, TRL GRPO, harness DPO,
TRL DPO; then the next round), from the same weights: each round builds the harness stage
(:func:`harness.bench.steps.build_method`), exports its initial policy as a ``LlamaForCausalLM``
(:func:`harness.models.hf.to_hf_model`) and TRL loads that checkpoint as its policy (and, for GRPO,
its reference). TRL's arguments are derived from the harness stage's own config
(:func:`grpo_args`, :func:`dpo_args`), so a setting cannot drift between the sides.

One step = one optimisation step with everything it needs, timed after warm-up:

- harness: a Lightning training batch (:class:`~harness.bench.steps.StepTimer`: GRPO's rollout,
  reference pass, update and logging; DPO's forward, backward and AdamW step);
- TRL: ``on_step_begin`` -> ``on_step_end`` of ``Trainer``'s loop: ``trainer.training_step``
  (GRPO: generation, reward, reference pass, loss and backward; DPO: loss and backward), then
  gradient clipping, ``optimizer.step()``, the scheduler and ``zero_grad`` (``training_step``
  alone leaves the optimiser step out, which the harness's step includes).

TRL is an optional extra (``pip install -e '.[trl]'``); :func:`require_trl` stops with a message
naming it when it is missing.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from harness.bench.common import Column, format_table, median, sync
from harness.bench.flops import (
    dpo_step_flops,
    grpo_step_flops,
    matmul_gflops,
    matmul_params,
    ppo_step_flops,
)
from harness.bench.steps import (
    bench_method_steps,
    precompute_reference,
    rollout_overrides,
    share_prompt_overrides,
)
from harness.config import ModelConfig, OptimConfig

TRL_SERIES = "1.16"
"""The TRL release series the comparison is written against (``pyproject.toml``'s ``trl`` extra)."""
MISSING_TRL = ("--vs trl needs TRL, an optional extra that the core install leaves out: "
               "pip install -e '.[trl]'   (TRL 1.16; CI does not install it)")
PEAK_SIZES: tuple[int, ...] = (256, 1024)
"""Square fp32 matmuls whose rate is the machine's peak; the last one is the % of peak column's."""
STEPS: tuple[str, ...] = ("grpo", "dpo")
"""The steps compared by default; ``ppo`` too with ``--vs-steps`` (TRL 1.12, :data:`MISSING_PPO`)."""
PPO_SERIES = "1.12"
"""The last TRL release with a PPO trainer (``trl.experimental.ppo``); later ones removed it."""
MISSING_PPO = ("--vs trl --vs-steps ppo needs TRL's PPOTrainer, which TRL dropped after 1.12: in "
               "an environment of its own, python3 -m venv .venv-trl112 && . .venv-trl112/bin/"
               "activate && pip install torch==2.13.0 && pip install -e . trl==1.12.0 && python -m "
               "harness.bench --vs trl --vs-steps ppo")
EPOCHS_PPO = 4
"""PPO's update epochs in the comparison (TRL's ``num_ppo_epochs`` default)."""
PPO_AS_TRL: tuple[str, ...] = ("method.ent_coef=0", "method.optim.grad_clip=0",
                               "method.critic_optim.grad_clip=0")
"""What TRL 1.12's PPO loop does not do, switched off on the harness's side too: its loss has no
entropy bonus (it logs the entropy only) and it clips no gradients (``optimizer.step()`` right
after ``backward``; ``max_grad_norm`` is not read)."""


def require_trl() -> str:
    """TRL's version, or ``SystemExit`` with :data:`MISSING_TRL` when it is not installed."""
    try:
        import trl
    except ImportError as e:
        raise SystemExit(MISSING_TRL) from e
    return str(trl.__version__)


def require_ppo_trainer() -> None:
    """``SystemExit`` with :data:`MISSING_PPO` unless TRL's PPO trainer can be imported."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    except ImportError as e:
        raise SystemExit(MISSING_PPO) from e


@contextlib.contextmanager
def quiet_trl() -> Iterator[None]:
    """Silence ``transformers``' / TRL's info lines, progress bars (``datasets``' too) and
    advisory warnings."""
    import datasets
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    ds_bars = not datasets.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    trl_log = logging.getLogger("trl")
    trl_level = trl_log.level
    trl_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
        trl_log.setLevel(trl_level)


class StepClock(TrainerCallback):
    """Wall time of every optimisation step of a ``transformers.Trainer``: ``on_step_begin``
    (before the first micro-batch's ``training_step``) -> ``on_step_end`` (after the optimiser and
    scheduler step and ``zero_grad``). TRL's PPO loop calls no ``on_step_begin``: a step there
    runs from the previous ``on_step_end`` (or ``on_train_begin``) to its own, the whole update
    (next batch, generation, scoring, every epoch's minibatches, the scheduler step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self._t0)
        self._t0 = now


# ------------------------------------------------------------------- TRL's arguments
def common_args(optim: OptimConfig, steps: int, out_dir: Path, seed: int,
                device: torch.device) -> dict[str, Any]:
    """``TrainingArguments`` shared by both trainers: the harness's AdamW (``torch.optim.AdamW``,
    per-tensor or, with ``optim.fused``, fused: TRL's ``adamw_torch`` / ``adamw_torch_fused``; its
    betas, weight decay, warm-up then cosine to ``min_lr_ratio``, norm clipping), fp32 (TRL's
    default is bf16), no gradient checkpointing (TRL's default is on), no checkpoints, reports or
    progress bars, ``steps`` optimisation steps."""
    return dict(
        output_dir=str(out_dir), max_steps=steps, seed=seed, use_cpu=device.type == "cpu",
        learning_rate=optim.lr, adam_beta1=optim.beta1, adam_beta2=optim.beta2,
        weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        max_grad_norm=optim.grad_clip or 0.0,
        optim="adamw_torch_fused" if optim.fused else "adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
    )


def grpo_args(cfg: Any, steps: int, out_dir: Path, seed: int, device: torch.device) -> Any:
    """``trl.GRPOConfig`` equal to the harness's :class:`~harness.methods.grpo.GRPOConfig` ``cfg``:
    the whole rollout (prompts x group) in one minibatch of ``per_device_train_batch_size``, one
    generation per optimiser step (no stale ``old`` log-probs: importance ratio 1 at the first
    pass, as the harness's sampler log-probs), the same loss aggregation, clip range, KL
    coefficient, reward scaling and sampling settings."""
    from trl import GRPOConfig

    return GRPOConfig(
        **group_args(cfg, steps, out_dir, seed, device),
        epsilon_high=cfg.clip_eps_high if cfg.clip_eps_high is not None else cfg.clip_eps,
        loss_type=cfg.loss_type, scale_rewards="group" if cfg.scale_rewards else "none",
    )


def group_args(cfg: Any, steps: int, out_dir: Path, seed: int, device: torch.device) -> dict[str, Any]:
    """The arguments TRL's GRPO and RLOO configs share, from a harness
    :class:`~harness.methods.config.GroupConfig`: the whole rollout (prompts x group) in one
    minibatch, one pass, the group size, response length, sampling, KL coefficient and clip range.
    Raises ``ValueError`` for a config of several minibatches or passes (TRL would differ)."""
    sequences = cfg.rollout.prompts_per_batch * cfg.group_size
    if cfg.minibatch_size < sequences or cfg.update_epochs != 1:
        raise ValueError("the comparison with TRL takes one minibatch of the whole rollout and one "
                         f"pass: minibatch_size={cfg.minibatch_size}, update_epochs={cfg.update_epochs}")
    return dict(
        **common_args(cfg.optim, steps, out_dir, seed, device),
        per_device_train_batch_size=sequences, gradient_accumulation_steps=1,
        num_generations=cfg.group_size, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
        beta=cfg.beta, epsilon=cfg.clip_eps, num_iterations=cfg.update_epochs,
        log_completions=False,
    )


def rloo_args(cfg: Any, steps: int, out_dir: Path, seed: int, device: torch.device) -> Any:
    """``trl.RLOOConfig`` (TRL 1.16) equal to the harness's :class:`~harness.methods.rloo.RLOOConfig`
    ``cfg``: as :func:`grpo_args`, the whole rollout in one minibatch and one pass; both put the
    KL in the reward as β times the sequence sum of the per-token log-ratio log π_old − log π_ref
    (``kl_penalty: reward``; TRL has no other form), leave-one-out baselines, no advantage
    normalisation (TRL's ``normalize_advantages`` default), the same clip range and sampling.

    Where the conventions differ: TRL clips the *sequence* ratio exp(Σ_t log π − Σ_t log π_old)
    and averages the sequences' losses; the harness clips each token's ratio and sums the token
    losses of a sequence. At one pass over one minibatch every ratio is 1 when the gradient is
    taken, so both give A_i · ∇ Σ_t log π_t per sequence: the same update."""
    from trl import RLOOConfig

    if cfg.kl_penalty != "reward":
        raise ValueError(f"method.kl_penalty={cfg.kl_penalty!r}: TRL's RLOO puts the KL in the "
                         "reward only (kl_penalty=reward)")
    return RLOOConfig(**group_args(cfg, steps, out_dir, seed, device), epsilon_high=cfg.clip_eps,
                      normalize_advantages=False)


def dpo_args(cfg: Any, steps: int, out_dir: Path, seed: int, device: torch.device) -> Any:
    """``trl.DPOConfig`` equal to the harness's :class:`~harness.methods.dpo.DPOConfig` ``cfg``:
    ``batch_size`` pairs a step, the reference log-probs computed once before training (as the
    harness does), the same beta, label smoothing, loss and maximum length."""
    from trl import DPOConfig

    return DPOConfig(
        **common_args(cfg.optim, steps, out_dir, seed, device),
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        precompute_ref_log_probs=True, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        loss_type=[cfg.loss_type], max_length=cfg.max_len,
    )


def ppo_args(cfg: Any, steps: int, out_dir: Path, seed: int, device: torch.device) -> Any:
    """``trl.experimental.ppo.PPOConfig`` (TRL 1.12) equal to the harness's
    :class:`~harness.methods.ppo.PPOConfig` ``cfg``: ``prompts_per_batch`` prompts a step in one
    minibatch, ``update_epochs`` epochs, the same response length, sampling temperature, KL
    coefficient (k1 in the reward, as the harness's ``kl_penalized_rewards``), clip ranges, value
    coefficient, gamma and lambda, responses cut at EOS; no reward whitening (the harness whitens
    advantages, as TRL does too). TRL's loop has no entropy bonus and clips no gradients
    (``max_grad_norm`` is passed but not read), so the harness's side runs without both
    (:data:`PPO_AS_TRL`)."""
    from trl.experimental.ppo import PPOConfig

    prompts = cfg.rollout.prompts_per_batch
    if cfg.minibatch_size < prompts:
        raise ValueError("--vs trl compares PPO with one minibatch of the whole rollout: "
                         f"minibatch_size={cfg.minibatch_size} < {prompts} prompts")
    common = common_args(cfg.optim, steps, out_dir, seed, device)
    common.pop("model_init_kwargs")
    return PPOConfig(
        **common, per_device_train_batch_size=prompts, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=cfg.update_epochs, total_episodes=steps * prompts,
        local_rollout_forward_batch_size=prompts, response_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, stop_token="eos", missing_eos_penalty=None,
        num_sample_generations=0, kl_coef=cfg.beta, kl_estimator="k1", cliprange=cfg.clip_eps,
        cliprange_value=cfg.value_clip, vf_coef=cfg.vf_coef, gamma=cfg.gamma, lam=cfg.lam,
        whiten_rewards=False,
    )


def ppo_trainer(cfg: Any, weights: Path, task: Any, tok: Any, steps: int, seed: int,
                device: torch.device, root: Path, clock: StepClock) -> Any:
    """TRL 1.12's ``PPOTrainer`` from the exported policy ``weights``: the reference a second copy,
    the reward and value models the same backbone with a fresh one-output head
    (``AutoModelForSequenceClassification``; the harness's are its reward model and a critic
    initialised from it: the same matrix products, other values), prompts tokenized as
    ``[bos] + prompt`` like the harness's."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOTrainer

    ptok = left_padding(tok)
    prompts = sorted(set(task.sft_dataset("train")["prompt"]))
    ids = ptok([tok.bos_token + p for p in prompts], add_special_tokens=False)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids})
    fp32 = {"dtype": torch.float32}
    policy, ref = (AutoModelForCausalLM.from_pretrained(weights, **fp32) for _ in range(2))
    value, reward = (AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1, **fp32)
                     for _ in range(2))
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    return PPOTrainer(args=ppo_args(cfg, steps, root / "trl-ppo", seed, device),
                      processing_class=ptok, model=policy, ref_model=ref, reward_model=reward,
                      value_model=value, train_dataset=data, eval_dataset=data.select(range(2)),
                      callbacks=[clock])


# ------------------------------------------------------------------------ TRL's side
def left_padding(tok: Any) -> Any:
    """A copy of the tokenizer that pads on the left (TRL's generation requires it)."""
    t = copy.deepcopy(tok)
    t.padding_side = "left"
    return t


def gold_reward(task: Any, bos: str) -> Any:
    """TRL reward function: the task's gold reward of each completion (the harness's GRPO reward
    with ``reward_source: gold``); TRL's prompts carry the BOS text the harness's encoder adds."""

    def gold(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(r) for r in task.rewards([p.removeprefix(bos) for p in prompts], completions)]

    gold.__name__ = "gold"
    return gold


def trl_step_times(method: str, cfg: Any, weights: Path, task: Any, tok: Any, steps: int,
                   seed: int, device: torch.device, root: Path) -> tuple[list[float], dict]:
    """Seconds of each of ``steps`` TRL optimisation steps of ``method`` (grpo | dpo) from the
    checkpoint ``weights``, and TRL's mean completion length (GRPO) from its logs.

    Datasets (the harness's arith prompts / preference pairs, BOS written out so the token ids
    equal the harness's ``[bos] + prompt``) and the trainer are built before the clock starts.
    """
    from datasets import Dataset
    from trl import DPOTrainer, GRPOTrainer

    bos = tok.bos_token
    clock = StepClock(device)
    # stderr: TRL's DPO reference-log-prob bar (plain tqdm, only TQDM_DISABLE turns it off)
    with quiet_trl(), contextlib.redirect_stderr(io.StringIO()):
        if method == "grpo":
            prompts = sorted(set(task.sft_dataset("train")["prompt"]))
            data = Dataset.from_dict({"prompt": [bos + p for p in prompts]})
            trainer = GRPOTrainer(model=str(weights), reward_funcs=[gold_reward(task, bos)],
                                  args=grpo_args(cfg, steps, root / "trl-grpo", seed, device),
                                  train_dataset=data, processing_class=left_padding(tok),
                                  callbacks=[clock])
        elif method == "dpo":
            pairs = task.preference_dataset("train")
            data = Dataset.from_dict({"prompt": [bos + p for p in pairs["prompt"]],
                                      "chosen": list(pairs["chosen"]),
                                      "rejected": list(pairs["rejected"])})
            trainer = DPOTrainer(model=str(weights), args=dpo_args(cfg, steps, root / "trl-dpo",
                                                                   seed, device),
                                 train_dataset=data, processing_class=left_padding(tok),
                                 callbacks=[clock])
        elif method == "ppo":
            trainer = ppo_trainer(cfg, weights, task, tok, steps, seed, device, root, clock)
        else:
            raise ValueError(f"--vs trl: no TRL trainer for {method!r}")
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()):
        raise RuntimeError("TRL's model has gradient checkpointing on; the comparison needs it off")
    # stdout: TRL's PPO loop prints its own banner (accelerator.print)
    with quiet_trl(), contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    info = {"threads": torch.get_num_threads()}
    if logs:
        info["response_tokens"] = sum(h["completions/mean_length"] for h in logs) / len(logs)
    del trainer
    gc.collect()
    if len(clock.times) != steps:
        raise RuntimeError(f"TRL {method}: {len(clock.times)} steps ran, expected {steps}")
    return clock.times, info


# -------------------------------------------------------------------- the comparison
def step_tokens(method: str, cfg: Any, task: Any, tok: Any) -> int:
    """T of the FLOP model: the longest sequence of a step (the batch is padded to it).

    grpo: ``[bos] + prompt`` (the longest prompt) + ``max_new_tokens``; dpo: the longest
    ``[bos] + prompt + answer + [eos]`` of the preference pairs.
    """
    def n_tokens(texts: Sequence[str]) -> int:
        return max(len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"])

    if method in ("grpo", "ppo"):
        return 1 + n_tokens(task.sft_dataset("train")["prompt"]) + cfg.rollout.max_new_tokens
    pairs = task.preference_dataset("train")
    return 2 + max(n_tokens([p + c for p, c in zip(pairs["prompt"], pairs[side], strict=True)])
                   for side in ("chosen", "rejected"))


def step_flops(method: str, model_cfg: ModelConfig, cfg: Any, seq_len: int) -> float:
    """FLOPs of one step (:mod:`harness.bench.flops`) at the harness config ``cfg``'s sizes."""
    if method == "grpo":
        return grpo_step_flops(model_cfg, cfg.rollout.prompts_per_batch * cfg.group_size, seq_len,
                               cfg.update_epochs, cfg.group_size if cfg.share_prompt else 0,
                               seq_len - cfg.rollout.max_new_tokens)
    if method == "ppo":
        return ppo_step_flops(model_cfg, cfg.rollout.prompts_per_batch, seq_len, cfg.update_epochs)
    return dpo_step_flops(model_cfg, cfg.batch_size, seq_len)


def harness_overrides(method: str, new_tokens: int, share_prompt: bool = False) -> list[str]:
    """The Hydra overrides of the compared configs: GRPO and PPO sample ``new_tokens`` tokens;
    PPO runs :data:`EPOCHS_PPO` epochs without what TRL 1.12's PPO lacks (:data:`PPO_AS_TRL`);
    DPO scores each pair, GRPO each group, with its prompt once when ``share_prompt``
    (``method.share_prompt``)."""
    out = [*rollout_overrides(method, new_tokens), *share_prompt_overrides(method, share_prompt)]
    if method == "ppo":
        out += [f"method.update_epochs={EPOCHS_PPO}", *PPO_AS_TRL]
    return out


def one_round(method: str, model_cfg: ModelConfig, task: Any, tok: Any, batch: int,
              new_tokens: int, iters: int, warmup: int, seed: int, device: torch.device,
              root: Path, fused_adamw: bool = False, share_prompt: bool = False) -> dict[str, Any]:
    """One interleaved round of ``method``: the harness's steps, then TRL's from the same initial
    weights; medians over ``iters`` steps after ``warmup``. ``fused_adamw``: both sides step
    with the fused AdamW kernel (:func:`common_args`); ``share_prompt``: the harness's DPO packs
    each pair, its GRPO each group, with its prompt once (TRL's runs a row per sequence)."""
    from harness.models.hf import to_hf_model

    weights = root / f"{method}-init"
    built: dict[str, Any] = {}

    def export(setup: Any) -> None:
        built["setup"] = setup
        with quiet_trl():
            to_hf_model(setup.model, tok).save_pretrained(weights)
        precompute_reference(setup.module, device)

    minibatch = batch if method in ("grpo", "ppo") else None
    ours = bench_method_steps(method, model_cfg, task, tok, batch, iters, warmup, seed, device,
                              minibatch, root=root,
                              overrides=harness_overrides(method, new_tokens, share_prompt),
                              before_fit=export, fused_adamw=fused_adamw)
    setup = built.pop("setup")
    cfg = setup.module.cfg
    theirs, info = trl_step_times(method, cfg, weights, task, tok, warmup + iters, seed, device,
                                  root)
    layout = setup.shape.layout
    if method in ("grpo", "ppo"):
        layout += f" x {new_tokens} tokens"
    if method == "ppo":
        layout += f", {cfg.update_epochs} epochs"
    row = {"method": method, "layout": layout, "sequences": setup.shape.sequences,
           "harness_s": ours["s_per_batch"], "trl_s": median(theirs[warmup:]),
           "harness_times": ours["times"], "trl_times": theirs[warmup:],
           "seq_len": step_tokens(method, cfg, task, tok), "threads": info["threads"]}
    row["ratio"] = row["trl_s"] / row["harness_s"]
    row["flops"] = step_flops(method, model_cfg, cfg, row["seq_len"])
    if method == "grpo":
        n_rollouts = warmup + iters
        row["harness_response_tokens"] = setup.module.tokens_generated / (n_rollouts * setup.shape.sequences)
        row["trl_response_tokens"] = info.get("response_tokens")
    return row


def compare_with_trl(model_cfg: ModelConfig, task: Any, tok: Any, batch: int, new_tokens: int,
                     pairs: int, rounds: int, iters: int, warmup: int, seed: int,
                     device: torch.device, out: Any = print, steps: Sequence[str] = STEPS,
                     ppo_prompts: int | None = None, fused_adamw: bool = False,
                     share_prompt: bool = False) -> dict[str, Any]:
    """The matmul peak, then ``rounds`` interleaved rounds of the ``steps``: GRPO (``batch``
    sequences, ``new_tokens`` new tokens each, one minibatch), DPO (``pairs`` pairs), PPO
    (``ppo_prompts`` prompts, ``new_tokens`` new tokens, one minibatch, :data:`EPOCHS_PPO`
    epochs; TRL 1.12 only); prints the table. ``fused_adamw``: both sides use the fused AdamW
    kernel (TRL's default ``optim`` since torch 2.8; otherwise both run the per-tensor loop);
    ``share_prompt``: the harness's DPO and GRPO run each pair's or group's prompt once
    (``method.share_prompt``).

    Returns ``{"model", "params_mm", "peak_gflops": {n: GFLOP/s}, "rounds": [row, ...],
    "summary": [row, ...]}`` (rows as :func:`one_round`'s, plus achieved GFLOP/s and % of peak).
    """
    trl_version = require_trl()
    if "ppo" in steps:
        if not ppo_prompts or ppo_prompts < 1:
            raise ValueError(f"--ppo-prompts={ppo_prompts}: PPO needs >= 1 prompt per step")
        require_ppo_trainer()
    load_before = load_average()
    peak = {n: matmul_gflops(n, device=device) for n in PEAK_SIZES}
    rows: list[dict[str, Any]] = []
    sizes = {"grpo": batch, "dpo": 2 * pairs, "ppo": ppo_prompts}
    with tempfile.TemporaryDirectory(prefix="harness-vs-trl-") as tmp:
        for r in range(rounds):
            for method in steps:
                root = Path(tmp) / f"round{r}"
                row = one_round(method, model_cfg, task, tok, sizes[method], new_tokens, iters,
                                warmup, seed, device, root, fused_adamw, share_prompt)
                row["round"] = r + 1
                add_rates(row, peak[PEAK_SIZES[-1]])
                rows.append(row)
    summary = [summarise([x for x in rows if x["method"] == m]) for m in steps]
    result = {"model": model_cfg.name, "params_mm": matmul_params(model_cfg), "trl": trl_version,
              "peak_gflops": peak, "rounds": rows, "summary": summary,
              "adamw": "fused" if fused_adamw else "per-tensor", "share_prompt": share_prompt,
              "load_average": (load_before, load_average())}
    out(format_report(result, device) + "\n")
    return result


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): timings are only worth something
    on a machine no other process keeps busy."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def add_rates(row: dict[str, Any], peak_gflops: float) -> None:
    """Achieved GFLOP/s of both sides and the harness's % of the matmul peak, in place."""
    row["harness_gflops"] = row["flops"] / row["harness_s"] / 1e9
    row["trl_gflops"] = row["flops"] / row["trl_s"] / 1e9
    row["pct_peak"] = 100.0 * row["harness_gflops"] / peak_gflops


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One method's rounds as ``(min, max)`` ranges of every timed figure."""
    keys = ("harness_s", "trl_s", "ratio", "harness_gflops", "trl_gflops", "pct_peak")
    out = {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in keys}
    out.update(method=rows[0]["method"], layout=rows[0]["layout"], flops=rows[0]["flops"],
               rounds=len(rows))
    return out


VS_COLUMNS: list[Column] = [
    ("step", "step", ""), ("round", "round", ""), ("harness_s", "harness s/step", ""),
    ("trl_s", "TRL s/step", ""), ("ratio", "TRL/harness", ""), ("gflop", "GFLOP/step", ""),
    ("harness_gflops", "harness GFLOP/s", ""), ("pct_peak", "% of peak", ""),
    ("trl_gflops", "TRL GFLOP/s", ""),
]


def _fmt(v: float | tuple[float, float], spec: str, suffix: str = "") -> str:
    """A number, or a ``lo–hi`` range of two."""
    if isinstance(v, tuple):
        return f"{v[0]:{spec}}–{v[1]:{spec}}{suffix}"
    return f"{v:{spec}}{suffix}"


def display_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """The table's rows as text: every round, then each method's range over the rounds."""
    out = []
    for r in [*result["rounds"], *result["summary"]]:
        label = r["method"].upper()
        out.append({
            "step": f"{label}, {r['layout']}",
            "round": str(r["round"]) if "round" in r else "all",
            "harness_s": _fmt(r["harness_s"], ".3f"), "trl_s": _fmt(r["trl_s"], ".3f"),
            "ratio": _fmt(r["ratio"], ".2f", "x"), "gflop": _fmt(r["flops"] / 1e9, ".2f"),
            "harness_gflops": _fmt(r["harness_gflops"], ".0f"),
            "pct_peak": _fmt(r["pct_peak"], ".0f", "%"),
            "trl_gflops": _fmt(r["trl_gflops"], ".0f"),
        })
    return out


def format_report(result: dict[str, Any], device: torch.device) -> str:
    """The comparison table with the peak and what the figures mean."""
    peak = result["peak_gflops"]
    grpo = next((r for r in result["rounds"] if r["method"] == "grpo"), {})
    seq_len = next(r["seq_len"] for r in result["rounds"] if r["method"] in ("grpo", "ppo")
                   ) if any(r["method"] in ("grpo", "ppo") for r in result["rounds"]) else "-"
    tokens = ""
    if grpo.get("trl_response_tokens") is not None:
        tokens = (f" Mean response tokens (round 1): harness {grpo['harness_response_tokens']:.1f}, "
                  f"TRL {grpo['trl_response_tokens']:.1f} (random-init policies stop at EOS at random).")
    notes = [
        "fp32 matmul peak, measured in this run: "
        + ", ".join(f"{n}x{n} {g:.0f} GFLOP/s" for n, g in peak.items())
        + f"; % of peak is against {PEAK_SIZES[-1]}x{PEAK_SIZES[-1]}.",
        "s/step: median wall time of one optimisation step after warm-up; rounds run interleaved "
        "(harness, TRL, harness, TRL, ...), each from the same exported initial weights. harness: a "
        "Lightning training batch; TRL: Trainer's on_step_begin -> on_step_end (training_step, "
        "clipping, optimizer.step, scheduler, zero_grad). TRL/harness > 1: the harness is faster.",
        f"GFLOP/step (harness.bench.flops): N_mm = {result['params_mm']:,} matmul weights; F_fwd = "
        "2 N_mm B T + 4 L B T^2 d_attn; GRPO = 5 F_fwd (sampling, reference, policy fwd + bwd), "
        f"T = {seq_len}; DPO = 3 F_fwd(2 pairs, T), reference log-probs precomputed "
        "(both sides); PPO = 2 F + 2 G + 3 E (F + G), G = F_fwd without the LM head (reward "
        "model, critic).",
        "Same settings on both sides (TRL's from the harness's stage config): fp32, "
        f"{result.get('adamw', 'per-tensor')} AdamW (--fused-adamw: both fused) + grad "
        "clip, TRL gradient checkpointing off; the harness's DPO "
        + ("packs each pair, its GRPO each group, with its prompt once (--share-prompt; "
           "GRPO's GFLOP/step counts the packed passes, DPO's the two-row layout); "
           if result.get("share_prompt")
           else "runs chosen and rejected as two rows, as TRL does; ")
        + "GRPO loss_type, beta > 0 (both run the reference pass), clip eps, group reward "
        "scaling, sampling temperature; DPO sigmoid loss, beta; PPO epochs, one minibatch, k1 "
        "KL in the reward, clip ranges, vf_coef, gamma, lambda, no entropy bonus and no gradient "
        "clipping (TRL 1.12's PPO has neither) "
        "(TRL: on_train_begin/on_step_end -> on_step_end, the whole update; its reward and value "
        "models are the policy's backbone with a fresh scalar head)." + tokens,
        f"model {result['model']}, device {device}, torch threads {torch.get_num_threads()}, "
        f"TRL {result['trl']}; 1-min load average before / after: "
        + " / ".join("-" if x is None else f"{x:.1f}" for x in result["load_average"])
        + f" on {os.cpu_count()} cores.",
    ]
    series = PPO_SERIES if any(r["method"] == "ppo" for r in result["rounds"]) else TRL_SERIES
    if not result["trl"].startswith(series):
        notes.append(f"WARNING: TRL {result['trl']} is installed; the comparison is written for "
                     f"TRL {series} ({'pip install -e .[trl]' if series == TRL_SERIES else MISSING_PPO}).")
    title = f"4. Harness vs TRL {result['trl']}: seconds per optimisation step, same settings"
    return format_table(title, display_rows(result), VS_COLUMNS, notes)
