"""Pretrained Hugging Face checkpoints as the harness backbone: ``model=hf model.pretrained=...``.

``model.pretrained`` names a local folder or a Hub id (``model.revision`` optional). The checkpoint
decides the architecture: its ``config.json`` becomes the :class:`ModelConfig`
(:func:`harness.models.hf.config_from_hf`: Llama or Mixtral layout, default RoPE, no biases), its
weights load into the harness's own :class:`~harness.models.llama.CausalLM`
(:func:`harness.models.hf.load_checkpoint`), and its tokenizer replaces the task tokenizer the
harness would otherwise train. The SFT stage then fine-tunes the pretrained weights instead of a
fresh initialisation, and every later stage builds on that as usual.

Hub ids download with ``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE``: an
id not in the local cache is then one clear error naming it). The cache key of every stage
includes :func:`weights_identity` (a sha256 over the weight files), so a different checkpoint
under the same name never reuses another's stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.models.architecture import ConfigError, ModelConfig

log = logging.getLogger("harness")

#: what a snapshot needs: the config, the weights and the tokenizer (no other formats)
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json")
#: the ModelConfig fields taken from the preset for a pretrained model; the checkpoint sets the rest
HARNESS_ONLY = ("name", "pretrained", "revision")


def resolve(pretrained: str, revision: str | None = None) -> Path:
    """The local folder of ``pretrained`` (a folder, or a Hub id downloaded / found in the cache).

    Raises :class:`ConfigError` naming ``model.pretrained`` when neither works.
    """
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.pretrained={pretrained!r}: the folder has no config.json "
                              "(not a Hugging Face model folder)")
        return folder.resolve()
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ConfigError(f"model.pretrained={pretrained!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, revision=revision, allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no network: one message
        raise ConfigError(
            f"model.pretrained={pretrained!r}: not a local folder, and the Hugging Face Hub could not "
            f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "with HF_HUB_OFFLINE=1 only models already in the local cache load") from exc


def pretrained_config(model: dict[str, Any]) -> tuple[ModelConfig, Path]:
    """The :class:`ModelConfig` of the checkpoint ``model["pretrained"]`` and its folder.

    ``model`` is the composed ``model`` section: only the fields in :data:`HARNESS_ONLY` are taken
    from it; the shape, vocabulary, RoPE and MoE layout come from the checkpoint.
    """
    from harness.models.hf import config_from_hf

    folder = resolve(str(model["pretrained"]), model.get("revision"))
    try:
        cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    except ValueError as err:
        raise ConfigError(f"model.pretrained={model['pretrained']!r}: {err}") from err
    ours = {k: model[k] for k in HARNESS_ONLY if model.get(k) is not None}
    if ours.get("name") in (None, "hf"):
        ours["name"] = Path(str(model["pretrained"])).name
    return replace(cfg, **ours), folder


def weights_identity(folder: Path) -> str:
    """sha256 over the names and bytes of the folder's ``*.safetensors`` files (sorted)."""
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.pretrained={str(folder)!r}: no *.safetensors weights in the folder")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pretrained_tokenizer(folder: Path, model_max_length: int):
    """The checkpoint's tokenizer, with the ids the collators need: a pad token (its EOS when it
    has none) and a BOS (its EOS when it has none, as GPT-2 does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.eos_token is None:
        raise ConfigError(f"model.pretrained={str(folder)!r}: the tokenizer has no EOS token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    tok.padding_side = "right"
    tok.model_max_length = model_max_length
    return tok


def load_pretrained(folder: Path, cfg: ModelConfig):
    """The checkpoint's weights in a :class:`CausalLM` of ``cfg`` (float32, train mode)."""
    import torch

    from harness.models.hf import load_checkpoint

    model, _, loaded = load_checkpoint(folder)
    if (loaded.d_model, loaded.n_layers, loaded.vocab_size) != (cfg.d_model, cfg.n_layers,
                                                                cfg.vocab_size):
        raise ConfigError(f"model.pretrained={str(folder)!r}: the checkpoint changed since the run "
                          "started")
    return model.to(torch.float32).train()
