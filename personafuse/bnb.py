"""bitsandbytes siblings of the MoE layer (QLoRA): the base stays quantized, experts train in full precision."""

from __future__ import annotations

import torch

from personafuse.layer import MoELoraLinear


class MoELoraLinear4bit(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear4bit`` base."""


class MoELoraLinear8bitLt(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear8bitLt`` base."""


def dequantized_weight(base: torch.nn.Module) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight of a bitsandbytes linear (for merging and export)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weight = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
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
