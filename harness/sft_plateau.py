"""``python -m harness.sft_plateau [--threshold T] [overrides]``: when does SFT leave its plateau?

On ``arith`` the SFT loss first sits on a plateau (the answer's units digit at chance) and then
drops; the step of the drop varies with the seed and the data format, and it decides how many
SFT steps a task needs. This trains the SFT stage of the composed config exactly as a run does
(the real :class:`~harness.methods.sft.SFTModule`, its AdamW and warm-up/cosine schedule, gradient
clipping, a Lightning ``Trainer`` from the ``trainer`` group) with no logger and no checkpoint,
and stops at the first step after ``--min-steps`` where the exponential moving average of the
training NLL,

    ema_t = decay * ema_{t-1} + (1 - decay) * nll_t,

falls below ``--threshold``. The last line printed is ``plateau_end <step>`` or, when the SFT
budget runs out first, ``plateau_end none``. Examples::

    python -m harness.sft_plateau model=moe_small seed=1
    python -m harness.sft_plateau model=llama_small seed=2 dataset.fixed_width=false
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from harness.config import register_configs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class PlateauEnd(L.Callback):
    """Stops training when the EMA of ``train/nll`` falls below ``threshold`` (after ``min_steps``).

    ``step`` is the optimisation step at which it did (None while it has not).
    """

    def __init__(self, threshold: float, min_steps: int, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay}: must be in [0, 1)")
        self.threshold, self.min_steps, self.decay = threshold, min_steps, decay
        self.ema: float | None = None
        self.step: int | None = None

    def update(self, nll: float, step: int) -> bool:
        """Fold in the NLL of optimisation step ``step`` (1-based); True once the plateau has ended."""
        self.ema = nll if self.ema is None else self.decay * self.ema + (1 - self.decay) * nll
        if self.step is None and step >= self.min_steps and self.ema < self.threshold:
            self.step = step
        return self.step is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        nll = trainer.callback_metrics.get("train/nll")
        if nll is not None and self.update(float(nll), trainer.global_step):
            trainer.should_stop = True


def plateau_end(overrides: Sequence[str], threshold: float = 0.4, min_steps: int = 200,
                decay: float = 0.95) -> int | None:
    """Train the SFT stage of ``overrides`` until its plateau ends; the step, or None."""
    from harness.methods.sft import SFTModule
    from harness.models.llama import CausalLM
    from harness.pipeline import Run, quiet_lightning

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["logger=none", *overrides])
    run = Run(cfg, Path(cfg.cache_dir) / "sft_plateau")
    c = run.sft_cfg
    quiet_lightning()
    L.seed_everything(run.seed, workers=True, verbose=False)  # as the pipeline seeds a stage
    module = SFTModule(CausalLM(run.model_cfg), c)
    probe = PlateauEnd(threshold, min_steps, decay)
    trainer_kwargs = {**run.cfg["trainer"], "enable_model_summary": False}
    trainer = L.Trainer(**trainer_kwargs, max_steps=c.max_steps, logger=False,
                        enable_checkpointing=False, gradient_clip_val=c.optim.grad_clip or None,
                        limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, datamodule=run.datamodule("sft", c))
    return probe.step


def main(argv: Sequence[str] | None = None) -> int | None:
    p = argparse.ArgumentParser(prog="python -m harness.sft_plateau",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=float, default=0.4, help="EMA of the NLL that ends it")
    p.add_argument("--min-steps", type=int, default=200, help="ignore the first steps (warm-up)")
    p.add_argument("--ema", type=float, default=0.95, help="decay of the moving average")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=moe_small seed=1")
    args = p.parse_args(argv)
    step = plateau_end(args.overrides, args.threshold, args.min_steps, args.ema)
    print(f"plateau_end {step if step is not None else 'none'}")
    return step


if __name__ == "__main__":
    main()
