"""Structured configs: the one home of every default, and the checks that run before any work.

The dataclasses are the source of every default. Each config group's YAML in ``conf/`` names its
schema (``- base_grpo``, ``- base_arith`` ...) or merges into a typed section of the top-level
schema (``trainer``, ``logger``, ``eval``, ``sft``, ``rm``), and holds only what that option
changes; a test checks that no YAML repeats a schema's default. Hydra therefore rejects unknown
keys and wrong types, and :func:`harness.settings.validate` checks the values (ranges, choices,
divisibility) of every group and raises :class:`ConfigError` naming the field.

This module holds the run-wide schemas and the shared ones (``OptimConfig``, ``RolloutConfig``)
with the checks they use. The stage configs (``SFTConfig``, ``GRPOConfig`` ...) build on them in
:mod:`harness.methods.config`, which the stage registry (:mod:`harness.registry`) names, and
:mod:`harness.settings` composes and checks them all; none of these modules imports Lightning or
torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from harness.models.architecture import ConfigError, ModelConfig

__all__ = ["ConfigError", "EvalConfig", "LmEvalConfig", "LoggerConfig", "ModelConfig",
           "OptimConfig", "RolloutConfig", "StageRef", "TrainerConfig", "model_config",
           "to_dataclass"]


# ------------------------------------------------------------------------------ checks
def fail(prefix: str, name: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming ``<prefix>.<name>`` (just ``<name>`` for top-level fields)."""
    raise ConfigError(f"{prefix + '.' if prefix else ''}{name}={value!r}: {why}")


def reject_non_finite(node: Any, path: str) -> None:
    """Every float of a config, at any depth (dataclass fields, mappings, lists), must be finite:
    one rule for every field, checked before any work. Raises :class:`ConfigError` naming the
    first field that is NaN or infinite (``method.beta=inf``)."""
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ConfigError(f"{path}={node}: must be a finite number")
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            reject_non_finite(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(node, dict):
        for k, v in node.items():
            reject_non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            reject_non_finite(v, f"{path}[{i}]")


def positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not v > 0:
            fail(prefix, name, v, "must be > 0")


def in_range(obj: Any, prefix: str, name: str, lo: float | None, hi: float | None,
             closed_hi: bool = True) -> None:
    v = getattr(obj, name)
    if lo is not None and v < lo:
        fail(prefix, name, v, f"must be >= {lo}")
    if hi is not None and (v > hi or (not closed_hi and v == hi)):
        fail(prefix, name, v, f"must be {'<=' if closed_hi else '<'} {hi}")


def one_of(obj: Any, prefix: str, name: str, choices: Sequence[Any]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        fail(prefix, name, v, f"must be one of {', '.join(map(str, choices))}")


# ------------------------------------------------------------------ shared sub-configs
@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``; gradient clipping.

    ``fused``: PyTorch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``, TRL's
    ``optim="adamw_torch_fused"``) instead of its default per-tensor loop. The same update, one
    kernel over every tensor: faster, but it rounds differently, so the same seed gives other
    weights after a few steps; off by default, so that runs repeat the records made without it.
    A stage trained with it is cached under another key (:meth:`key_fields`).
    """

    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: bool = False

    def key_fields(self) -> dict[str, Any]:
        """The fields that decide a stage's output (its cache key): all of them, less ``fused``
        when it is off, so stages cached before the option existed keep their keys."""
        out = dataclasses.asdict(self)
        if not self.fused:
            del out["fused"]
        return out

    def check(self, prefix: str) -> None:
        positive(self, prefix, "lr")
        in_range(self, prefix, "weight_decay", 0.0, None)
        in_range(self, prefix, "beta1", 0.0, 1.0, closed_hi=False)
        in_range(self, prefix, "beta2", 0.0, 1.0, closed_hi=False)
        in_range(self, prefix, "warmup_steps", 0, None)
        in_range(self, prefix, "min_lr_ratio", 0.0, 1.0)
        in_range(self, prefix, "grad_clip", 0.0, None)


@dataclass
class RolloutConfig:
    """Sampling of responses during RL (KV-cached sampler)."""

    prompts_per_batch: int = 32
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0                  # 0 = no top-k filter
    top_p: float = 1.0
    # on a GPU, the sampler's decoding step as one CUDA graph replay per token (rounds the
    # attention differently in the last bits: harness.models.decoding.GraphedDecodeStep);
    # false: the eager step, the forward's logits bit for bit. No effect on a CPU.
    cuda_graph: bool = True
    # subtracted from the sequence reward of a response that ends without EOS (cut off at
    # max_new_tokens): TRL's missing_eos_penalty, Huang et al. 2024's EOS trick; 0 = off, TRL's
    # default
    missing_eos_penalty: float = 0.0

    def check(self, prefix: str) -> None:
        positive(self, prefix, "prompts_per_batch", "max_new_tokens", "temperature", "top_p")
        in_range(self, prefix, "top_k", 0, None)
        in_range(self, prefix, "top_p", 0.0, 1.0)
        in_range(self, prefix, "missing_eos_penalty", 0.0, None)


@dataclass
class StageRef:
    """``method=sft`` / ``method=rm``: the result is that base stage itself, configured in its own
    section (``sft.*`` / ``rm.*``, as when another method builds on it)."""

    name: str = MISSING

    def check(self, prefix: str = "method") -> None:
        """Nothing to check: the stage's own section is checked under its name."""


# ------------------------------------------------------------- run-level config groups
@dataclass
class LmEvalConfig:
    """lm-evaluation-harness on the saved Hugging Face checkpoint (``eval.lm_eval``)."""

    enabled: bool = True
    #: lm-eval task names; null = the group exported for the run's dataset (``harness_<dataset>``)
    tasks: list[str] | None = None
    limit: int | None = 200          # documents per task (null = all)
    batch_size: Any = 32             # an int, or "auto"
    num_fewshot: Any = None          # null, an int, or {task: int}
    add_bos_token: bool = False      # the exported texts carry <bos>; true would double it
    #: read lm-eval's built-in tasks (needs network) instead of exporting the run's task
    include_defaults: bool = False

    def check(self, prefix: str) -> None:
        if self.limit is not None and self.limit <= 0:
            fail(prefix, "limit", self.limit, "must be > 0 or null (all documents)")
        b = self.batch_size
        if not (b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b > 0)):
            fail(prefix, "batch_size", b, "must be a positive integer or 'auto'")


