"""Export to, and reload from, Hugging Face ``transformers`` checkpoints.

The harness backbone names its parameters exactly like ``transformers``' ``LlamaForCausalLM``
(dense) and ``MixtralForCausalLM`` (MoE, transformers 5 fused-expert layout), so export is a plain
state-dict copy: :func:`to_hf_model` builds the HF model from :func:`to_hf_config` and loads the
harness state dict into it with every key accounted for.

A checkpoint folder written by :func:`save_checkpoint` is a regular HF model folder that
``AutoModelForCausalLM.from_pretrained`` opens::

    config.json               HF config + a ``harness`` dict (the harness-only ModelConfig fields)
    model.safetensors         weights (dense: HF names == harness names; Mixtral: transformers 5
                              saves the legacy per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3``)
    generation_config.json
    tokenizer.json ...        when a tokenizer is given (``tokenizer.save_pretrained``)
    harness_config.yaml       the resolved Hydra config of the run, when given
    router_noise.safetensors  Shazeer noise weights ``mlp.gate.noise.weight`` [E, D] per layer
                              (``gating: noisy_top_k`` only; training-only, so HF does without)

:func:`load_checkpoint` reads such a folder (or any plain Llama / Mixtral / Qwen2 folder) back into
a :class:`~harness.models.llama.CausalLM`; a folder saved through the transformers adapter
(:mod:`harness.models.adapter`: any other architecture) back into the adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from harness.models.architecture import ModelConfig
from harness.models.llama import CausalLM
from harness.util.atomic import publish_dir

__all__ = ["config_from_hf", "load_checkpoint", "save_checkpoint", "to_hf_config", "to_hf_model"]

HARNESS_KEY = "harness"
"""Name of the extra ``config.json`` entry holding the fields HF has no place for."""

NOISE_FILE = "router_noise.safetensors"
CONFIG_FILE = "harness_config.yaml"
_NOISE_SUFFIX = ".mlp.gate.noise.weight"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LEGACY_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(w[123])\.weight")


def _harness_extras(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields that the HF config cannot represent (or not losslessly).

    ``n_kv_heads`` is kept because ``None`` (plain multi-head attention) and ``n_heads`` both
    become ``num_key_value_heads = n_heads``; ``top_k`` is kept for dense models, whose HF config
    has no ``num_experts_per_tok``.
    """
    extras: dict[str, Any] = {
        "name": cfg.name,
        "init_std": cfg.init_std,
        "n_kv_heads": cfg.n_kv_heads,
        "gating": cfg.gating,
        "aux_loss_coef": cfg.aux_loss_coef,
        "router_z_loss_coef": cfg.router_z_loss_coef,
    }
    if not cfg.is_moe:
        extras["top_k"] = cfg.top_k
    return extras


