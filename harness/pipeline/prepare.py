"""A run's set-up: the task, its tokenizer and the backbone's config, as one
:class:`~harness.stage.StageContext`, before any stage trains.

Nothing here changes the settings: a ``model.vocab_size`` of null is filled from the tokenizer in
the context's own copy of the model config.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from harness.config import ConfigError
from harness.data.prompt_format import FormattedTask, effective_format
from harness.data.tasks import build_task
from harness.data.tokenizer import load_or_build_tokenizer
from harness.registry import get_stage, stage_chain
from harness.settings import Settings
from harness.stage import StageContext


def prepare(settings: Settings, cache_root: Path) -> StageContext:
    """The task (its data under ``<cache_root>/data``), its tokenizer (trained once per task and
    vocabulary under ``<cache_root>/tokenizers``, or a pretrained checkpoint's) and the backbone's
    config, for the run ``settings`` describe.

    Raises :class:`~harness.config.ConfigError` before any work when the model cannot hold the
    tokenizer's vocabulary, the prompt format does not fit the tokenizer, or the method cannot
    train this model.
    """
    task = build_task(settings.dataset, cache_dir=cache_root / "data")
    model_cfg = settings.model
    folder, sha = None, None
    if model_cfg.pretrained is not None:
        from harness.models.pretrained import pretrained_tokenizer, resolve, weights_identity

        folder = resolve(model_cfg.pretrained, model_cfg.revision, cache_root)
        sha = weights_identity(folder)
        tokenizer = pretrained_tokenizer(folder, model_cfg.max_seq_len)
    else:
        tokenizer = load_or_build_tokenizer(task, asdict(settings.dataset), cache_root / "tokenizers",
                                            model_max_length=model_cfg.max_seq_len)
    if model_cfg.vocab_size is None:
        model_cfg = replace(model_cfg, vocab_size=len(tokenizer))
    elif model_cfg.pretrained is None and model_cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size}: smaller than the "
                          f"tokenizer's {len(tokenizer)} tokens (null takes the tokenizer's)")
    try:
        prompt_format = effective_format(settings.dataset.prompt_format, tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if prompt_format != "raw":
        task = FormattedTask(task, prompt_format, tokenizer)
    name = settings.method_name
    get_stage(name).check_model(settings.stage_config(name), model_cfg)
    return StageContext(task=task, tokenizer=tokenizer, model_cfg=model_cfg, seed=settings.seed,
                        pretrained=folder, weights_sha256=sha, prompt_format=prompt_format)


def check_data(ctx: StageContext, settings: Settings, name: str) -> None:
    """Read the training data of stage ``name`` and every stage it builds on, so bad data (a
    :class:`~harness.data.errors.DataError` naming file, row and column) stops the run before
    any stage trains."""
    for n in stage_chain(name, settings.stage_config):
        stage = get_stage(n)
        if stage.data == "pairs":
            ctx.task.preference_dataset("train")
        elif stage.data == "sft":
            ctx.task.sft_dataset("train")
