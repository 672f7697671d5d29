"""bitsandbytes siblings of the MoE layer (QLoRA): the base stays quantized, experts train in full precision."""

from __future__ import annotations

import copy
import sys

import torch

from personafuse.layer import MoELoraLinear


class MoELoraLinear4bit(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear4bit`` base."""


class MoELoraLinear8bitLt(MoELoraLinear):
    """Experts over a ``bnb.nn.Linear8bitLt`` base."""


def _unpacked_4bit(packed: torch.Tensor, state):
    """The standard 4-bit layout of a weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel
    (``Linear4bit.forward`` does that in place at the first eval forward), leaving the module untouched.

    The nibble order is undone with bitsandbytes' own inverse, on a copy of the state. The absmax stays the
    bf16 one the packed kernel uses: re-quantizing it (the inverse does, for nested states) would drift
    from what the model computes.
    """
    import bitsandbytes.functional as bnbf

    scratch = copy.copy(state)
    scratch.original_nested = False  # keep absmax as it is; it is rebuilt below
    qweight, scratch = bnbf._convert_weight_packed_for_cpu_inverse(packed, scratch)
    scratch.absmax = state.absmax.T.reshape(-1).float()
    scratch.dtype = state.original_dtype
    return qweight, scratch


def dequantized_weight(base: torch.nn.Module) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight of a bitsandbytes linear (for merging and export), in either 4-bit layout."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weight = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_4bit(data, state)
        return bnbf.dequantize_4bit(data, state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
    return weight.data.float() * scb.float().unsqueeze(1) / 127.0


def quantized_layer_class(base: torch.nn.Module) -> type[MoELoraLinear] | None:
    """The sibling class for a bitsandbytes base layer, or None for a plain one.

    A quantized layer exists only once bitsandbytes was imported (by whoever loaded the model), so it is
    never imported here: importing it prints backend warnings on runs that asked for no quantization.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return MoELoraLinear4bit
    if isinstance(base, bnb.nn.Linear8bitLt):
        return MoELoraLinear8bitLt
    return None