def to_hf_config(cfg: ModelConfig, tokenizer: Any = None) -> Any:
    """``transformers.LlamaConfig`` (dense) or ``MixtralConfig`` (``n_experts > 0``) for ``cfg``.

    Token ids (bos / eos / pad) come from ``tokenizer`` when given, else they are left unset
    (``None``) rather than inheriting LLaMA's 1 / 2. The harness-only fields are stored as the
    extra attribute ``harness`` (a dict), which ``save_pretrained`` writes into ``config.json``.
    """
    from transformers import LlamaConfig, MixtralConfig

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None: set it (from the tokenizer) before exporting")
    ids = {k: getattr(tokenizer, k, None) if tokenizer is not None else None
           for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta),
                         **(cfg.rope_scaling or {})},
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_dropout=0.0,
        **ids,
    )
    extras = {HARNESS_KEY: _harness_extras(cfg)}
    if cfg.is_moe:
        return MixtralConfig(
            **common,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
            architectures=["MixtralForCausalLM"],
            **extras,
        )
    if cfg.qkv_bias:  # Qwen2's layout: a Llama with q/k/v biases
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"],
                           **extras)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"], **extras)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`to_hf_config` from a ``config.json`` dict.

    Works for checkpoints not written by the harness too (plain Llama / Mixtral), as long as the
    architecture is one the harness implements: default, linear or llama3 RoPE, SiLU, no biases
    but Qwen2's q/k/v ones, any ``head_dim``. Raises ``ValueError`` otherwise.
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mixtral", "qwen2"):
        raise ValueError(f"model_type={model_type!r}: only 'llama', 'mixtral' and 'qwen2' are "
                         "supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: sliding-window attention is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type={rope_type!r}: only default, linear and llama3 RoPE are "
                         "supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope_type != "default":
        keys = ("factor",) if rope_type == "linear" else (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": rope_type, **{k: rope[k] for k in keys if k in rope}}
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: only silu is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias: biases are not supported (Qwen2's q/k/v "
                         "biases are: model_type qwen2)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    kv = hf.get("num_key_value_heads") or heads
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"],
        rope_theta=float(theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        qkv_bias=model_type == "qwen2",
        attn_head_dim=None if head_dim in (None, d // heads) else int(head_dim),
        rope_scaling=scaling,
    )
    if model_type == "mixtral":
        fields.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    fields.update(hf.get(HARNESS_KEY) or {})
    return ModelConfig.from_dict(fields)


def _no_init() -> contextlib.AbstractContextManager:
    """Skip HF's random init (every weight is overwritten right after); no-op if unavailable."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older / newer transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _split_noise(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]:
    """Split a harness state dict into (HF weights, router noise weights [E, D])."""
    noise = {k: v for k, v in state.items() if k.endswith(_NOISE_SUFFIX)}
    return {k: v for k, v in state.items() if k not in noise}, noise


def to_hf_model(model: CausalLM, tokenizer: Any = None) -> Any:
    """The equivalent ``LlamaForCausalLM`` / ``MixtralForCausalLM`` (a copy; eval mode).

    Every harness parameter is loaded except the router noise weights, which only act in training:
    the HF model computes what the harness model computes in ``eval()`` mode. Raises
    ``RuntimeError`` if any key is missing or unexpected.
    """
    from transformers import AutoModelForCausalLM

    hf_cfg = to_hf_config(model.cfg, tokenizer)
    dtype = next(model.parameters()).dtype
    with _no_init():
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    weights, _ = _split_noise(model.state_dict())
    result = hf.load_state_dict(weights, strict=False)
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if model.cfg.tie_embeddings:  # tied: HF may list the alias of the shared tensor as missing
        missing -= {"lm_head.weight"}
    if missing or unexpected:
        raise RuntimeError(f"HF export: missing keys {sorted(missing)}, "
                           f"unexpected keys {sorted(unexpected)}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(device=next(model.parameters()).device).eval()


def _write_resolved_config(resolved_config: Any, path: Path) -> None:
    """Write a dict / DictConfig as YAML (interpolations resolved)."""
    from omegaconf import DictConfig, OmegaConf

    node = resolved_config if isinstance(resolved_config, DictConfig) \
        else OmegaConf.create(resolved_config)
    OmegaConf.save(OmegaConf.to_container(node, resolve=True), path)


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
                    resolved_config: Any = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (see the module docstring); returns it.

    ``model``: a :class:`CausalLM` (exported by :func:`to_hf_model`) or a
    :class:`~harness.models.adapter.TransformersCausalLM` (its own ``save_pretrained``).

    The folder is written in full next to ``out_dir`` first and then renamed into place, so a
    crash never leaves a half-written checkpoint and an existing one is replaced whole.
    ``resolved_config``: the run's Hydra config (dict or DictConfig) -> ``harness_config.yaml``.
    """
    from harness.models.adapter import TransformersCausalLM, save_transformers

    def build(tmp: Path) -> None:
        if isinstance(model, TransformersCausalLM):  # already a transformers model: save it
            save_transformers(model, tmp)
            hf = model.hf
        else:
            hf = to_hf_model(model, tokenizer)
            hf.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(hf.config).save_pretrained(tmp)
        del hf
        _, noise = _split_noise(model.state_dict())
        if noise:
            save_file({k: v.detach().cpu().contiguous() for k, v in noise.items()},
                      tmp / NOISE_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if resolved_config is not None:
            _write_resolved_config(resolved_config, tmp / CONFIG_FILE)

    return publish_dir(out_dir, build, replace=True)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of its shards (``model.safetensors.index.json``)."""
    single = path / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json)")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return state


def _hf_to_harness(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map checkpoint names back to harness names.

    Dense names are identical. transformers 5 *saves* Mixtral in the original per-expert layout
    (``block_sparse_moe.experts.{e}.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``) and only
    fuses on load, so the experts are fused here as transformers does: ``gate_up_proj[e] =
    cat(w1, w3)`` [2F, D] (gate rows first), ``down_proj[e] = w2`` [D, F]. Already-fused names
    pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    legacy: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key, value in state.items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        m = _LEGACY_EXPERT.fullmatch(key)
        if m is None:
            out[key] = value
        else:
            legacy.setdefault(m[1], {})[(int(m[2]), m[3])] = value
    for prefix, w in legacy.items():
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat((w[(e, "w1")], w[(e, "w3")]), dim=0) for e in range(cfg.n_experts)])
            out[f"{prefix}.down_proj"] = torch.stack([w[(e, "w2")] for e in range(cfg.n_experts)])
        except KeyError as err:
            raise RuntimeError(f"{prefix}: expert weight {err} missing from checkpoint") from err
        if len(w) != 3 * cfg.n_experts:
            raise RuntimeError(f"{prefix}: {len(w)} expert tensors, expected {3 * cfg.n_experts}")
    return out


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, Any, ModelConfig]:
    """Reload a checkpoint folder: ``(model in eval mode, tokenizer or None, ModelConfig)``.

    A folder a run through the transformers adapter saved (``harness.backend`` in its
    ``config.json``) comes back as a :class:`~harness.models.adapter.TransformersCausalLM`;
    every other as a :class:`CausalLM`:

    The ModelConfig comes from ``config.json`` plus its ``harness`` extras, the weights from
    ``model.safetensors`` (names mapped back by :func:`_hf_to_harness`), the router noise weights
    from ``router_noise.safetensors`` when present (otherwise a ``noisy_top_k`` model keeps
    freshly initialised noise weights). Raises ``RuntimeError`` on missing or unexpected weights.
    """
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    if (hf_cfg.get(HARNESS_KEY) or {}).get("backend") == "transformers":
        from harness.models.adapter import load_transformers

        adapted = load_transformers(path)
        return adapted.eval(), _tokenizer(path), adapted.cfg
    cfg = config_from_hf(hf_cfg)
    state = _hf_to_harness(_load_weights(path), cfg)
    if (path / NOISE_FILE).exists():
        state.update(load_file(path / NOISE_FILE))
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = CausalLM(cfg).to(dtype)
    if cfg.tie_embeddings:  # save_pretrained stores the shared tensor once
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    if cfg.tie_embeddings:
        missing -= {"lm_head.weight"}
    if cfg.gating == "noisy_top_k" and not (path / NOISE_FILE).exists():
        missing = {k for k in missing if not k.endswith(_NOISE_SUFFIX)}
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: missing weights {sorted(missing)}, "
                           f"unexpected weights {sorted(result.unexpected_keys)}")
    return model.eval(), _tokenizer(path), cfg


def _tokenizer(path: Path) -> Any:
    """The folder's tokenizer, or None when it has none."""
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

