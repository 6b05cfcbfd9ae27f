"""LoRA (Hu et al., 2021) through ``peft``: low-rank adapters on the backbone's linear layers.

``W x`` becomes ``W x + (alpha / r) · B A x`` with ``A`` [r, d_in] (random) and ``B`` [d_out, r]
(zeros), so an adapted model starts as its base; only ``A`` and ``B`` train. ``peft``'s
``inject_adapter_in_model`` puts the adapters into the harness's own :class:`CausalLM` (its layer
names are ``transformers``' Llama names, so ``target_modules`` are the usual ``q_proj`` ...
``down_proj``), which keeps every other part of the harness (the KV-cached sampler, MoE telemetry)
working on the adapted model unchanged.

* The reference policy is the same model with its adapters switched off (:class:`AdaptersOff`):
  no second copy of the weights, and, since the base weights are frozen, exactly the base.
* Checkpoints are saved merged (:func:`merged`: ``W + (alpha / r) B A``, a plain
  :class:`CausalLM`, so ``transformers``, lm-eval and serving stacks load them unchanged), with
  the adapter beside them in ``adapter/`` (:func:`save_adapter`, ``peft``'s files).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.models.architecture import LoRASettings


def _tuner_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return bool(_tuner_layers(model))


def add_lora(model: nn.Module, settings: LoRASettings) -> nn.Module:
    """Inject adapters into ``model`` in place and freeze everything but them; returns ``model``.

    The adapters' ``A`` draws from the global RNG (seeded per stage), ``B`` starts at zero.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_config = config  # for save_adapter
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, layers: Sequence[Any] | None = None) -> Iterator[None]:
    """Within the block ``model`` computes its base (every adapter switched off); ``layers``:
    its adapter layers when the caller already has them."""
    layers = _tuner_layers(model) if layers is None else layers
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff(nn.Module):
    """The base of an adapted ``policy`` as a model of its own: the LoRA reference policy.

    Shares ``policy``'s weights (held outside the module tree, so freezing or moving this view
    never touches the policy); its forward runs the policy with the adapters off, in this view's
    train/eval mode. ``new_cache`` and ``cfg`` are the policy's (the KV-cached sampler).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = (policy,)
        self._layers = tuple(_tuner_layers(policy))  # looked up once: forward runs per token

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    @property
    def cfg(self):
        return self.policy.cfg

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy.new_cache(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy
        was = policy.training
        policy.train(self.training)
        try:
            with adapters_disabled(policy, self._layers):
                return policy(*args, **kwargs)
        finally:
            policy.train(was)


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A copy of an adapted ``model`` with every adapter merged into its base weight and the LoRA
    wrappers removed: a plain model with the original parameter names."""
    out = copy.deepcopy(model)
    tuners = {id(m) for m in _tuner_layers(out)}
    for name, module in list(out.named_modules()):
        if id(module) in tuners:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    for p in out.parameters():
        p.requires_grad_(True)
    for module in out.modules():
        if hasattr(module, "lora_config"):
            del module.lora_config
    from harness.models.llama import ScalarHead

    if isinstance(out, ScalarHead):  # a reward model / critic with adapters on its backbone
        out.freeze_unused()
    return out


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter alone, as ``peft`` writes it: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (keys ``base_model.model.<name>``, loadable onto the merged
    checkpoint's ``transformers`` model with ``PeftModel.from_pretrained``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model)
    save_file({f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))
    model.lora_config.save_pretrained(str(folder))
