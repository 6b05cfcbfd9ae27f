"""What a run's console shows: the harness's own lines (each stage as it starts and finishes), one
progress bar for the training that runs, and the final summary.

Third-party libraries speak only at ``log_level`` (the run's top-level field, default
``WARNING``) and once: Lightning's own stderr handlers are removed so its lines reach the console
through Hydra's handlers alone. What is silenced at its source, and why:

* Lightning's "GPU available / TPU available" and "`Trainer.fit` stopped" lines: INFO, below the
  default level (``log_level=INFO`` shows them, once);
* Lightning's advert for litlogger: dropped at every level (a filter on the root handlers);
* ``datasets``' map bars and ``transformers``' "Writing model shards" bars: progress bars are
  turned off in those libraries (the training bar is Lightning's, evaluation's is the harness's);
* the warnings in :data:`NOISE`, each about the libraries' own code, not about the run.

Every other warning passes: it may tell the user something about *their* run. ``hydra.verbose``
(Hydra's own switch) leaves every logger at the level it names.
"""

from __future__ import annotations

import logging
import warnings

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The values ``log_level`` takes."""

THIRD_PARTY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
               "torchmetrics", "transformers", "datasets", "huggingface_hub", "lm_eval", "lm-eval",
               "wandb", "accelerate", "peft", "urllib3", "filelock", "fsspec", "matplotlib")
"""The loggers held to ``log_level``."""

OWN_HANDLERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")
"""Loggers that install a stderr handler of their own at import: each of their lines would
appear twice, once there and once through Hydra's root handlers."""

NOISE = (
    # torch's deprecation, raised from inside Lightning's utilities/_pytree.py at every fit
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # the on-policy stages keep the frozen reference (and, while sampling, the policy) in eval
    # mode on purpose: deterministic MoE routing keeps the ratios pi / pi_old meaningful
    r"Found \d+ module\(s\) in eval mode at the start of training.*",
)
"""Messages of warnings that say nothing about the user's run (regular expressions)."""


class DropAdvert(logging.Filter):
    """Drops Lightning's advertising tip (it names ``litlogger``) whatever the level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_console(level: str = "WARNING", verbose: bool = False) -> None:
    """Hold third-party loggers to ``level`` (left alone when ``verbose``), route Lightning's lines
    through the root handlers once, drop the advert, turn off the libraries' progress bars and
    ignore the :data:`NOISE` warnings. Idempotent: safe to call at every run of a sweep."""
    for name in OWN_HANDLERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    if not verbose:
        for name in THIRD_PARTY:
            logging.getLogger(name).setLevel(level)
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, DropAdvert) for f in h.filters):
            h.addFilter(DropAdvert())
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
