"""Which projections get experts: defaults per model family, and the injection itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from personafuse.bnb import quantized_layer_class
from personafuse.layer import MoELoraLinear, RoutingState

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or quantized_layer_class(module) is not None


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = model.config.get_text_config().model_type
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"no default target_modules for model_type {model_type!r}; set target_modules explicitly "
            f"(families with defaults: {sorted(DEFAULT_TARGET_MODULES)})"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def lora_config(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: Sequence[str] | None = None):
    """A plain PEFT ``LoraConfig`` on the same projections a PersonaFuse stack would use."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(target_modules or default_target_modules(model)))


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Full names of the linear layers whose name ends with one of ``target_modules``.

    Every requested suffix must match something: a typo is an error, not a silently smaller stack.
    The output head is never wrapped (the router sits before it).
    """
    linear = [n for n, m in model.named_modules() if _is_linear(m) and m is not model.get_output_embeddings()]
    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)
    unmatched = [t for t in target_modules if not any(matches(n, t) for n in linear)]
    if unmatched:
        known = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"target module(s) {unmatched} not found in {type(model).__name__}; linear layers are named {known}")
    return [n for n in linear if any(matches(n, t) for t in target_modules)]


def inject(model: nn.Module, names: Sequence[str], num_experts: int, r: int, alpha: float, dropout: float,
           state: RoutingState) -> dict[str, MoELoraLinear]:
    """Replace each named layer by an MoE layer wrapping it; returns them by name."""
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer_cls = quantized_layer_class(base) or MoELoraLinear
        layer = layer_cls(base, num_experts, r, alpha, dropout, state)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