@dataclass
class EvalConfig:
    """Evaluation after training: the gold reward on held-out prompts, then lm-eval.

    ``split``: test (the task's eval split, for the leaderboard) or validation (distinct prompts of
    the validation split, for tuning: the test split is never seen while tuning).
    ``curve_points``: points of the held-out gold curve per training stage, each on
    ``curve_prompts`` validation prompts (greedy); 0 = off.
    """

    max_new_tokens: int = 16
    batch_size: int = 100
    split: str = "test"
    limit: int | None = None         # held-out prompts used (null = all of the split)
    curve_points: int = 20
    curve_prompts: int = 64
    n_samples: int = 8               # sample generations kept in summary.json / the W&B table
    # on a GPU, evaluation's sampling (gold reward, KL, the held-out curve) decodes as one CUDA
    # graph replay per token, as method.rollout.cuda_graph does for the rollouts; false: the eager
    # step, the forward's logits bit for bit. No effect on a CPU.
    cuda_graph: bool = True
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def check(self, prefix: str = "eval") -> None:
        positive(self, prefix, "max_new_tokens", "batch_size")
        one_of(self, prefix, "split", ("test", "validation"))
        if self.limit is not None and self.limit <= 0:
            fail(prefix, "limit", self.limit, "must be > 0 or null (all prompts)")
        for name in ("curve_points", "curve_prompts", "n_samples"):
            in_range(self, prefix, name, 0, None)
        self.lm_eval.check(f"{prefix}.lm_eval")


