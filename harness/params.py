"""``python -m harness.params model=<preset>``: per-component parameter count (Hydra entry point).

Thin: compose the ``params`` config -> build the model on the meta device -> print
:func:`harness.models.param_count.format_breakdown`. The last line printed is ``total <N>``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import hydra
from omegaconf import DictConfig

from harness.config import ConfigError, ModelConfig, model_config
from harness.models.param_count import (
    format_breakdown,
    format_transformers_breakdown,
    meta_model,
    parameter_breakdown,
)
from harness.settings import register_configs
from harness.util.conf_path import config_dir

register_configs()  # the model presets name the `base_model` schema: register before composing


def report(cfg: DictConfig) -> str:
    """The breakdown text for the composed config (``model`` + ``default_vocab_size``)."""
    model_cfg: ModelConfig = model_config(cfg.model)
    if model_cfg.via_transformers:
        return format_transformers_breakdown(model_cfg)
    note = ""
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=int(cfg.default_vocab_size))
        note = (f"note: model.vocab_size is null (set from the tokenizer at run time); "
                f"counting with default_vocab_size={model_cfg.vocab_size}\n")
    model = meta_model(model_cfg)
    return note + format_breakdown(parameter_breakdown(model), model_cfg)


@hydra.main(config_path=str(config_dir()), config_name="params", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        text = report(cfg)
    except ConfigError as exc:  # one line naming the field, as `python -m harness` stops
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"config error: {exc}")
    print(text)


if __name__ == "__main__":
    main()
