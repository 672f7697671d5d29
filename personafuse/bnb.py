"""bitsandbytes siblings of the MoE layer (QLoRA): the base stays quantized, experts train in full precision."""

from __future__ import annotations

import torch

from personafuse.layer import MoELoraLinear


class MoELoraLinear4bit(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear4bit`` base."""

    def dequantized_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        weight = self.base_layer.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)


class MoELoraLinear8bitLt(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear8bitLt`` base."""

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        scb = weight.SCB if weight.SCB is not None else self.base_layer.state.SCB
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0


def quantized_layer_class(base: torch.nn.Module) -> type[MoELoraLinear] | None:
    """The sibling class for a bitsandbytes base layer, or None for a plain one."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return MoELoraLinear4bit
    if isinstance(base, bnb.nn.Linear8bitLt):
        return MoELoraLinear8bitLt
    return None