#: ``trainer.accelerator`` values the harness runs on (evaluation follows: ``TrainerConfig.device``).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
#: Lightning's names for ``trainer.precision`` (``lightning.fabric.connector._PRECISION_INPUT``,
#: checked by a test), here so that a bad value stops before Lightning is imported.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
              "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments (``trainer`` group); the stage adds its budget."""

    accelerator: str = "cpu"
    devices: Any = 1                 # an int, a list of ids, or "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    num_sanity_val_steps: int = 0
    #: CPU threads of the run's process (torch.set_num_threads); null = torch's default (one per
    #: core), 1 under DDP on CPU. Parallel sweep jobs (``+launch=parallel``) run one thread each.
    threads: int | None = None
    #: training batches between resume checkpoints (``harness.resume``); 0 = none. A killed run,
    #: rerun with the same command, resumes its unfinished stage from the latest one.
    resume_every: int = 50
    #: Lightning's profiler by its Trainer name (simple | advanced | pytorch), null = none. Its
    #: report goes to ``<run dir>/profile/fit-<stage>.txt``; with ``simple`` the log, a JSON file
    #: and the stage's logger (``profile/<phase>_s``) also get each stage's time split into phases
    #: (sampling, reference, forward, backward, optimiser, ...: :mod:`harness.util.step_profile`).
    #: Timing only: the results do not change.
    profiler: str | None = None

    def check(self, prefix: str = "trainer") -> None:
        d = self.devices
        if isinstance(d, int) and not isinstance(d, bool) and d <= 0:
            fail(prefix, "devices", d, "must be >= 1, a list of device ids, or 'auto'")
        positive(self, prefix, "log_every_n_steps")
        if self.threads is not None and self.threads < 1:
            fail(prefix, "threads", self.threads, "must be >= 1 or null (torch's default)")
        one_of(self, prefix, "accelerator", ACCELERATORS)
        if isinstance(d, list | tuple) and self.device() == "cpu":
            fail(prefix, "devices", list(d), "a list of device ids needs GPUs; on a CPU give the "
                 "number of processes (trainer=ddp: 2)")
        one_of(self, prefix, "precision", PRECISIONS)
        if self.resume_every < 0:
            fail(prefix, "resume_every", self.resume_every, "must be >= 0 (0: no resume checkpoints)")
        if self.profiler is not None:
            from harness.util.step_profile import PROFILERS

            one_of(self, prefix, "profiler", (*PROFILERS, None))
        if str(self.strategy).startswith(("fsdp", "deepspeed")):
            import torch

            if self.accelerator == "cpu" or (self.accelerator == "auto" and not torch.cuda.is_available()):
                fail(prefix, "strategy", self.strategy,
                     "Lightning's FSDP and DeepSpeed strategies need GPUs; on CPU use trainer=ddp")

    def device(self) -> str:
        """Where the run computes: ``"cuda"`` for ``accelerator`` gpu/cuda (or auto with a GPU
        present), else ``"cpu"``; evaluation runs there too."""
        import torch

        gpu = self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto"
                                                      and torch.cuda.is_available())
        return "cuda" if gpu and torch.cuda.is_available() else "cpu"

    def kwargs(self) -> dict[str, Any]:
        """The ``lightning.Trainer`` arguments (everything but ``threads``, ``resume_every`` and
        ``profiler``, which the pipeline builds per stage)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("threads", "resume_every", "profiler")}


@dataclass
class LoggerConfig:
    """The experiment logger: W&B (offline unless ``offline=false``), CSV, or none.

    Offline W&B runs are written under the run directory's ``wandb/`` and can be uploaded later
    with ``wandb sync``; online needs ``wandb login`` or ``WANDB_API_KEY``.
    """

    kind: str = "wandb"
    project: str = "alignment-harness"
    entity: str | None = None
    offline: bool = True
    group: str | None = None         # the W&B group; null = the run's ``group``
    log_model: bool = False          # log the final checkpoint as a W&B artifact

    def check(self, prefix: str = "logger") -> None:
        """The values alone; whether W&B online has a key is the environment's to say
        (:func:`harness.settings.validate` asks :mod:`harness.util.wandb_auth`)."""
        one_of(self, prefix, "kind", ("wandb", "csv", "none"))


@dataclass
class RunSchema:
    """Top-level fields of a run (``conf/config.yaml``); the groups are typed by their own schemas."""

    model: Any = MISSING
    dataset: Any = MISSING
    method: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    #: a name for a set of runs (the W&B group and the leaderboard's ``--group``)
    group: str = "default"
    #: cached stages (tokenizers, datasets, SFT bases, reward models), shared by all runs
    cache_dir: str = "${oc.env:HARNESS_CACHE_DIR,.cache/harness}"
    force_retrain: bool = False      # retrain cached stages instead of reusing them
    #: where each finished run adds its record (null = none); ``python -m harness.leaderboard``
    results_dir: str | None = "${oc.env:HARNESS_RESULTS_DIR,results}"
    #: the level at which third-party libraries' lines (Lightning, transformers, datasets, W&B,
    #: lm-eval) reach the console and the run's log (:mod:`harness.util.console`); the harness's own
    #: lines are always shown
    log_level: str = "WARNING"
    #: the information track, what the method learns from (``null``: as ``method.reward_source``
    #: says): ``oracle`` sets an online method's ``reward_source`` to ``gold``, ``preferences``
    #: to ``rm``; offline DPO is on the preferences track (it learns from the pairs themselves)
    track: str | None = None
    #: in a multirun (``-m``), a job whose ``ok`` record of the same config (``config_hash``) and
    #: platform is already in ``results_dir`` is not run again: a sweep cut off and launched
    #: again runs only its failed and missing jobs
    skip_done: bool = True

    def check(self) -> None:
        from harness.util.console import LEVELS

        in_range(self, "", "seed", 0, 2**32 - 1)
        one_of(self, "", "log_level", LEVELS)
        one_of(self, "", "track", (None, *TRACK_SOURCES))


#: what each information track gives an online method to learn from (``method.reward_source``)
TRACK_SOURCES = {"oracle": "gold", "preferences": "rm"}
#: methods that learn from the preference pairs themselves: the preferences track, always
OFFLINE_PAIR_METHODS = ("dpo",)


def to_dataclass(schema: type, node: Any, prefix: str | None = None) -> Any:
    """Instantiate ``schema`` from a config node or mapping, recursively for nested dataclasses.

    With ``prefix`` (the section's name), a key the schema does not have raises
    :class:`ConfigError` naming it (Hydra's ``+key=value`` can add one past the schema).
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = [f.name for f in fields(schema)]
    if prefix is not None:
        for key in data:
            if key not in names:
                raise ConfigError(f"{prefix}.{key}: unknown field of {schema.__name__}; "
                                  f"known: {', '.join(names)}")
    kwargs = {}
    for f in fields(schema):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = f.default_factory if callable(getattr(f, "default_factory", None)) else None
        if sub is not None and isinstance(value, dict) and dataclasses.is_dataclass(sub()):
            value = to_dataclass(type(sub()), value, None if prefix is None else f"{prefix}.{f.name}")
        kwargs[f.name] = value
    return schema(**kwargs)


def model_config(node: DictConfig, cache_dir: str | None = None) -> ModelConfig:
    """The ``model`` section as a validated :class:`ModelConfig`: from its preset's fields, or, with
    ``model.pretrained``, from the checkpoint's ``config.json`` (:mod:`harness.models.pretrained`).
    Raises :class:`ConfigError` naming the field."""
    if node.get("pretrained") is not None:  # the checkpoint's config.json decides the shape
        from harness.models.pretrained import pretrained_config

        return pretrained_config(OmegaConf.to_container(node, resolve=True), cache_dir)[0]
    if missing := sorted(OmegaConf.missing_keys(node)):
        if node.get("name") == "hf":
            raise ConfigError("model.pretrained: missing; model=hf needs model.pretrained=<a "
                              "local Hugging Face model folder or a Hub id>")
        raise ConfigError(f"{missing[0]}: missing; the model preset must set "
                          f"{', '.join(missing)} (or name a checkpoint: model.pretrained=...)")
    return to_dataclass(ModelConfig, node, "model")  # __post_init__ validates
