"""What every section of the bench shares: devices, configs, tables."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness.config import ModelConfig
from harness.settings import register_configs
from harness.util.conf_path import config_dir

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Set (unless already set) by :func:`main`: the bench builds every model locally."""
CONF_DIR = config_dir()
SECTIONS: tuple[str, ...] = ("sampler", "steps", "memory")
DEFAULT_MODELS: tuple[str, ...] = ("llama_small", "moe_small")
MEMORY_MARK = "HARNESS_BENCH_MEMORY "
"""Prefix of the one stdout line on which a memory child reports its JSON result."""
MIB = 2**20

Column = tuple[str, str, str]
"""(row key, header, format spec) of one table column."""


# ------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info lines (seed, accelerator, tips) and its advisory warnings."""
    import datasets

    names = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning", "harness")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(does not have many workers|"
                                    r"number of training batches|sync_dist|LightningModule.log|"
                                    r"batch_size|litlogger|`training_step` returned|LeafSpec).*")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not xs:
        raise ValueError("median of no measurements")
    return float(statistics.median(xs))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The harness config composed from ``conf/`` (Hydra compose API) with ``overrides``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *overrides])


def model_config(preset: str, vocab_size: int, lora: int = 0,
                 overrides: Sequence[str] = ()) -> ModelConfig:
    """The ``conf/model/<preset>.yaml`` preset (with the Hydra ``overrides``, e.g.
    ``model.pretrained=<folder>``) with ``vocab_size`` set and, with ``lora`` > 0, LoRA adapters of
    that rank on the trained policy (``model.lora.r``).

    A pretrained preset (``smollm2_135m``) gives its checkpoint's shape (read from its
    ``config.json``), vocabulary included (its embedding and LM head are a fifth of SmolLM2's
    weights; the task's token ids are a subset, and sampled ids the task's tokenizer lacks
    decode to nothing), and the bench builds a random-init model of that shape: time and memory,
    not the weights, are what it measures.
    """
    from harness.config import model_config as composed_model

    cfg = compose_config([f"model={preset}", *overrides])
    shape = composed_model(cfg.model, cfg.get("cache_dir"))
    vocab = int(vocab_size)
    if shape.pretrained is not None and shape.vocab_size is not None:
        vocab = max(vocab, int(shape.vocab_size))
    shape = dataclasses.replace(shape, pretrained=None, revision=None, backend="native",
                                upcycle_experts=0, vocab_size=vocab)
    if lora:
        shape = dataclasses.replace(shape, lora=dataclasses.replace(shape.lora, r=int(lora)))
    return shape


def methods() -> tuple[str, ...]:
    """Every stage in the registry: the bench times each one."""
    from harness.registry import stage_names

    return stage_names()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def format_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column],
                 notes: Sequence[str] = ()) -> str:
    """A plain-text table: title, header, one line per row (``None`` shows as ``-``), notes."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            v = row.get(key)
            line.append("-" if v is None else format(v, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                         enumerate(zip(r, widths, strict=True))).rstrip()

    rule = "-" * len(render(cells[0]))
    out = [title, rule, render(cells[0]), rule, *(render(r) for r in cells[1:]), rule]
    out += [f"  {line}" for n in notes for line in textwrap.wrap(n, 100, subsequent_indent="  ")]
    return "\n".join(out)


