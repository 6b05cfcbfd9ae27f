"""What every method's LightningModule shares: optimiser set-up, MoE and throughput logging."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.profilers import PassThroughProfiler

from harness.config import OptimConfig
from harness.methods.losses import check_finite
from harness.methods.optim import build_optimizer
from harness.models.llama import CausalLMOutput
from harness.util.step_profile import CLOSURE, STEP, action


class AlignmentModule(L.LightningModule):
    """Base class: subclasses set ``self.trainable`` (modules to optimise) and call the helpers.

    Resume checkpoints (:mod:`harness.resume`) carry, besides Lightning's weights, optimiser and
    loop states, the global RNG states, the state of every ``torch.Generator`` attribute and the
    attributes named in ``RESUME_ATTRS`` (running counters; subclasses add their own, e.g. PPO's
    adaptive KL coefficient).
    """

    RESUME_ATTRS: tuple[str, ...] = ("tokens_trained", "tokens_generated", "gen_seconds",
                                     "responses", "reward_calls", "pairs_seen", "updates")

    def __init__(self, optim: OptimConfig, max_steps: int) -> None:
        super().__init__()
        self.optim_cfg = optim
        self.max_steps = max_steps
        self._t0: float | None = None
        #: tokens of the sequences optimised on (summed over optimisation passes), tokens sampled
        #: by the policy and the seconds spent sampling: the stage's throughput (cost/*_tokens_per_s)
        self.tokens_trained = 0
        self.tokens_generated = 0
        self.gen_seconds = 0.0
        #: the stage's budget (:meth:`budget`): responses sampled, reward calls made, preference
        #: pairs trained on, optimiser steps taken by hand (manual optimisation)
        self.responses = 0
        self.reward_calls = 0
        self.pairs_seen = 0
        self.updates = 0

    def trainable_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def _multi_process(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def log(self, name: str, value, *args, **kwargs) -> None:
        """Lightning's ``log``; under DDP every metric is the mean over the ranks (``sync_dist``),
        so the run's metrics describe the global batch, not rank 0's share of it."""
        kwargs.setdefault("sync_dist", self._multi_process)
        super().log(name, value, *args, **kwargs)

    def log_dict(self, dictionary, *args, **kwargs) -> None:
        """Lightning's ``log_dict``, reduced over the ranks like :meth:`log`."""
        kwargs.setdefault("sync_dist", self._multi_process)
        super().log_dict(dictionary, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from harness.resume import rng_states

        checkpoint["harness"] = {
            "rng": rng_states(),
            "generators": {k: v.get_state() for k, v in vars(self).items()
                           if isinstance(v, torch.Generator)},
            "attrs": {k: getattr(self, k) for k in self.RESUME_ATTRS},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from harness.resume import set_rng_states

        state = checkpoint.get("harness")
        if state is None:  # a checkpoint from before resume existed: weights only
            return
        set_rng_states(state["rng"])
        for k, v in state["generators"].items():
            getattr(self, k).set_state(v)
        for k, v in state["attrs"].items():
            setattr(self, k, v)

    def profiling(self) -> bool:
        """Whether the trainer's Lightning profiler records (``trainer.profiler``, the bench's
        ``--profile``): Lightning's default ``PassThroughProfiler`` does not."""
        trainer = self._trainer
        return trainer is not None and not isinstance(trainer.profiler, PassThroughProfiler)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """The block as the phase ``name`` of the step (:mod:`harness.util.step_profile`) on the
        trainer's profiler; nothing when none records."""
        if not self.profiling():
            yield
            return
        self._region_edge(name, start=True)
        try:
            yield
        finally:
            self._region_edge(name, start=False)

    def _region_edge(self, name: str, start: bool) -> None:
        """Start or stop the profiler action of region ``name``; on a GPU the device is
        synchronised first, so that the phase is charged with its own kernels."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler = self.trainer.profiler
        (profiler.start if start else profiler.stop)(action(name))

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Lightning's hook (automatic and manual optimisation): the phase ``backward`` starts."""
        if self.profiling():
            self._region_edge("backward", start=True)

    def on_after_backward(self) -> None:
        """Lightning's hook: the phase ``backward`` ends."""
        if self.profiling():
            self._region_edge("backward", start=False)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's hook (automatic optimisation only); while a profiler records, the whole
        step and its closure (training_step, zero_grad, backward) are regions of their own, whose
        difference is the optimiser's share (:func:`harness.util.step_profile.phase_seconds`)."""
        if not self.profiling() or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            with self.region(CLOSURE):
                return optimizer_closure()

        with self.region(STEP):
            return super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def configure_optimizers(self):
        return build_optimizer(self.trainable_modules(), self.optim_cfg, self.max_steps)

    def log_moe(self, out: CausalLMOutput, prefix: str = "train") -> None:
        """``<prefix>/moe_aux_loss`` and ``<prefix>/expert_load/<i>`` (mean over layers)."""
        if not out.expert_load:
            return
        self.log(f"{prefix}/moe_aux_loss", out.aux_loss.detach(), on_step=True, on_epoch=False)
        load = torch.stack(out.expert_load).mean(0)
        for i, v in enumerate(load.tolist()):
            self.log(f"{prefix}/expert_load/{i}", v, on_step=True, on_epoch=False)

    def log_throughput(self, n_tokens: int) -> None:
        """``train/tokens_per_s``: tokens processed per second of wall time between steps."""
        self.tokens_trained += n_tokens
        now = time.perf_counter()
        if self._t0 is not None:
            self.log("train/tokens_per_s", n_tokens / max(now - self._t0, 1e-9),
                     on_step=True, on_epoch=False)
        self._t0 = now

    def checked(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """Stop the run with a message naming ``name`` when it is NaN or infinite."""
        check_finite(name, loss)
        return loss

    def final_metrics(self) -> dict[str, float]:
        """Metrics the module has once training is over, added to the stage's: its budget (and,
        in subclasses, e.g. the reward model's kept checkpoint)."""
        return self.budget()

    def budget(self) -> dict[str, float]:
        """What the stage spent, over every rank: ``budget/optimizer_steps`` (the policy's),
        ``budget/trained_tokens`` (tokens of the sequences optimised on, summed over passes) and,
        where the stage has them, ``budget/responses`` (sampled), ``budget/reward_calls`` (scored)
        and ``budget/pairs`` (preference pairs trained on, with repeats)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        steps = self.global_step if self.automatic_optimization else self.updates
        out = {"budget/optimizer_steps": float(steps),
               "budget/trained_tokens": float(self.tokens_trained * world)}
        for key, n in (("responses", self.responses), ("reward_calls", self.reward_calls),
                       ("pairs", self.pairs_seen)):
            if n:
                out[f"budget/{key}"] = float(n * world)
        return out

    def throughput(self, wall_s: float) -> dict[str, float]:
        """The stage's token counts and rates over its ``wall_s`` (generation over its own time)."""
        out = {"cost/train_tokens": float(self.tokens_trained),
               "cost/train_tokens_per_s": self.tokens_trained / max(wall_s, 1e-9)}
        if self.tokens_generated:
            out["cost/gen_tokens"] = float(self.tokens_generated)
            out["cost/gen_tokens_per_s"] = self.tokens_generated / max(self.gen_seconds, 1e-9)
        return out
